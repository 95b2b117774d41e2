"""Slices of logged results for analysis: the views live in :mod:`pyodlog.io.views` (the read side),
re-exported here so analysis code has one place to import from."""

from __future__ import annotations

from typing import Any

from pyodlog.io.views import DEFAULT_CHUNK_ROWS, LazyResults, ResultView, open_results, ranges

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "LazyResults",
    "ResultView",
    "open_results",
    "parse_where",
    "ranges",
]


def parse_where(pairs: list[str]) -> dict[str, Any]:
    """``["n_epoch=3", "dataset_type=deploying"]`` → ``{"n_epoch": 3, "dataset_type": "deploying"}``:
    the ``KEY=VALUE`` slices of ``pyodlog report --where`` and of the viewer's result page.

    Values are typed: integers, floats, ``true``/``false``, ``none``; anything
    else (or a value in quotes) stays a string. A key given twice gives a list.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(
                f"--where {pair!r} is not KEY=VALUE (e.g. --where dataset_type=deploying)"
            )
        value: Any
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            value = text[1:-1]
        elif text.lower() in ("true", "false"):
            value = text.lower() == "true"
        elif text.lower() in ("none", "null"):
            value = None
        else:
            try:
                value = int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    value = text
        if key in out:
            out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [value]
        else:
            out[key] = value
    return out
