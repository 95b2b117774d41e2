"""The collector's strict check of an uploaded segment: pyodlog's HDF5 layout and nothing else.

A segment comes from a tenant, and the operator later reads it (``pyodlog
export``). HDF5 can make a file read other files: external storage of a
dataset (``dset.external``), external links, virtual datasets. So a segment is
accepted only when it holds exactly what pyodlog's writer produces
(``pyodlog/io/segment.py``, ``pyodlog/io/columns.py``):

* groups ``images``, ``images/fields``, ``detections``, ``features``, reached by hard links only;
* the known datasets with their dtypes and row shapes (``images/fields/<name>``:
  numbers, booleans or strings), plain contiguous or chunked storage without
  filters, every byte stored in the file (no bytes read from fill values);
* root attributes of plain types (numbers, strings), none elsewhere;
* index columns that point inside the file's own tables (offsets, counts,
  string spans on character boundaries).

Anything else (external storage, external or soft links, virtual datasets,
committed datatypes, references, compound types, unknown names) is refused
with the reason. This module does not import pyodlog or torch; h5py and numpy
are imported on first use. The collector runs the check in worker processes
(:class:`SegmentChecker`), so a file that crashes the HDF5 library ends a
worker, not the collector.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["InvalidSegment", "SegmentChecker", "check_segment"]

# Numeric columns: (dtype, row shape); None in a row shape is any length >= 0.
_NUMERIC: dict[str, tuple[str | tuple[str, ...], tuple[int | None, ...]]] = {
    "images/det_offset": ("<i8", ()),
    "images/det_count": ("<i8", ()),
    "images/n_epoch": ("<i8", ()),
    "images/timestamp": ("<f8", ()),
    "images/image_size": ("<i4", (2,)),
    "detections/boxes": ("<f4", (4,)),
    "detections/scores": ("<f4", ()),
    "detections/labels": ("<i8", ()),
    "detections/candidate_index": ("<i8", ()),
    "detections/logits": ("<f4", (None,)),
    "detections/embeddings": ("<f4", (None,)),
    "features/image_row": ("<i8", ()),
    "features/method": ("|i1", ()),
    "features/per_image": ("|i1", ()),
    "features/shape": ("<i8", (8,)),
    "features/original_shape": ("<i8", (8,)),
    "features/pooled_to": ("<i8", (2,)),
    "features/payload_offset": ("<i8", ()),
    "features/payload_nbytes": ("<i8", ()),
    "features/qrow_offset": ("<i8", ()),
    "features/qrow_count": ("<i8", ()),
    "features_payload": ("|u1", ()),
    "features_scale": ("<f4", ()),
    "features_offset": ("<f4", ()),
    # Ground truth (targets=, issue 15): only in segments of calls that passed it.
    "images/gt_offset": ("<i8", ()),
    "images/gt_count": ("<i8", ()),
    "images/gt_logged": ("|i1", ()),
    "targets/boxes": ("<f4", (4,)),
    "targets/labels": ("<i8", ()),
}
# Segment format 3 (pyodlog/io/columns.py, pyodlog/io/aggregates.py): compact logits and
# embeddings (float16, bfloat16 as uint16, uint8 codes with a per-row float32 scale and offset),
# the images' sample_weight, and the always-on aggregates (UTF-8 JSON bytes).
_COMPACT_ROWS = ("<f4", "<f2", "<u2", "|u1")
_NUMERIC.update(
    {
        "detections/logits": (_COMPACT_ROWS, (None,)),
        "detections/embeddings": (_COMPACT_ROWS, (None,)),
        "detections/logits_scale": ("<f4", ()),
        "detections/logits_offset": ("<f4", ()),
        "detections/embeddings_scale": ("<f4", ()),
        "detections/embeddings_offset": ("<f4", ()),
        "images/sample_weight": ("<f4", ()),
        "aggregates": ("|u1", ()),
    }
)
# Segment format 4 (issue 14): per-detection uncertainty, near-miss candidates (their own table, in
# the storage precision of the detections) and each image's replay envelope.
_NUMERIC.update(
    {
        "detections/entropy": ("<f4", ()),
        "detections/margin": ("<f4", ()),
        "detections/energy": ("<f4", ()),
        "images/nm_offset": ("<i8", ()),
        "images/nm_count": ("<i8", ()),
        "images/nm_exhausted": ("|i1", ()),
        "images/nm_floor": ("<f8", ()),
        "images/nm_k": ("<i8", ()),
        "images/nm_score_thresh": ("<f8", ()),
        "images/nm_iou_thresh": ("<f8", ()),
        "images/nm_max_detections": ("<i8", ()),
        "near_misses/boxes": ("<f4", (4,)),
        "near_misses/scores": ("<f4", ()),
        "near_misses/labels": ("<i8", ()),
        "near_misses/candidate_index": ("<i8", ()),
        "near_misses/logits": (_COMPACT_ROWS, (None,)),
        "near_misses/embeddings": (_COMPACT_ROWS, (None,)),
        "near_misses/logits_scale": ("<f4", ()),
        "near_misses/logits_offset": ("<f4", ()),
        "near_misses/embeddings_scale": ("<f4", ()),
        "near_misses/embeddings_offset": ("<f4", ()),
        "near_misses/entropy": ("<f4", ()),
        "near_misses/margin": ("<f4", ()),
        "near_misses/energy": ("<f4", ()),
        "near_misses/reason": ("|u1", ()),
        "near_misses/suppressed_by": ("<i8", ()),
        "near_misses/suppressor_iou": ("<f4", ()),
    }
)
# Segment format 5: the dtype each image's model compared its scores in (replay rounds to it).
_NUMERIC["images/nm_score_dtype"] = ("|u1", ())
# String columns, stored as '<name>.bytes' (uint8) and '<name>.spans' (int64 [offset, length]).
_STRINGS = (
    "images/input_id",
    "images/dataset_type",
    "features/name",
    "features/dtype",
    "features/payload_dtype",
)
# Ragged bytes columns (not text): one JPEG thumbnail per image (log_images), stored like strings.
_BLOBS = ("images/thumbnail",)
_FIELD_DTYPES = ("<i4", "<i8", "<f4", "<f8", "|b1")
_FIELD_NAME = re.compile(r"[^/]{1,256}")
_REQUIRED = (
    "images/det_offset",
    "images/det_count",
    "images/n_epoch",
    "images/timestamp",
    "images/image_size",
    "images/input_id.spans",
    "detections/boxes",
    "detections/scores",
    "detections/labels",
    "detections/candidate_index",
    "detections/logits",
    "features_payload",
    "features_scale",
    "features_offset",
)
_FEATURE_COLUMNS = tuple(n for n in _NUMERIC if n.startswith("features/")) + tuple(
    s + ".spans" for s in _STRINGS if s.startswith("features/")
)
_INDEX = (
    "images/det_offset",
    "images/det_count",
    "features/image_row",
    "features/method",
    "features/payload_offset",
    "features/payload_nbytes",
    "features/qrow_offset",
    "features/qrow_count",
    "images/gt_offset",
    "images/gt_count",
    "images/nm_offset",
    "images/nm_count",
)
_RAGGED = (".bytes", ".spans")
_GROUPS = {
    "": ("images", "detections", "features", "targets", "near_misses"),
    "images": ("fields",),
}
MAX_OBJECTS = 4096
MAX_ATTRIBUTE_BYTES = 1 << 20


class InvalidSegment(ValueError):
    """The file is not a segment pyodlog's writer produces; the message says what is wrong."""


