"""Several results as one, and streaming them: :func:`open_results`, :class:`LazyResults`.

* :class:`~pyodlog.io.reader.ResultView` (defined beside ResultData, re-exported here) is a
  :class:`~pyodlog.io.reader.ResultData` made of image-row index arrays
  into one or more results read back: making one copies no column; a column is gathered when it
  is first read (and kept while the view lives). ``ResultData.where(...)`` returns one, and so does
  :func:`open_results` for several results (each row then knows its ``source``, ``model_name``,
  ``version_name`` and ``result_name``).
* ``iter_chunks(rows=...)`` yields consecutive views of at most ``rows`` images, with a tqdm
  progress bar on long reads.
* :class:`LazyResults` (``open_results(paths, lazy=True)``) reads nothing up front: its
  ``iter_chunks`` reads one segment file at a time (a folder's segments are rotated at
  ``WriterConfig.segment_max_bytes``, 1 GiB by default; an exported ZIP's ``records.h5`` is one
  file), so memory is bounded by the largest segment plus one chunk's gathered columns, whatever
  the number of rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pyodlog.io.reader import (
    ResultData,
    ResultView,
    _is_result,
    _segment_paths,
    _with_all_columns,
    merge_tables,
    open_result,
    read_segments,
)
from pyodlog.io.rows import DEFAULT_CHUNK_ROWS, progress_bar, ranges

__all__ = ["DEFAULT_CHUNK_ROWS", "LazyResults", "ResultView", "open_results", "ranges"]


# -- several results ------------------------------------------------------------------------------


def open_results(
    paths: Sequence[str | Path] | str | Path, *, lazy: bool = False, strict: bool = False
) -> ResultView | LazyResults:
    """Several result folders and exported ZIPs (e.g. two model versions) as one, row by row labelled.

    Every image row gets the columns ``source`` (the path it was read from), ``model_name``,
    ``version_name`` and ``result_name``, so ``where(version_name="2024.06")`` selects one.

    Args:
        paths: result folders and/or ZIPs (a single path is accepted too).
        lazy: read nothing now; return a :class:`LazyResults` that streams one segment at a time.
        strict: as in :func:`pyodlog.open_result`.

    Raises:
        ValueError: no path given; what :func:`pyodlog.open_result` raises for a bad path.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    resolved = [Path(p) for p in paths]
    if not resolved:
        raise ValueError("open_results needs at least one result folder or exported ZIP")
    if lazy:
        return LazyResults(resolved, strict=strict)
    results = [open_result(p, strict=strict) for p in resolved]
    return ResultView([(r, np.arange(len(r), dtype=np.int64)) for r in results], labelled=True)


class LazyResults:
    """Result folders and ZIPs read one segment file at a time: memory bounded by the largest segment.

    ``iter_chunks(rows)`` yields labelled :class:`ResultView` chunks (as :func:`open_results`
    labels rows) of at most ``rows`` images; ``where(...)`` returns a LazyResults whose chunks
    are filtered. Nothing is read until iterated.
    """

    def __init__(
        self,
        paths: list[Path],
        filters: tuple[tuple[tuple[Any, ...], dict[str, Any]], ...] = (),
        strict: bool = False,
    ) -> None:
        for path in paths:
            if not path.exists():
                raise FileNotFoundError(f"{path} is neither a result folder nor an exported ZIP")
            if path.is_dir() and not _is_result(path):
                raise ValueError(f"{path} is not a pyodlog result folder")
        self.paths, self._filters, self._strict = paths, filters, strict
        self.source = ", ".join(map(str, paths))

    def where(self, *args: Any, **kwargs: Any) -> LazyResults:
        """The same conditions as :meth:`ResultData.where`, applied to every chunk as it is read."""
        return LazyResults(self.paths, (*self._filters, (args, kwargs)), self._strict)

    @property
    def manifest(self) -> dict[str, Any]:
        """The first path's ``result.json`` (a folder) or export manifest (a ZIP)."""
        path = self.paths[0]
        return open_result_manifest(path) if path.is_dir() else open_result(path).manifest

    @property
    def class_names(self) -> list[str] | None:
        schema = self.manifest.get("schema")
        names = schema.get("class_names") if isinstance(schema, dict) else None
        return list(names) if isinstance(names, list) else None

    def _pieces(self) -> Iterator[ResultData]:
        for path in self.paths:
            if not path.is_dir():
                yield open_result(path, strict=self._strict)  # a ZIP: records.h5 is one file
                continue
            base = open_result_manifest(path)
            for segment in _segment_paths(path):
                parts, skipped = read_segments([segment], strict=self._strict)
                tables = merge_tables(parts)
                yield ResultData(_with_all_columns(tables, base.get("schema")), base, path, skipped)

    def iter_chunks(
        self, rows: int = DEFAULT_CHUNK_ROWS, progress: bool | None = None
    ) -> Iterator[ResultView]:
        """Labelled views of at most ``rows`` images, one segment file read at a time."""
        with progress_bar(None, progress, "segments") as bar:
            for piece in self._pieces():
                view = ResultView([(piece, np.arange(len(piece), dtype=np.int64))], labelled=True)
                for args, kwargs in self._filters:
                    view = view.where(*args, **kwargs)
                yield from view.iter_chunks(rows, progress=False)
                bar.update(1)

    def load(self) -> ResultView:
        """Everything in memory, as :func:`open_results` (without ``lazy``) gives it, filters applied."""
        view = open_results(self.paths, strict=self._strict)
        assert isinstance(view, ResultView)
        for args, kwargs in self._filters:
            view = view.where(*args, **kwargs)
        return view

    def __repr__(self) -> str:
        return f"LazyResults({self.source!r})"


def open_result_manifest(path: Path) -> dict[str, Any]:
    """A result folder's ``result.json`` ({} when it has none or it is damaged)."""
    try:
        manifest = json.loads((path / "result.json").read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}
