"""pyodlog's version: one place, read by the package, the store's file attributes and the build."""

__version__ = "0.1.0"
