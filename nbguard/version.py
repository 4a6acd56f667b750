"""The package version (a module of its own: core modules import it without the package front)."""

__version__ = "0.1.0"