def _string_spec(name: str) -> tuple[str, tuple[int, ...]] | None:
    if name.endswith(".bytes"):
        return ("|u1", ())
    if name.endswith(".spans"):
        return ("<i8", (2,))
    return None


def _spec(name: str) -> tuple[str | tuple[str, ...], tuple[int | None, ...]] | None:
    """The allowed dtype(s) and row shape of dataset ``name``, or None for an unknown name."""
    if name in _NUMERIC:
        return _NUMERIC[name]
    base, _, suffix = name.rpartition(".")
    if (base in _STRINGS or base in _BLOBS) and suffix in ("bytes", "spans"):
        return _string_spec(name)
    if name.startswith("images/fields/"):
        field = name[len("images/fields/") :]
        if _FIELD_NAME.fullmatch(field) is None:
            return None
        if field.endswith((".bytes", ".spans")):
            return _string_spec(field)
        return (_FIELD_DTYPES, ())
    return None


def _walk(h5py, f) -> dict[str, Any]:
    """Every dataset by path; refuses links other than hard links and objects other than the known groups."""
    datasets: dict[str, Any] = {}
    count = 0

    def visit(group, prefix: str) -> None:
        nonlocal count
        for raw_name in group:
            count += 1
            if count > MAX_OBJECTS:
                raise InvalidSegment(f"more than {MAX_OBJECTS} objects")
            path = f"{prefix}{raw_name}"
            link = group.get(raw_name, getlink=True)
            if isinstance(link, h5py.SoftLink):
                raise InvalidSegment(f"{path!r} is a soft link")
            if isinstance(link, h5py.ExternalLink):
                raise InvalidSegment(f"{path!r} is an external link (to another file)")
            if not isinstance(link, h5py.HardLink):
                raise InvalidSegment(f"{path!r} is a link of an unknown kind")
            kind = group.get(raw_name, getclass=True)
            if kind is h5py.Group:
                if raw_name not in _GROUPS.get(prefix.rstrip("/"), ()):
                    raise InvalidSegment(f"unexpected group {path!r}")
                sub = group[raw_name]
                if len(sub.attrs):
                    raise InvalidSegment(f"group {path!r} has attributes")
                visit(sub, path + "/")
            elif kind is h5py.Dataset:
                datasets[path] = group[raw_name]
            else:
                raise InvalidSegment(f"{path!r} is neither a group nor a dataset")

    visit(f, "")
    return datasets


