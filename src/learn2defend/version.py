"""The package version, in a module of its own: `cli`, `export` and `doctor` read it
without importing the whole package (whose `__init__` pulls in training and evaluation),
and it does not depend on installed package metadata, so `PYTHONPATH=src` works too."""

__version__ = "0.1.0"
