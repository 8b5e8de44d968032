"""Selectors behind one registry: `SELECTORS[name]`, or `_target_` in delift/conf/selector/*.yaml."""

from delift.selectors.base import SELECTORS, Selection, SelectionContext, Selector, budget_for, register
# Each module registers its selectors on import.
from delift.selectors import baselines, deft_ucs, delift, less, rds, selectit, simple  # noqa: F401

__all__ = ["SELECTORS", "Selection", "SelectionContext", "Selector", "budget_for", "register"]
