"""The package version (the same as pyproject.toml's), importable without the package."""

__version__ = "0.1.0"
