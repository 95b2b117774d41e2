"""Slices of logged results for analysis: the views live in :mod:`pyodlog.io.views` (the read side),
re-exported here so analysis code has one place to import from."""

from pyodlog.io.views import DEFAULT_CHUNK_ROWS, LazyResults, ResultView, open_results, ranges

__all__ = ["DEFAULT_CHUNK_ROWS", "LazyResults", "ResultView", "open_results", "ranges"]