def _check_dataset(h5py, name: str, dset) -> int:
    """Checks one dataset's storage, dtype and shape; returns its size in bytes."""
    spec = _spec(name)
    if spec is None:
        raise InvalidSegment(f"unknown dataset {name!r}")
    if dset.is_virtual:
        raise InvalidSegment(f"dataset {name!r} is a virtual dataset (reads other files)")
    if dset.external:
        raise InvalidSegment(f"dataset {name!r} has external storage (reads other files)")
    plist = dset.id.get_create_plist()
    if plist.get_external_count():
        raise InvalidSegment(f"dataset {name!r} has external storage (reads other files)")
    layout = plist.get_layout()
    if layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED):
        raise InvalidSegment(f"dataset {name!r} has an unexpected storage layout ({layout})")
    if plist.get_nfilters():
        raise InvalidSegment(f"dataset {name!r} has filters (pyodlog writes none)")
    if len(dset.attrs):
        raise InvalidSegment(f"dataset {name!r} has attributes")
    dtypes, row_shape = spec
    dtype = dset.dtype
    if dtype.str not in ((dtypes,) if isinstance(dtypes, str) else dtypes) or dtype.fields:
        raise InvalidSegment(f"dataset {name!r} has dtype {dtype.str}, expected {dtypes}")
    shape = dset.shape
    if shape is None or len(shape) != 1 + len(row_shape):
        raise InvalidSegment(f"dataset {name!r} has shape {shape}, expected (rows, *{row_shape})")
    for got, want in zip(shape[1:], row_shape):
        if want is not None and got != want:
            raise InvalidSegment(
                f"dataset {name!r} has shape {shape}, expected rows of {row_shape}"
            )
    nbytes = int(dset.size) * dtype.itemsize
    if nbytes and dset.id.get_storage_size() < nbytes:
        raise InvalidSegment(f"dataset {name!r} has rows that are not stored in the file")
    return nbytes


def _check_attributes(h5py, f) -> None:
    total = 0
    for name in f.attrs:
        attr = f.attrs.get_id(name)
        dtype = attr.dtype
        if h5py.check_ref_dtype(dtype) is not None or dtype.fields:
            raise InvalidSegment(f"attribute {name!r} has an unexpected type")
        if h5py.check_string_dtype(dtype) is None and (
            dtype.kind not in "biufS" or h5py.check_vlen_dtype(dtype) is not None
        ):
            raise InvalidSegment(f"attribute {name!r} has an unexpected type ({dtype})")
        value = f.attrs[name]
        total += len(value) if isinstance(value, (str, bytes)) else getattr(value, "nbytes", 8)
        if total > MAX_ATTRIBUTE_BYTES:
            raise InvalidSegment(f"the attributes hold more than {MAX_ATTRIBUTE_BYTES} bytes")


