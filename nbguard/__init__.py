"""nbguard: autosave and exact resume of PyTorch training in notebooks."""

__version__ = "0.1.0"
