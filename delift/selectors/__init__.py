"""Selectors behind one registry: `SELECTORS[name]`, or `_target_` in delift/conf/selector/*.yaml."""

from delift.selectors.base import SELECTORS, Selection, SelectionContext, Selector, budget_for, register
from delift.selectors import deft_ucs, delift, less, selectit, simple  # noqa: F401  (each module registers its selectors)

__all__ = ["SELECTORS", "Selection", "SelectionContext", "Selector", "budget_for", "register"]