def _check_tables(np, data: dict[str, Any], lengths: dict[str, int]) -> None:
    """Column lengths agree per table and every index points inside the file's tables."""

    def rows(name: str) -> int:
        return lengths[name]

    for table in ("images/", "detections/", "features/", "targets/", "near_misses/"):
        names = [n for n in lengths if n.startswith(table) and not n.endswith(".bytes")]
        if len({rows(n) for n in names}) > 1:
            raise InvalidSegment(
                f"the {table.rstrip('/')} columns have different lengths: "
                + ", ".join(f"{n}={rows(n)}" for n in sorted(names))
            )
    if rows("features_scale") != rows("features_offset"):
        raise InvalidSegment("features_scale and features_offset have different lengths")
    features = [n for n in _FEATURE_COLUMNS if n in lengths]
    if features and len(features) != len(_FEATURE_COLUMNS):
        missing = sorted(set(_FEATURE_COLUMNS) - set(features))
        raise InvalidSegment(f"feature columns are missing: {', '.join(missing)}")

    def within(offset, count, end: int, what: str) -> None:
        if len(offset) and (
            int(offset.min()) < 0 or int(count.min()) < 0 or int((offset + count).max()) > end
        ):
            raise InvalidSegment(f"{what} points outside its table")

    n_images, n_detections = rows("images/det_count"), rows("detections/scores")
    within(data["images/det_offset"], data["images/det_count"], n_detections, "images/det_offset")
    if "images/gt_offset" in lengths or "targets/labels" in lengths:
        if not {"images/gt_offset", "images/gt_count", "targets/boxes", "targets/labels"} <= set(
            lengths
        ):
            raise InvalidSegment("ground-truth columns are missing (images/gt_*, targets/*)")
        within(
            data["images/gt_offset"],
            data["images/gt_count"],
            rows("targets/labels"),
            "images/gt_offset",
        )
    if "images/nm_offset" in lengths or "near_misses/scores" in lengths:
        if not {"images/nm_offset", "images/nm_count", "near_misses/scores"} <= set(lengths):
            raise InvalidSegment("near-miss columns are missing (images/nm_*, near_misses/*)")
        within(
            data["images/nm_offset"],
            data["images/nm_count"],
            rows("near_misses/scores"),
            "images/nm_offset",
        )
    if features:
        image_row = data["features/image_row"]
        if len(image_row) and (int(image_row.min()) < 0 or int(image_row.max()) >= n_images):
            raise InvalidSegment("features/image_row points outside the images table")
        within(
            data["features/payload_offset"],
            data["features/payload_nbytes"],
            rows("features_payload"),
            "features/payload_offset",
        )
        within(
            data["features/qrow_offset"],
            data["features/qrow_count"],
            rows("features_scale"),
            "features/qrow_offset",
        )
        if len(data["features/method"]) and int(data["features/method"].min()) < 0:
            raise InvalidSegment("features/method holds a negative method")
    for spans_name in [n for n in data if n.endswith(".spans")]:
        base = spans_name[: -len(".spans")]
        if base + ".bytes" not in data:
            raise InvalidSegment(f"{base}.spans has no {base}.bytes")
        raw, spans = data[base + ".bytes"], data[spans_name]
        within(spans[:, 0], spans[:, 1], len(raw), spans_name)
        if base in _BLOBS:  # bytes, not text
            continue
        try:
            raw.tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidSegment(f"{base}.bytes is not UTF-8 text") from None
        # Every string starts and ends on a character boundary (not inside a UTF-8 sequence).
        continuation = np.append((raw & 0xC0) == 0x80, False)
        if len(spans) and (
            continuation[spans[:, 0]].any() or continuation[spans[:, 0] + spans[:, 1]].any()
        ):
            raise InvalidSegment(f"{spans_name} cuts a character of {base}.bytes")
    for name in [n for n in data if n.endswith(".bytes")]:
        if name[: -len(".bytes")] + ".spans" not in data:
            raise InvalidSegment(f"{name} has no spans column")


def check_segment(path: str | Path) -> None:
    """Raises :class:`InvalidSegment` unless ``path`` holds exactly pyodlog's segment layout.

    Reads the file's structure and its small index columns (never the feature
    payload); nothing outside the file is opened.
    """
    import h5py
    import numpy as np

    size = os.path.getsize(path)
    try:
        with h5py.File(path, "r") as f:
            _check_attributes(h5py, f)
            datasets = _walk(h5py, f)
            missing = [n for n in _REQUIRED if n not in datasets]
            if missing:
                raise InvalidSegment(f"required columns are missing: {', '.join(missing)}")
            total = 0
            lengths: dict[str, int] = {}
            for name, dset in datasets.items():
                total += _check_dataset(h5py, name, dset)
                lengths[name] = dset.shape[0]
            if total > size:  # no filters: every byte of every column is in the file, once
                raise InvalidSegment(f"the columns hold {total} bytes, more than the file's {size}")
            # The index columns only (small): never the payload, the detections or numeric fields.
            data = {n: datasets[n][()] for n in datasets if n in _INDEX or n.endswith(_RAGGED)}
            _check_tables(np, data, lengths)
    except InvalidSegment:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise InvalidSegment(f"not a readable HDF5 file ({error.__class__.__name__})") from None


