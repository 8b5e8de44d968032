"""Selectors behind one registry: `SELECTORS[name]`, or `_target_` in conf/selector/*.yaml."""

from delift.selectors.base import SELECTORS, Selection, SelectionContext, Selector, budget_for, register
from delift.selectors import simple  # noqa: F401  (registers random, full, initial)

__all__ = ["SELECTORS", "Selection", "SelectionContext", "Selector", "budget_for", "register"]
