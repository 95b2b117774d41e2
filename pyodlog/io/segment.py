"""One segment file: an HDF5 file written by one process in SWMR mode.

While open it is ``<name>.h5.part`` (``<name>.h5.creating`` until its
datasets exist): every dataset is created first, then the
file switches to SWMR mode, so a crash leaves it readable up to its last
completed flush. Closing it fsyncs the file, renames it to ``<name>.h5``,
records its SHA-256 in ``<name>.h5.sha256`` (written under a temporary name,
fsynced, renamed) and fsyncs the folder; a closed segment is never written
again, and readers verify it against that checksum.

Segment format (the ``segment_format`` file attribute): 1 (no attribute) is
pyodlog 0.1.0's layout without a checksum; 2 adds the SHA-256 sidecar; 3 adds
compact logits/embeddings, ``images/sample_weight`` and the ``aggregates``
dataset; 4 may add the ``near_misses`` group, the images' ``nm_*`` columns and
the detections' uncertainty columns; 5 adds ``images/nm_score_dtype`` (the dtype
the model compared its scores in, for replay) (docs/file-format.md). All are read; a
segment that lost its sidecar (a crash between the rename and the sidecar) is
read unverified.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pyodlog.io.columns import ColumnBatch, encode_str, missing_fillable, pad_to_columns
from pyodlog_protocol.files import (
    fsync_path as fsync_dir,  # a folder's fsync makes renames durable
)
from pyodlog_protocol.files import sha256_file

__all__ = [
    "CHECKSUM_SUFFIX",
    "SEGMENT_FORMAT",
    "SegmentWriter",
    "encode_strings",
    "fsync_dir",
    "quarantine_segment",
    "read_checksum",
    "reading_open_segment",
    "segment_name",
    "segment_rank",
    "sha256_file",
    "write_checksum",
]

log = logging.getLogger("pyodlog")

# 3: compact logits/embeddings (float16, bfloat16, uint8 + scale/offset), images/sample_weight,
# the aggregates dataset (pyodlog.io.aggregates); docs/file-format.md.
# 4: near-miss candidates (the near_misses group, images nm_*), uncertainty columns.
# 5: images/nm_score_dtype (a float16/bfloat16 head's thresholds round to its dtype in replay).
SEGMENT_FORMAT = 5
CHECKSUM_SUFFIX = ".sha256"
_READ_BLOCK = 1 << 20
# What each open segment of this process has completed and flushed, by real
# path: a reader in this process shares the writer's open HDF5 file and could
# otherwise see rows extended a moment before their data is written. The lock
# keeps a writer from closing its file while a reader of this process has it
# open (HDF5 would finish closing it, and write to it, only when the reader
# closes: after the rename and the checksum).
_COMMITTED: dict[str, dict[str, int]] = {}
_LIVE_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child writes none of its parent's segments, and its lock may have been held at the fork."""
    global _LIVE_LOCK
    _LIVE_LOCK = threading.Lock()
    _COMMITTED.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)

_RANK_IN_NAME = re.compile(r"^seg-\d+-r(\d+)-p\d+-")


def segment_name(time_ns: int, rank: int, pid: int, token: str, seq: int) -> str:
    """A segment's file name: sorts in creation order (nanoseconds first), names its rank and writer."""
    return f"seg-{time_ns:020d}-r{rank:03d}-p{pid}-{token}-{seq:06d}.h5"


def segment_rank(name: str) -> int | None:
    """The rank that wrote a segment, from its file name (None for another name)."""
    match = _RANK_IN_NAME.match(name)
    return int(match.group(1)) if match else None


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
    "images/gt_offset": "targets",  # ground truth (issue 15)
    "images/nm_offset": "near_misses",
}