def _serve() -> int:
    """The worker loop of :class:`SegmentChecker`: one path per line in, one JSON line out."""
    for line in sys.stdin:
        path = line.rstrip("\n")
        try:
            check_segment(path)
            answer: dict[str, object] = {"ok": True}
        except InvalidSegment as error:
            answer = {"ok": False, "reason": str(error)}
        except Exception as error:  # the check itself failed: refuse rather than guess
            answer = {"ok": False, "reason": f"the check failed ({error.__class__.__name__})"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


class SegmentChecker:
    """Runs :func:`check_segment` in worker processes, so that no file can harm the collector.

    HDF5 is a large C library: a crafted file that crashes it or makes it spin
    ends a worker (killed after ``timeout`` seconds), never the collector, and
    the file is refused. Up to ``workers`` checks run at once; workers are
    started when needed and reused.

    Args:
        workers: checks that may run at once.
        timeout: seconds one check may take.
        command: the worker's command line (default: this module's worker loop).
    """

    def __init__(
        self, workers: int = 2, timeout: float = 120.0, command: list[str] | None = None
    ) -> None:
        self.workers, self.timeout = int(workers), float(timeout)
        self.command = command or [sys.executable, "-m", "pyodlog_collector.segment_check"]
        self._idle: list[subprocess.Popen] = []
        self._started = 0
        self._cond = threading.Condition()
        self._closed = False

    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ)
        # The worker imports this package from where the collector found it.
        package_parent = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        return subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )

    def check(self, path: str | Path) -> str | None:
        """None if ``path`` is a valid segment, else why not.

        Raises:
            OSError: no worker could be started (the collector's trouble, not the file's).
        """
        for _ in range(2):
            worker, fresh = self._acquire()
            try:
                answer = self._ask(worker, str(path))
            except (OSError, ValueError):
                answer = None
            if answer is not None:
                self._release(worker)
                return None if answer.get("ok") is True else str(answer.get("reason", "refused"))
            self._discard(worker)
            if (
                fresh
            ):  # a worker that died while idle is replaced once; a fresh one failed on this file
                break
        return (
            f"the segment check did not finish within {self.timeout:g}s or its worker "
            "crashed: not a file this collector can read safely"
        )

    def _acquire(self) -> tuple[subprocess.Popen, bool]:
        with self._cond:
            while not self._idle and self._started >= self.workers:
                self._cond.wait()
            if self._idle:
                return self._idle.pop(), False
            self._started += 1
        try:
            return self._spawn(), True
        except BaseException:
            with self._cond:
                self._started -= 1
                self._cond.notify()
            raise

    def _release(self, worker: subprocess.Popen) -> None:
        with self._cond:
            if not self._closed:
                self._idle.append(worker)
                self._cond.notify()
                return
        self._discard(worker)

    def _discard(self, worker: subprocess.Popen) -> None:
        worker.kill()
        worker.wait()
        for stream in (worker.stdin, worker.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with self._cond:
            self._started -= 1
            self._cond.notify()

    def _ask(self, worker: subprocess.Popen, path: str) -> dict | None:
        stdin, stdout = worker.stdin, worker.stdout
        assert stdin is not None and stdout is not None  # started with PIPEs
        stdin.write(path.encode() + b"\n")
        stdin.flush()
        deadline = time.monotonic() + self.timeout
        fd = stdout.fileno()
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            block = os.read(fd, 65536)
            if not block:
                return None
            data += block
        try:
            answer = json.loads(data)
        except ValueError:
            return None
        return answer if isinstance(answer, dict) else None

    def close(self) -> None:
        """Stops the idle workers (a check in progress finishes, then its worker stops)."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            self._discard(worker)


if __name__ == "__main__":
    sys.exit(_serve())
