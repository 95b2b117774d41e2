"""One segment file: an HDF5 file written by one process in SWMR mode.

While open it is ``<name>.h5.part`` (``<name>.h5.creating`` until its
datasets exist): every dataset is created first, then the
file switches to SWMR mode, so a crash leaves it readable up to its last
completed flush. Closing it fsyncs the file, renames it to ``<name>.h5`` and
fsyncs the folder; a closed segment is never written again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pyodlog.io.columns import ColumnBatch, encode_str
from pyodlog_collector.files import (
    fsync_path as fsync_dir,  # a folder's fsync makes renames durable
)

__all__ = ["STRING_SUFFIXES", "SegmentWriter", "fsync_dir"]

STRING_SUFFIXES = (".bytes", ".spans")
# Chunk sizes. A flush writes the partial last chunk of every column again, so
# small columns (one number per image) get small chunks: at low traffic a flush
# then rewrites kilobytes, not a megabyte per column. The feature payload,
# which carries most of the bytes, gets large chunks.
CHUNK_BYTES = 1 << 20
SMALL_CHUNK_BYTES = 64 << 10
# Where each cross-table offset points, to shift batch-relative offsets.
_SHIFTS = {
    "images/det_offset": "detections",
    "features/image_row": "images",
    "features/payload_offset": "payload",
    "features/qrow_offset": "qrows",
}


def _rows_per_chunk(name: str, row_bytes: int) -> int:
    target = CHUNK_BYTES if name == "features_payload" else SMALL_CHUNK_BYTES
    return int(max(64, min(1 << 20, target // max(row_bytes, 1))))


class SegmentWriter:
    """Appends column batches to one SWMR segment file.

    Args:
        path: the final ``.h5`` path; the file is written as ``path + '.part'``.
        attrs: file attributes (model, version, result, schema, rank, ...).
        first: the first batch, which fixes the segment's columns.
    """

    def __init__(self, path: Path, attrs: dict[str, Any], first: ColumnBatch) -> None:
        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        # Held while the segment is open: recovery never touches a live writer's file.
        self._lock_fd = os.open(str(self.lock_path), os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.opened_at = time.monotonic()
        self.counts = {
            "images": 0,
            "detections": 0,
            "payload": 0,
            "qrows": 0,
            "features": 0,
            "records": 0,
        }
        self.nbytes = 0
        # Created under a third name and renamed once in SWMR mode: a crash before
        # that leaves a '.creating' file, which never held a record.
        creating = self.path.with_name(self.path.name + ".creating")
        self._file = h5py.File(creating, "w", libver="latest", rdcc_nbytes=8 * CHUNK_BYTES)
        for key, value in attrs.items():
            self._file.attrs[key] = (
                value if not isinstance(value, (dict, list)) else json.dumps(value)
            )
        numeric, strings, _ = first.finish()
        self.numeric_columns = {
            name: (pieces[0].dtype, pieces[0].shape[1:]) for name, pieces in numeric.items()
        }
        self.string_columns = sorted(strings)
        for name, (dtype, row_shape) in self.numeric_columns.items():
            self._create(name, dtype, row_shape)
        for name in self.string_columns:
            self._create(name + ".bytes", np.uint8, ())
            self._create(name + ".spans", np.int64, (2,))
        self._create("features_payload", np.uint8, ())
        for name in ("features_scale", "features_offset"):
            if name not in self.numeric_columns:
                self._create(name, np.float32, ())
                self.numeric_columns[name] = (np.dtype(np.float32), ())
        self._file.swmr_mode = True
        os.replace(creating, self.part)
        self._sync_fd: int | None = None

    def _create(self, name: str, dtype, row_shape) -> None:
        row_bytes = int(np.dtype(dtype).itemsize * int(np.prod(row_shape, dtype=np.int64)))
        if not hasattr(self, "_datasets"):
            self._datasets: dict[str, Any] = {}
            self._lengths: dict[str, int] = {}
            self._tails: dict[str, np.ndarray] = {}
        self._datasets[name] = self._file.create_dataset(
            name,
            shape=(0, *row_shape),
            maxshape=(None, *row_shape),
            dtype=dtype,
            chunks=(_rows_per_chunk(name, row_bytes), *row_shape),
        )
        self._lengths[name] = 0

    def accepts(self, batch: ColumnBatch) -> bool:
        """Whether the batch has exactly this segment's columns."""
        return (set(batch.numeric) | {"features_scale", "features_offset"}) == set(
            self.numeric_columns
        ) and sorted(batch.strings) == self.string_columns

    def _append(self, name: str, values) -> None:
        """Appends an array, or a list of arrays, in whole chunks."""
        self._append_direct(name, values if isinstance(values, list) else [values])

    def _append_direct(self, name: str, pieces: list[np.ndarray]) -> None:
        """Appends rows as whole chunks with ``write_direct_chunk``.

        Full chunks go straight from the source arrays to the file (no chunk
        cache, no filter pipeline, no copy); rows that do not fill a chunk wait
        in the column's tail buffer, which is written as a whole chunk (the part
        beyond the dataset's extent is ignored) and rewritten once more rows
        arrive — what HDF5's chunk cache would write at a flush anyway.
        """
        total = sum(len(p) for p in pieces)
        if total == 0:
            return
        ds = self._datasets[name]
        rows = ds.chunks[0]
        tail = self._tails.get(name)
        if tail is None:
            tail = self._tails[name] = np.zeros(ds.chunks, ds.dtype)
        length = self._lengths[name]
        ds.resize(length + total, axis=0)
        chunk, filled = divmod(length, rows)
        zeros = (0,) * (len(ds.chunks) - 1)
        for piece in pieces:
            piece = np.ascontiguousarray(piece, dtype=ds.dtype)
            pos = 0
            while pos < len(piece):
                if filled == 0 and len(piece) - pos >= rows:
                    ds.id.write_direct_chunk((chunk * rows, *zeros), piece[pos : pos + rows])
                    chunk, pos = chunk + 1, pos + rows
                    continue
                take = min(rows - filled, len(piece) - pos)
                tail[filled : filled + take] = piece[pos : pos + take]
                filled, pos = filled + take, pos + take
                if filled == rows:
                    ds.id.write_direct_chunk((chunk * rows, *zeros), tail)
                    chunk, filled = chunk + 1, 0
        if filled:
            ds.id.write_direct_chunk((chunk * rows, *zeros), tail)
        self._lengths[name] = length + total

    def append(self, batch: ColumnBatch) -> None:
        """Writes a batch (one resize + one write per column) and flushes it."""
        numeric, strings, payload = batch.finish()
        for name, pieces in numeric.items():
            base = _SHIFTS.get(name)
            if base is not None:
                pieces = [p + self.counts[base] for p in pieces]
            self._append(name, pieces)
        for name, texts in strings.items():
            joined = "".join(texts)
            if joined.isascii():  # the common case: one encode, lengths in characters are bytes
                data = joined.encode("ascii")
                lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
            else:
                encoded = [encode_str(t) for t in texts]  # lossless (surrogateescape)
                data = b"".join(encoded)
                lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
            start = self._lengths[name + ".bytes"]
            starts = start + np.cumsum(lengths) - lengths
            self._append(name + ".bytes", np.frombuffer(data, dtype=np.uint8))
            self._append(
                name + ".spans",
                np.stack([starts, lengths], axis=1) if len(texts) else np.empty((0, 2), np.int64),
            )
        self._append_direct("features_payload", payload)
        self._file.flush()
        self.counts["images"] += batch.n_images
        self.counts["detections"] += batch.n_detections
        self.counts["payload"] += batch.payload_bytes
        self.counts["qrows"] += batch.n_qrows
        self.counts["features"] += batch.n_features
        self.counts["records"] += batch.n_records
        self.nbytes += batch.nbytes

    def sync(self) -> None:
        """Makes everything flushed so far durable (h5py's flush never fsyncs)."""
        if self._sync_fd is None:
            self._sync_fd = os.open(str(self.part), os.O_RDONLY)
        os.fsync(self._sync_fd)

    def close(self) -> Path:
        """Closes, fsyncs, renames to ``.h5`` and fsyncs the folder; returns the final path."""
        self._file.close()
        if self._sync_fd is None:
            self._sync_fd = os.open(str(self.part), os.O_RDONLY)
        os.fsync(self._sync_fd)
        os.close(self._sync_fd)
        self._sync_fd = None
        os.replace(self.part, self.path)
        fsync_dir(self.path.parent)
        self._release_lock()
        return self.path

    def _release_lock(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.lock_path)
        os.close(self._lock_fd)

    def abandon(self) -> None:
        """For a forked child: forget the parent's file without closing or flushing it.

        The h5py object is kept alive for good: collecting it would close the
        HDF5 file and write to the parent's segment.
        """
        _ABANDONED.append(self._file)
        self._file = None
        self._sync_fd = None


_ABANDONED: list[Any] = []
