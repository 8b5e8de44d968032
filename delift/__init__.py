"""delift: choose which data to fine-tune an LLM on (DELIFT, ICLR 2025) and its baselines."""

__version__ = "0.1.0"


def __getattr__(name):
    # `delift.select` imports torch and the selectors: only when it is used, not on `import delift`.
    if name == "select":
        from delift.api import select

        return select
    raise AttributeError(f"module 'delift' has no attribute {name!r}")