def encode_strings(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A string column's bytes (uint8) and per-string byte lengths (int64).

    UTF-8 with ``surrogateescape``: a ``str`` that came from undecodable bytes
    (``os.fsdecode`` of a non-UTF-8 file name) is written back as those bytes,
    and reads back (decoded with ``surrogateescape``) as the same ``str``.
    """
    if texts and isinstance(texts[0], bytes):  # a ragged bytes column (thumbnails): as they are
        blobs: list[Any] = list(texts)
        lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
        return np.frombuffer(b"".join(blobs), dtype=np.uint8), lengths
    joined = "".join(texts)
    if joined.isascii():  # the common case: one encode, lengths in characters are bytes
        data = joined.encode("ascii")
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    else:
        encoded = [encode_str(t) for t in texts]  # lossless (surrogateescape)
        data = b"".join(encoded)
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    return np.frombuffer(data, dtype=np.uint8), lengths


def write_checksum(path: Path) -> Path | None:
    """Writes ``<path>.sha256`` (``'<hex>  <name>'``, like ``sha256sum``) atomically; None if it could not.

    A sidecar that cannot be written (a full disk) is not an error: the segment
    stays readable, unverified, like a segment of format 1.
    """
    sidecar = path.with_name(path.name + CHECKSUM_SUFFIX)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    try:
        text = f"{sha256_file(path)}  {path.name}\n".encode("ascii")
        fd = os.open(str(tmp), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, sidecar)
        return sidecar
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.warning(
            "pyodlog could not write the checksum of %s (%s): it will be read unverified",
            path,
            error,
        )
        return None


_SIDECAR_LINE = re.compile(rb"([0-9a-f]{64})  ([^\x00-\x1f/]+)\n")


def read_checksum(path: Path) -> str | None:
    """The SHA-256 that this segment's writer recorded in ``<path>.sha256`` at close, or None.

    For the uploader, which sends it instead of hashing the segment once more: it is
    returned only when the sidecar is what :func:`write_checksum` writes (one line
    ``'<hex>  <name>'`` naming this very file, a regular file, not a link) and was
    written after the segment's last change (a segment modified after its sidecar
    makes the sidecar stale). Anything else (missing, unreadable, foreign or stale)
    gives None: the caller hashes the file itself. The collector verifies the
    SHA-256 of every byte it receives, so a sidecar that still lies is refused there.
    """
    sidecar = path.with_name(path.name + CHECKSUM_SUFFIX)
    try:
        fd = os.open(str(sidecar), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 512:
            return None
        text = os.read(fd, 513)
        segment_mtime = os.stat(path).st_mtime_ns
    except OSError:
        return None
    finally:
        os.close(fd)
    match = _SIDECAR_LINE.fullmatch(text)
    if match is None or match.group(2) != os.fsencode(path.name):
        return None
    if info.st_mtime_ns < segment_mtime:  # the segment changed after its sidecar was written
        return None
    return match.group(1).decode("ascii")


@contextlib.contextmanager
def reading_open_segment(part: str | Path) -> Iterator[dict[str, int] | None]:
    """For a reader of a ``.part``: the rows its writer in this process completed and flushed.

    Yields None when no writer of this process has it open (another process's
    segment, or a crashed one). Otherwise the writer cannot close the segment
    until the block ends: read the file inside it.
    """
    _LIVE_LOCK.acquire()
    counts = _COMMITTED.get(os.path.realpath(part))
    if counts is None:
        _LIVE_LOCK.release()
        yield None
        return
    try:
        yield dict(counts)
    finally:
        _LIVE_LOCK.release()


def quarantine_segment(path: Path, reason: object) -> Path:
    """Moves a damaged closed segment (and its checksum) into ``quarantine/`` beside it, with a warning."""
    quarantine = path.parent / "quarantine"
    quarantine.mkdir(exist_ok=True)
    target = quarantine / path.name
    if target.exists():  # never replace what an earlier quarantine kept
        target = quarantine / f"{path.name}.{time.time_ns()}"
    os.replace(path, target)
    sidecar = path.with_name(path.name + CHECKSUM_SUFFIX)
    with contextlib.suppress(FileNotFoundError):
        os.replace(sidecar, target.with_name(target.name + CHECKSUM_SUFFIX))
    fsync_dir(path.parent)
    log.warning("pyodlog moved the damaged segment %s to %s: %s", path, quarantine, reason)
    return target


# Columns with rows at least this wide (logits, embeddings) get chunks of WIDE_CHUNK_BYTES: a
# batch of them is megabytes, written with a fourth as many write_direct_chunk calls.
WIDE_ROW_BYTES = 256
WIDE_CHUNK_BYTES = 256 << 10


def _rows_per_chunk(name: str, row_bytes: int, piece_rows: int = 0) -> int:
    """Rows per chunk of a column: about its target bytes (:data:`CHUNK_BYTES` for the feature
    payload, :data:`WIDE_CHUNK_BYTES` for wide rows, :data:`SMALL_CHUNK_BYTES` else).

    ``piece_rows``: rows of one call's piece of the column in the segment's first batch. When a
    divisor of it lies between a quarter of the target and the target, that is the chunk: calls
    of that size (every image at its quota, the common case under load; the same feature maps)
    then fill whole chunks, written straight from the call's array, with no copy through the
    column's tail buffer and no partial chunk written again at the next append.
    """
    if name == "features_payload":
        target_bytes = CHUNK_BYTES
    elif row_bytes >= WIDE_ROW_BYTES:
        target_bytes = WIDE_CHUNK_BYTES
    else:
        target_bytes = SMALL_CHUNK_BYTES
    target = int(max(64, min(1 << 20, target_bytes // max(row_bytes, 1))))
    low = max(64, target // 4)
    if piece_rows >= low:
        # piece_rows / k for k = 1, 2, ...: the first whole one in [low, target] is the largest.
        for k in range(max(1, -(-piece_rows // target)), piece_rows // low + 1):
            if piece_rows % k == 0:
                return piece_rows // k
    return target


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
            "targets": 0,
            "near_misses": 0,
        }
        self.nbytes = 0
        self._key = os.path.realpath(self.part)
        # Created under a third name and renamed once in SWMR mode: a crash before
        # that leaves a '.creating' file, which never held a record.
        creating = self.path.with_name(self.path.name + ".creating")
        self._file = h5py.File(creating, "w", libver="latest", rdcc_nbytes=8 * CHUNK_BYTES)
        for key, value in attrs.items():
            self._file.attrs[key] = (
                value if not isinstance(value, (dict, list)) else json.dumps(value)
            )
        self._file.attrs["segment_format"] = SEGMENT_FORMAT
        numeric, strings, _ = first.finish()
        self.numeric_columns = {
            name: (pieces[0].dtype, pieces[0].shape[1:]) for name, pieces in numeric.items()
        }
        self.string_columns = sorted(strings)
        for name, (dtype, row_shape) in self.numeric_columns.items():
            self._create(name, dtype, row_shape, len(first.numeric[name][0]))
        for name in self.string_columns:
            self._create(name + ".bytes", np.uint8, ())
            self._create(name + ".spans", np.int64, (2,))
        self._create(
            "features_payload", np.uint8, (), len(first.payload[0]) if first.payload else 0
        )
        self._create("aggregates", np.uint8, ())  # written at close (pyodlog.io.aggregates)
        for name in ("features_scale", "features_offset"):
            if name not in self.numeric_columns:
                self._create(name, np.float32, ())
                self.numeric_columns[name] = (np.dtype(np.float32), ())
        self._file.swmr_mode = True
        _COMMITTED[self._key] = dict(self.counts)  # known as ours before its name appears
        os.replace(creating, self.part)
        self._sync_fd: int | None = None

    def _create(self, name: str, dtype, row_shape, piece_rows: int = 0) -> None:
        row_bytes = int(np.dtype(dtype).itemsize * int(np.prod(row_shape, dtype=np.int64)))
        if not hasattr(self, "_datasets"):
            self._datasets: dict[str, Any] = {}
            self._lengths: dict[str, int] = {}
            self._tails: dict[str, np.ndarray] = {}
            # Per column, fixed at creation: (rows per chunk, dtype, row shape), read once here
            # rather than asked of h5py at every append.
            self._layout: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}
        rows = _rows_per_chunk(name, row_bytes, piece_rows)
        self._datasets[name] = self._file.create_dataset(
            name,
            shape=(0, *row_shape),
            maxshape=(None, *row_shape),
            dtype=dtype,
            chunks=(rows, *row_shape),
        )
        self._layout[name] = (rows, np.dtype(dtype), tuple(row_shape))
        self._lengths[name] = 0

    def accepts(self, batch: ColumnBatch) -> bool:
        """Whether the batch fits this segment's columns: each of its columns is one of the
        segment's, with the same row shape and a dtype that converts exactly, and the segment's
        columns it lacks are optional ones (filled as not logged, :func:`pad_to_columns`) or of a
        group it has no rows of. A batch with a column the segment lacks needs a new segment."""
        if not set(batch.strings) <= set(self.string_columns):
            return False
        for name, pieces in batch.numeric.items():
            spec = self.numeric_columns.get(name)
            if spec is None:
                return False
            dtype, row_shape = spec
            piece = pieces[0]
            if tuple(piece.shape[1:]) != tuple(row_shape) or not np.can_cast(
                piece.dtype, dtype, "safe"
            ):
                return False
        return missing_fillable(batch, set(self.numeric_columns), set(self.string_columns))

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
        dsid = self._datasets[name].id
        rows, dtype, row_shape = self._layout[name]
        tail = self._tails.get(name)
        if tail is None:
            tail = self._tails[name] = np.zeros((rows, *row_shape), dtype)
        length = self._lengths[name]
        dsid.set_extent(
            (length + total, *row_shape)
        )  # what Dataset.resize does, without its checks
        chunk, filled = divmod(length, rows)
        zeros = (0,) * len(row_shape)
        write = dsid.write_direct_chunk
        for piece in pieces:
            if piece.dtype != dtype or not piece.flags.c_contiguous:
                piece = np.ascontiguousarray(piece, dtype=dtype)
            pos = 0
            n = len(piece)
            if filled == 0 and n >= rows:  # whole chunks straight from the piece
                full = n - n % rows
                for pos in range(0, full, rows):
                    write((chunk * rows, *zeros), piece[pos : pos + rows])
                    chunk += 1
                pos = full
            while pos < n:
                if filled == 0 and n - pos >= rows:
                    write((chunk * rows, *zeros), piece[pos : pos + rows])
                    chunk, pos = chunk + 1, pos + rows
                    continue
                take = min(rows - filled, n - pos)
                tail[filled : filled + take] = piece[pos : pos + take]
                filled, pos = filled + take, pos + take
                if filled == rows:
                    write((chunk * rows, *zeros), tail)
                    chunk, filled = chunk + 1, 0
        if filled:
            write((chunk * rows, *zeros), tail)
        self._lengths[name] = length + total

    def append(self, batch: ColumnBatch) -> None:
        """Writes a batch (one resize + one write per column) and flushes it."""
        numeric, strings, payload = batch.finish()
        # The first batch made the columns; a later one may lack optional ones (accepts()).
        strings = dict(strings)
        pad_to_columns(batch, numeric, strings, self.numeric_columns, self.string_columns)
        for name, pieces in numeric.items():
            base = _SHIFTS.get(name)
            if base is not None:
                pieces = [p + self.counts[base] for p in pieces]
            self._append(name, pieces)
        for name, texts in strings.items():
            data, lengths = encode_strings(texts)
            start = self._lengths[name + ".bytes"]
            starts = start + np.cumsum(lengths) - lengths
            self._append(name + ".bytes", data)
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
        self.counts["targets"] += sum(len(p) for p in numeric.get("targets/labels", []))
        self.counts["near_misses"] += batch.n_near_misses
        self.nbytes += batch.nbytes
        _COMMITTED[self._key] = dict(self.counts)

    def sync(self) -> None:
        """Makes everything flushed so far durable (h5py's flush never fsyncs)."""
        if self._sync_fd is None:
            self._sync_fd = os.open(str(self.part), os.O_RDONLY)
        os.fsync(self._sync_fd)

    def close(self) -> Path:
        """Closes, fsyncs, renames to ``.h5``, writes its checksum, fsyncs the folder; returns the final path."""
        with _LIVE_LOCK:  # no reader of this process has the file open now
            _COMMITTED.pop(self._key, None)
            self._file.close()
            if self._sync_fd is None:
                self._sync_fd = os.open(str(self.part), os.O_RDONLY)
            os.fsync(self._sync_fd)
            os.close(self._sync_fd)
            self._sync_fd = None
            os.replace(self.part, self.path)
        # After the rename: a crash in between leaves an .h5 read unverified, never a stale checksum.
        write_checksum(self.path)
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
        _COMMITTED.pop(self._key, None)
        _ABANDONED.append(self._file)
        self._file = None
        self._sync_fd = None


_ABANDONED: list[Any] = []
