"""Row arithmetic and progress bars shared by the read side's views, analysis and interop."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DEFAULT_CHUNK_ROWS", "PROGRESS_MIN_ROWS", "progress_bar", "ranges"]

#: Images per chunk when none is given.
DEFAULT_CHUNK_ROWS = 65536
#: Above this many images, ``progress=None`` shows a progress bar (on a terminal).
PROGRESS_MIN_ROWS = 100_000


def ranges(offsets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The rows ``offsets[i] .. offsets[i] + counts[i]`` of every ``i``, concatenated (vectorised)."""
    offsets = np.asarray(offsets, np.int64)
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, np.int64)
    starts = np.repeat(offsets - (np.cumsum(counts) - counts), counts)
    return starts + np.arange(total, dtype=np.int64)


class _Bar:
    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)


def progress_bar(total: int | None, progress: bool | None, unit: str = "images") -> _Bar:
    """A tqdm bar on stderr when asked (``progress=None``: long reads on a terminal only)."""
    if progress is False or (progress is None and total is not None and total < PROGRESS_MIN_ROWS):
        return _Bar(None)
    from tqdm import tqdm

    return _Bar(
        tqdm(total=total, unit=unit, desc="pyodlog", disable=None if progress is None else False)
    )
