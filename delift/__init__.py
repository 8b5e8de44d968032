"""delift: choose which data to fine-tune an LLM on (DELIFT, ICLR 2025) and its baselines."""

__version__ = "0.1.0"
