"""Reading logged records back: segment files, result folders and exported ZIPs.

Nothing read is trusted. A segment is opened read-only and checked before any
data is read: only the groups and datasets pyodlog writes, with their dtypes
and shapes, stored in the file itself (no external storage, soft or external
links, virtual datasets or filters), no dataset larger than the file. Its
columns must then agree with each other (offsets contiguous and in range). A
closed segment's SHA-256 sidecar (``<segment>.h5.sha256``, or the collector's
``.meta/<segment>.json``) is verified before it is opened. An exported ZIP's
members are size-limited before anything is expanded and checked against the
SHA-256 of its manifest. Any failure is a :class:`CorruptResultError` naming
the file or member.

Open segments (``.h5.part``, a live writer's or a crashed one's) are read
through HDF5's SWMR reader without taking the writer's lock or changing the
file, and trimmed to their complete images.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from pyodlog.io.aggregates import Aggregates
from pyodlog.io.columns import NOT_LOGGED, NOT_LOGGED_BLOBS, SCORE_DTYPES, not_logged_rows
from pyodlog.io.rows import DEFAULT_CHUNK_ROWS, progress_bar, ranges
from pyodlog.io.segment import (
    CHECKSUM_SUFFIX,
    SEGMENT_FORMAT,
    reading_open_segment,
    sha256_file,
)
from pyodlog.ops.compression import METHODS, CompressedFeature, widen_rows
from pyodlog.structures import DetectionOutput
from pyodlog_protocol.layout import META, meta_path

__all__ = [
    "CorruptResultError",
    "ResultData",
    "ResultView",
    "merge_tables",
    "open_result",
    "read_epochs",
    "read_segment",
    "trim_to_consistent",
    "verify_checksum",
]

MAX_JSON_BYTES = 16 << 20  # manifest.json, result.json, checksum sidecars
MAX_MEMBER_BYTES = 1 << 40  # records.h5 of an exported ZIP
MAX_COMPRESSION_RATIO = 100  # pyodlog writes its ZIPs stored (ratio 1)
_READ_BLOCK = 1 << 20
# A live segment's datasets may be extended a moment before their chunks reach
# the file: how far beyond the file size an open (.part) segment's data may go.
_PART_SLACK_BYTES = 64 << 20


class CorruptResultError(ValueError):
    """A segment, result or exported ZIP is damaged or is not what pyodlog writes.

    The message names the file (or the ZIP member) and what is wrong with it.
    """


# -- what a segment may contain -----------------------------------------------------------------

_GROUPS = {"images", "images/fields", "detections", "features", "targets", "near_misses"}
_I8, _I32, _I64 = np.dtype(np.int8), np.dtype(np.int32), np.dtype(np.int64)
_F32, _F64, _U8 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.uint8)
# Compact per-detection rows (segment format 3): float16, bfloat16 as its uint16 pattern, uint8 codes.
_F16, _U16 = np.dtype(np.float16), np.dtype(np.uint16)
_COMPACT: set[np.dtype] = {_F32, _F16, _U16, _U8}
_FLOATS: set[np.dtype] = {np.dtype(np.float16), _F32, _F64}
# name: (allowed dtypes, row shape; None in a row shape: any length)
_NUMERIC: dict[str, tuple[set[np.dtype], tuple[int | None, ...]]] = {
    "images/det_offset": ({_I64}, ()),
    "images/det_count": ({_I64}, ()),
    "images/n_epoch": ({_I64}, ()),
    "images/timestamp": ({_F64}, ()),
    "images/image_size": ({_I32, _I64}, (2,)),
    "detections/boxes": ({_F32}, (4,)),
    "detections/scores": ({_F32}, ()),
    "detections/labels": ({_I64}, ()),
    "detections/candidate_index": ({_I64}, ()),
    "detections/logits": (_COMPACT, (None,)),
    "detections/embeddings": (_COMPACT, (None,)),
    "detections/logits_scale": ({_F32}, ()),
    "detections/logits_offset": ({_F32}, ()),
    "detections/embeddings_scale": ({_F32}, ()),
    "detections/embeddings_offset": ({_F32}, ()),
    "images/sample_weight": ({_F32}, ()),
    "aggregates": ({_U8}, ()),
    "features/image_row": ({_I64}, ()),
    "features/method": ({_I8}, ()),
    "features/per_image": ({_I8}, ()),
    "features/shape": ({_I64}, (8,)),
    "features/original_shape": ({_I64}, (8,)),
    "features/pooled_to": ({_I64}, (2,)),
    "features/payload_offset": ({_I64}, ()),
    "features/payload_nbytes": ({_I64}, ()),
    "features/qrow_offset": ({_I64}, ()),
    "features/qrow_count": ({_I64}, ()),
    "features_payload": ({_U8}, ()),
    "features_scale": (_FLOATS, ()),
    "features_offset": (_FLOATS, ()),
    # Ground truth (issue 15): only in segments of calls that passed targets=.
    "images/gt_offset": ({_I64}, ()),
    "images/gt_count": ({_I64}, ()),
    "images/gt_logged": ({_I8}, ()),
    "targets/boxes": ({_F32}, (4,)),
    "targets/labels": ({_I64}, ()),
    # segment format 3: uncertainty, near-misses and their envelope (all optional)
    "detections/entropy": ({_F32}, ()),
    "detections/margin": ({_F32}, ()),
    "detections/energy": ({_F32}, ()),
    "images/nm_offset": ({_I64}, ()),
    "images/nm_count": ({_I64}, ()),
    "images/nm_exhausted": ({_I8}, ()),
    "images/nm_floor": ({_F64}, ()),
    "images/nm_k": ({_I64}, ()),
    "images/nm_score_thresh": ({_F64}, ()),
    "images/nm_iou_thresh": ({_F64}, ()),
    "images/nm_max_detections": ({_I64}, ()),
    # segment format 5: the dtype the model compared its scores in (optional: format 4 has none)
    "images/nm_score_dtype": ({_U8}, ()),
    "near_misses/boxes": ({_F32}, (4,)),
    "near_misses/scores": ({_F32}, ()),
    "near_misses/labels": ({_I64}, ()),
    "near_misses/candidate_index": ({_I64}, ()),
    "near_misses/logits": (_COMPACT, (None,)),
    "near_misses/embeddings": (_COMPACT, (None,)),
    "near_misses/logits_scale": ({_F32}, ()),
    "near_misses/logits_offset": ({_F32}, ()),
    "near_misses/embeddings_scale": ({_F32}, ()),
    "near_misses/embeddings_offset": ({_F32}, ()),
    "near_misses/entropy": ({_F32}, ()),
    "near_misses/margin": ({_F32}, ()),
    "near_misses/energy": ({_F32}, ()),
    "near_misses/reason": ({_U8}, ()),
    "near_misses/suppressed_by": ({_I64}, ()),
    "near_misses/suppressor_iou": ({_F32}, ()),
}
_TARGET_COLUMNS = {
    "images/gt_offset",
    "images/gt_count",
    "images/gt_logged",
    "targets/boxes",
    "targets/labels",
}
# The columns a segment with near-misses has (all or none of them).
_NEAR_MISS_REQUIRED = {
    "images/nm_offset",
    "images/nm_count",
    "images/nm_exhausted",
    "images/nm_floor",
    "images/nm_k",
    "images/nm_score_thresh",
    "images/nm_iou_thresh",
    "images/nm_max_detections",
    "near_misses/boxes",
    "near_misses/scores",
    "near_misses/labels",
    "near_misses/candidate_index",
    "near_misses/logits",
    "near_misses/reason",
    "near_misses/suppressed_by",
    "near_misses/suppressor_iou",
}
_STRINGS = {
    "images/input_id",
    "images/dataset_type",
    "features/name",
    "features/dtype",
    "features/payload_dtype",
}
# Ragged bytes columns: stored like strings, read back as bytes (never decoded).
_BLOBS = {"images/thumbnail"}
_REQUIRED = {
    "images": {
        "images/det_offset",
        "images/det_count",
        "images/n_epoch",
        "images/timestamp",
        "images/image_size",
        "images/input_id",
        "images/dataset_type",
    },
    "detections": {
        "detections/boxes",
        "detections/scores",
        "detections/labels",
        "detections/candidate_index",
        "detections/logits",
    },
    "features": {
        "features/image_row",
        "features/method",
        "features/per_image",
        "features/shape",
        "features/original_shape",
        "features/pooled_to",
        "features/payload_offset",
        "features/payload_nbytes",
        "features/qrow_offset",
        "features/qrow_count",
        "features/name",
        "features/dtype",
        "features/payload_dtype",
    },
    "targets": {"targets/boxes", "targets/labels"},
}
# What a feature's tensors may be: names read from a file never reach getattr() unchecked.
_PAYLOAD_DTYPES = {
    "bool": np.bool_,
    "uint8": np.uint8,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "float16": np.float16,
    "bfloat16": np.uint16,
    "float32": np.float32,
    "float64": np.float64,
}
_TORCH_DTYPES = set(_PAYLOAD_DTYPES)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _column_spec(name: str) -> tuple[str, set[np.dtype] | None, tuple[int | None, ...]] | None:
    """(column, dtypes, row shape) of a dataset name pyodlog writes; None if it writes no such name."""
    for suffix, dtypes, row in ((".bytes", {_U8}, ()), (".spans", {_I64}, (2,))):
        if name.endswith(suffix):
            column = name[: -len(suffix)]
            if column in _STRINGS or column in _BLOBS or _is_field(column):
                return column, dtypes, row
            return None
    if name in _NUMERIC:
        return (name, *_NUMERIC[name])
    if _is_field(name):
        return name, None, ()  # a numeric additional field: bool, int or float
    return None


def _is_field(name: str) -> bool:
    return name.startswith("images/fields/") and "/" not in name[len("images/fields/") :]


@dataclass
class Tables:
    """The columns of one or more segments: numeric arrays, decoded strings, the feature payload."""

    numeric: dict[str, np.ndarray] = field(default_factory=dict)
    strings: dict[str, list[str]] = field(default_factory=dict)
    payload: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint8))
    attrs: dict[str, Any] = field(default_factory=dict)
    #: The always-on aggregates each closed segment carries (pyodlog.io.aggregates), unmerged.
    aggregates: list[Aggregates] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return (
            int(self.numeric["images/det_count"].shape[0])
            if "images/det_count" in self.numeric
            else 0
        )


# -- one segment file ---------------------------------------------------------------------------


def _open_h5(path: Path, swmr: bool, label: str) -> h5py.File:
    try:
        return h5py.File(path, "r", swmr=swmr, libver="latest" if swmr else "earliest")
    except FileNotFoundError:
        raise
    except Exception as error:
        raise CorruptResultError(
            f"{label} is not a readable HDF5 file ({error}): it is truncated, overwritten or not "
            f"a pyodlog segment"
        ) from error


def _check_dataset(ds: h5py.Dataset, name: str, spec, label: str) -> None:
    """Refuses, before any data is read, what pyodlog never writes."""
    dcpl = ds.id.get_create_plist()
    if ds.is_virtual or dcpl.get_layout() not in (
        h5py.h5d.CONTIGUOUS,
        h5py.h5d.CHUNKED,
        h5py.h5d.COMPACT,
    ):
        raise CorruptResultError(
            f"{label}: {name!r} is a virtual dataset (its data would come from other files): "
            f"pyodlog never writes one, refusing to read it"
        )
    if dcpl.get_external_count():
        raise CorruptResultError(
            f"{label}: {name!r} keeps its data in an external file ({dcpl.get_external(0)[0]!r}): "
            f"pyodlog stores every dataset in the segment itself, refusing to read it"
        )
    if dcpl.get_nfilters():
        raise CorruptResultError(
            f"{label}: {name!r} uses HDF5 filters (compression or plugins): pyodlog writes none"
        )
    _, dtypes, row = spec
    dtype = ds.dtype
    if dtypes is None:
        ok = dtype.kind in "biuf" and dtype.isnative and not dtype.fields and not dtype.subdtype
    else:
        ok = dtype in dtypes
    if not ok:
        raise CorruptResultError(
            f"{label}: {name!r} has dtype {dtype}, pyodlog writes "
            f"{'a bool, int or float' if dtypes is None else sorted(map(str, dtypes))}"
        )
    shape = ds.shape
    if (
        shape is None
        or len(shape) != 1 + len(row)
        or any(want is not None and got != want for got, want in zip(shape[1:], row))
    ):
        raise CorruptResultError(
            f"{label}: {name!r} has shape {shape}, pyodlog writes rows of shape {row}"
        )


def _dataset_names(f: h5py.File, label: str, max_bytes: int) -> list[str]:
    """Every dataset of the file after checking the file holds only the segment layout."""
    found: list[str] = []
    total = 0

    def walk(group: h5py.Group, prefix: str) -> None:
        nonlocal total
        for key in list(group):
            name = prefix + key
            link = group.get(key, getlink=True)
            if not isinstance(link, h5py.HardLink):
                raise CorruptResultError(
                    f"{label}: {name!r} is a {type(link).__name__} (to another place or file): pyodlog "
                    f"stores every dataset in the segment itself, refusing to follow it"
                )
            obj = group[key]
            if isinstance(obj, h5py.Group):
                if name not in _GROUPS:
                    raise CorruptResultError(
                        f"{label}: unexpected group {name!r} (a segment has {sorted(_GROUPS)})"
                    )
                walk(obj, name + "/")
            elif isinstance(obj, h5py.Dataset):
                spec = _column_spec(name)
                if spec is None:
                    raise CorruptResultError(
                        f"{label}: unexpected dataset {name!r}: not part of the segment layout pyodlog writes"
                    )
                _check_dataset(obj, name, spec, label)
                total += int(obj.size) * obj.dtype.itemsize
                found.append(name)
            else:
                raise CorruptResultError(
                    f"{label}: unexpected object {name!r} ({type(obj).__name__})"
                )

    walk(f, "")
    if total > max_bytes:
        raise CorruptResultError(
            f"{label}: its datasets declare {total} bytes, more than the file holds ({max_bytes})"
        )
    return found


def _attrs(f: h5py.File, label: str) -> dict[str, Any]:
    attrs = {
        k: (v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v)
        for k, v in f.attrs.items()
    }
    version = attrs.get("segment_format", 1)
    if not isinstance(version, (int, np.integer)) or version < 1:
        raise CorruptResultError(f"{label}: segment_format {version!r} is not a format version")
    if version > SEGMENT_FORMAT:
        raise CorruptResultError(
            f"{label} was written by a newer pyodlog (segment format {int(version)}; this one reads "
            f"formats up to {SEGMENT_FORMAT}): upgrade pyodlog to read it"
        )
    return attrs


def _size_limit(path: Path, swmr: bool) -> int:
    return os.path.getsize(path) + (_PART_SLACK_BYTES if swmr else 0)


def _read_h5(path: Path, swmr: bool, label: str) -> Tables:
    limit = _size_limit(path, swmr)
    with _open_h5(path, swmr, label) as f:
        try:
            attrs = _attrs(f, label)
            names = _dataset_names(f, label, limit)
            data = {name: f[name][()] for name in names}
        except CorruptResultError:
            raise
        except Exception as error:
            raise CorruptResultError(f"{label} cannot be read ({error})") from error
    return _to_tables(data, attrs, label, lenient=swmr)


def _decode(raw: bytes, pairs: np.ndarray) -> list[str]:
    """String column values; undecodable bytes come back as lone surrogates (``surrogateescape``)."""
    return [raw[o : o + n].decode("utf-8", "surrogateescape") for o, n in pairs.tolist()]


def _blobs(raw: bytes, pairs: np.ndarray) -> list[Any]:
    """A ragged bytes column's values, as bytes."""
    return [raw[o : o + n] for o, n in pairs.tolist()]


def _first_false(ok: np.ndarray, n: int) -> int:
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if len(bad) else n


def _contiguous(offsets: np.ndarray, sizes: np.ndarray, available: int) -> np.ndarray:
    """Per row: its offset follows the previous row's end (from 0) and its end is within ``available``."""
    expected = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else sizes
    return (sizes >= 0) & (offsets == expected) & (sizes <= available - offsets)


def _to_tables(
    data: dict[str, np.ndarray], attrs: dict[str, Any], label: str, lenient: bool
) -> Tables:
    tables = Tables(attrs=attrs)
    for span_name in [n for n in data if n.endswith(".spans")]:
        base = span_name[: -len(".spans")]
        if base + ".bytes" not in data:
            raise CorruptResultError(f"{label}: {base}.spans has no {base}.bytes")
        raw = data.pop(base + ".bytes").tobytes()
        pairs = data.pop(span_name)
        n = len(pairs)
        if n:
            n = _first_false(_contiguous(pairs[:, 0], pairs[:, 1], len(raw)), n)
        if n < len(pairs) and not lenient:
            raise CorruptResultError(
                f"{label}: string {n} of {base} lies outside its bytes or out of order"
            )
        tables.strings[base] = _blobs(raw, pairs[:n]) if base in _BLOBS else _decode(raw, pairs[:n])
    stray = [n for n in data if n.endswith(".bytes")]
    if stray:
        raise CorruptResultError(f"{label}: {stray[0]} has no .spans column")
    tables.payload = data.pop("features_payload", np.empty(0, np.uint8))
    aggregates = data.pop("aggregates", None)
    if aggregates is not None and len(aggregates):
        try:
            tables.aggregates = [Aggregates.from_json(aggregates.tobytes())]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise CorruptResultError(f"{label}: its aggregates are damaged ({error})") from error
    _widen_compact(data, label, lenient)
    tables.numeric = data
    for group, required in _REQUIRED.items():
        present = {k for k in (*tables.numeric, *tables.strings) if k.startswith(group + "/")}
        if present and not required <= present:
            raise CorruptResultError(
                f"{label}: its {group} columns lack {sorted(required - present)}"
            )
    near_miss = {k for k in tables.numeric if k in _NEAR_MISS_REQUIRED}
    if near_miss and near_miss != _NEAR_MISS_REQUIRED:
        raise CorruptResultError(
            f"{label}: it has near-miss columns but lacks {sorted(_NEAR_MISS_REQUIRED - near_miss)}"
        )
    codes = tables.numeric.get("images/nm_score_dtype")
    unknown = [] if codes is None else np.setdiff1d(codes, list(SCORE_DTYPES)).tolist()
    if unknown:  # replay would have to guess how the model rounded its thresholds
        raise CorruptResultError(
            f"{label}: images/nm_score_dtype holds {unknown}, not a score dtype pyodlog writes "
            f"({SCORE_DTYPES}, by code)"
        )
    return tables


def _widen_compact(data: dict[str, np.ndarray], label: str, lenient: bool) -> None:
    """Compact ``logits``/``embeddings`` of detections and near-misses (segment formats 3 and 4)
    widened to float32, in place.

    float16 and bfloat16 (its uint16 pattern) widen exactly; uint8 codes are dequantised with
    their per-row ``<name>_scale`` and ``<name>_offset`` (which are then dropped).
    """
    for name in (
        "detections/logits",
        "detections/embeddings",
        "near_misses/logits",
        "near_misses/embeddings",
    ):
        values = data.get(name)
        scale = data.pop(name + "_scale", None)
        offset = data.pop(name + "_offset", None)
        if values is None or values.dtype == _F32:
            continue
        if values.dtype == _U8:
            if scale is None or offset is None:
                raise CorruptResultError(
                    f"{label}: {name} holds uint8 codes without {name}_scale/_offset"
                )
            rows = min(len(values), len(scale), len(offset))
            if rows < len(values) and not lenient:
                raise CorruptResultError(
                    f"{label}: {name} has {len(values)} rows but its scale/offset {len(scale)}/{len(offset)}"
                )
            codes = torch.from_numpy(np.ascontiguousarray(values[:rows]))
            data[name] = widen_rows(
                codes, torch.from_numpy(scale[:rows].copy()), torch.from_numpy(offset[:rows].copy())
            ).numpy()
        elif values.dtype == _U16:
            data[name] = (values.astype(np.uint32) << 16).view(np.float32)
        else:
            data[name] = values.astype(np.float32)


def read_segment(path: str | Path, swmr: bool = False) -> Tables:
    """All columns of one segment, checked (see the module's docstring).

    Args:
        path: a segment file.
        swmr: read an open or crashed ``.part`` through HDF5's SWMR reader, up
            to its last flush, without changing it; its columns may then stop at
            different rows (:func:`trim_to_consistent` keeps the complete
            images). A live segment of this process is cut to what its writer
            completed. Without ``swmr`` the columns must agree.

    Raises:
        CorruptResultError: the file is damaged or not a pyodlog segment.
    """
    path = Path(path)
    if not swmr:
        tables = _read_h5(path, False, str(path))
        _check_consistent(tables, str(path))
        return tables
    with reading_open_segment(path) as counts:
        tables = _read_h5(path, True, str(path))
    return tables if counts is None else _cap(tables, counts)


def read_epochs(path: str | Path) -> np.ndarray:
    """The ``n_epoch`` column of a closed segment, checked like :func:`read_segment` reads it.

    Only that column is looked at (so a segment of a newer format still gives
    its epochs). Raises :class:`CorruptResultError` when the file does not open
    as HDF5 or the column is not what pyodlog writes.
    """
    path = Path(path)
    label = str(path)
    name = "images/n_epoch"
    with _open_h5(path, False, label) as f:
        try:
            group = f
            for key in name.split("/"):
                if key not in group:
                    return np.empty(0, np.int64)
                link = group.get(key, getlink=True)
                if not isinstance(link, h5py.HardLink):
                    raise CorruptResultError(
                        f"{label}: {name!r} passes through a {type(link).__name__}: refusing to follow it"
                    )
                group = group[key]
            if not isinstance(group, h5py.Dataset):
                raise CorruptResultError(f"{label}: {name!r} is not a dataset")
            _check_dataset(group, name, _column_spec(name), label)
            if group.size * group.dtype.itemsize > _size_limit(path, False):
                raise CorruptResultError(
                    f"{label}: {name!r} declares more bytes than the file holds"
                )
            return group[()]
        except CorruptResultError:
            raise
        except Exception as error:
            raise CorruptResultError(f"{label} cannot be read ({error})") from error


def expected_sha256(path: Path) -> tuple[str, Path] | None:
    """The SHA-256 recorded when the segment was closed, and where: its sidecar or the collector's metadata."""
    sidecar = path.with_name(path.name + CHECKSUM_SUFFIX)
    if sidecar.exists():
        words = _read_small(sidecar, 4096, str(sidecar)).decode("ascii", "replace").split()
        if not words or not _SHA256.fullmatch(words[0]):
            raise CorruptResultError(
                f"{sidecar} is not a SHA-256 sidecar (expected '<hex>  <name>')"
            )
        return words[0], sidecar
    meta = meta_path(path)  # a segment the collector stored: its metadata has the SHA-256
    if meta.exists():
        try:
            digest = json.loads(_read_small(meta, MAX_JSON_BYTES, str(meta))).get("sha256")
        except (ValueError, AttributeError) as error:
            raise CorruptResultError(f"{meta} is not the collector's metadata ({error})") from error
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise CorruptResultError(f"{meta} has no SHA-256")
        return digest, meta
    return None


def verify_checksum(path: str | Path) -> bool:
    """Checks a closed segment against its recorded SHA-256; False if none was recorded (older files).

    Raises:
        CorruptResultError: the bytes differ from what was recorded at close.
    """
    path = Path(path)
    recorded = expected_sha256(path)
    if recorded is None:
        return False
    digest, source = recorded
    actual = sha256_file(path)
    if actual != digest:
        raise CorruptResultError(
            f"{path}: its SHA-256 ({actual}) differs from the one recorded when it was closed "
            f"({digest}, in {source.name}): the file changed after it was written (disk, copy or "
            f"manual edit)"
        )
    return True


def _read_closed(path: Path, strict: bool = False) -> Tables:
    verified = verify_checksum(path)  # before HDF5 parses a byte of it
    tables = read_segment(path)
    if not verified and int(tables.attrs.get("segment_format", 1)) >= 2:
        # A writer renames a segment, then writes its sidecar: one closed a moment ago has it now.
        verified = verify_checksum(path)
    closing = path.with_name(path.name + ".lock").exists()  # its writer is writing the sidecar now
    if not verified and not closing and int(tables.attrs.get("segment_format", 1)) >= 2:
        # Written with a checksum, which is gone (a crash between close and sidecar, a full disk,
        # a copy of the *.h5 files only): the bytes cannot be vouched for.
        message = (
            f"{path}: its checksum file {path.name}{CHECKSUM_SUFFIX} is missing, so it is read "
            f"unverified (a changed byte would go unnoticed)"
        )
        if strict:
            raise CorruptResultError(message)
        warnings.warn(f"pyodlog: {message}", stacklevel=4)
    return tables


def _read_open(part: Path, attempts: int = 5) -> Tables:
    """An open segment's complete images; under its final name if it was closed meanwhile.

    Another process's writer may be mid-flush: a failed read is tried again shortly, and so is a
    read caught in the middle of an append (columns of different lengths, so the complete prefix
    is cut short — the cut can reach back into rows the writer already acknowledged when the
    column that says which image a row belongs to lags the others). Between appends every
    column agrees; a writer that died mid-append leaves a cut that stays, and after the last
    attempt that trimmed view is returned (the most complete one seen).
    """
    best: Tables | None = None
    for attempt in range(attempts):
        last = attempt == attempts - 1
        try:
            tables = read_segment(part, swmr=True)
        except FileNotFoundError:
            return _read_closed(part.with_name(part.name[: -len(".part")]))
        except CorruptResultError:
            if last:
                if best is not None:
                    return best
                raise
            time.sleep(0.05)
            continue
        trimmed = trim_to_consistent(tables)
        if trimmed.n_images == tables.n_images:
            return trimmed  # nothing cut: between two appends
        if best is None or trimmed.n_images >= best.n_images:
            best = trimmed
        if not last:
            time.sleep(0.05)
    assert best is not None
    return best


def read_segments(paths: list[Path], strict: bool = False) -> tuple[list[Tables], list[Path]]:
    """Reads closed (``.h5``) and open (``.h5.part``) segments; returns the tables and the skipped files.

    A damaged segment is skipped with a warning naming it (``strict``: raised).
    An open segment is read through the SWMR reader and trimmed to its complete
    images; one closed meanwhile is read under its final name.
    """
    tables, skipped = [], []
    for path in paths:
        try:
            if path.name.endswith(".part"):
                tables.append(_read_open(path))
            else:
                tables.append(_read_closed(path, strict))
        except (CorruptResultError, FileNotFoundError) as error:
            if strict:
                if isinstance(error, FileNotFoundError):
                    raise CorruptResultError(f"{path} vanished while it was read") from error
                raise
            warnings.warn(f"pyodlog skipped a segment: {error}", stacklevel=3)
            skipped.append(path)
    return tables, skipped


def _read_small(path: Path, limit: int, label: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CorruptResultError(f"{label} is larger than the {limit} bytes it may have")
    return data


# -- consistency: the complete images ------------------------------------------------------------


def _lengths(t: Tables, prefix: str) -> list[int]:
    numeric = [len(v) for k, v in t.numeric.items() if k.startswith(prefix)]
    return numeric + [len(v) for k, v in t.strings.items() if k.startswith(prefix)]


def _prefix(t: Tables) -> tuple[int, int, int, int, int]:
    """(images, detections, features, quantisation rows, payload bytes) of the complete images.

    An image is complete when every image column has its row, its detections are
    all present, its offsets continue the previous image's (as the writer
    wrote them), and all of its feature rows are complete. A call's features
    follow its images' (per-image tensors one row per image, batch tensors one
    row on the call's first image), so a cut keeps whole calls: it goes back to
    the first image of a call (images of one call share its timestamp).
    """
    num = t.numeric
    n_rows = n = min(_lengths(t, "images/"), default=0)
    n_det_available = min(_lengths(t, "detections/"), default=0)
    count = num.get("images/det_count", np.empty(0, np.int64))[:n]
    offset = num.get("images/det_offset", np.empty(0, np.int64))[:n]
    n = _first_false(_contiguous(offset, count, n_det_available), n)
    if "images/gt_offset" in num:  # ground truth: an image is complete with all its targets
        gt_available = min(_lengths(t, "targets/"), default=0)
        gt_count, gt_offset = num["images/gt_count"][:n], num["images/gt_offset"][:n]
        n = min(n, _first_false(_contiguous(gt_offset, gt_count, gt_available), len(gt_count)))
    n = _near_miss_prefix(t, n)
    n_feat = min(_lengths(t, "features/"), default=0)
    most_feat = max(_lengths(t, "features/"), default=0)
    rows = num.get("features/image_row", np.empty(0, np.int64))
    if n_feat:
        image_row = rows[:n_feat]
        scale = num.get("features_scale", np.empty(0, np.float32))
        shift = num.get("features_offset", np.empty(0, np.float32))
        method = num["features/method"][:n_feat]
        ok = (
            (image_row >= 0)
            & (image_row < n_rows)
            & _contiguous(
                num["features/payload_offset"][:n_feat],
                num["features/payload_nbytes"][:n_feat],
                len(t.payload),
            )
            & _contiguous(
                num["features/qrow_offset"][:n_feat],
                num["features/qrow_count"][:n_feat],
                min(len(scale), len(shift)),
            )
            & (method >= 0)
            & (method < len(METHODS))
            & np.isin(num["features/per_image"][:n_feat], (0, 1))
        )
        n_feat = _first_false(ok, n_feat)
    if n_feat < most_feat:
        # Feature rows were cut: the image of the first cut row, and every later one, may miss
        # feature rows. Rows follow their images' order, so a first cut row naming an image from
        # the last complete row's up to the images written is believed, even when that image is
        # itself cut (then the images before it all keep their features: cutting back further
        # would lose acknowledged images); any other value was never written, and the last
        # complete row's image is given up.
        last = int(rows[n_feat - 1]) if n_feat else 0
        nxt = int(rows[n_feat]) if n_feat < len(rows) else -1
        written = max(_lengths(t, "images/"), default=0)
        n = min(n, nxt if last <= nxt <= written else last)
    if n < n_rows and n:
        timestamps = num.get("images/timestamp")
        if timestamps is None or len(timestamps) < n + 1:
            n = 0
        else:
            # Back to the first image of the call that image n belongs to.
            call = timestamps[n]
            while n and timestamps[n - 1] == call:
                n -= 1
    if not n:
        return 0, 0, 0, 0, 0
    n_det = int(offset[n - 1] + count[n - 1])
    n_feat = _first_false(rows[:n_feat] < n, n_feat)
    if not n_feat:
        return n, n_det, 0, 0, 0
    r = n_feat - 1
    last_q = int(num["features/qrow_offset"][r] + num["features/qrow_count"][r])
    last_p = int(num["features/payload_offset"][r] + num["features/payload_nbytes"][r])
    return n, n_det, n_feat, last_q, last_p


def _near_miss_prefix(t: Tables, n: int) -> int:
    """The first ``n`` images, fewer where an image's near-misses are not all present."""
    if "images/nm_offset" not in t.numeric:
        return n
    available = min(_lengths(t, "near_misses/"), default=0)
    count = t.numeric.get("images/nm_count", np.empty(0, np.int64))[:n]
    offset = t.numeric["images/nm_offset"][: len(count)]
    return min(n, _first_false(_contiguous(offset, count, available), len(offset)))


def _n_near_misses(t: Tables, n: int) -> int:
    """Near-miss rows of the first ``n`` images."""
    if not n or "images/nm_offset" not in t.numeric:
        return 0
    return int(t.numeric["images/nm_offset"][n - 1] + t.numeric["images/nm_count"][n - 1])


def _cut(t: Tables, n: int, n_det: int, n_feat: int, last_q: int, last_p: int) -> Tables:
    out = Tables(attrs=t.attrs, aggregates=list(t.aggregates))
    n_nm = _n_near_misses(t, n)
    for k, v in t.numeric.items():
        if k.startswith("near_misses/"):
            out.numeric[k] = v[:n_nm]
        if k.startswith("images/"):
            out.numeric[k] = v[:n]
        elif k.startswith("detections/"):
            out.numeric[k] = v[:n_det]
        elif k.startswith("features/"):
            out.numeric[k] = v[:n_feat]
    if "images/gt_offset" in t.numeric:
        n_gt = int(out.numeric["images/gt_count"].sum()) if n else 0
        for k, v in t.numeric.items():
            if k.startswith("targets/"):
                out.numeric[k] = v[:n_gt]
    for k, texts in t.strings.items():
        out.strings[k] = texts[:n] if k.startswith("images/") else texts[:n_feat]
    for k in ("features_scale", "features_offset"):
        out.numeric[k] = t.numeric.get(k, np.empty(0, np.float32))[:last_q]
    out.payload = t.payload[:last_p]
    return out


def trim_to_consistent(tables: Tables) -> Tables:
    """Keeps the longest prefix of images whose every row is complete.

    SWMR keeps each dataset readable, but a crash in the middle of appending a
    batch can leave the columns at different lengths (one dataset's metadata
    reached the disk, another's did not), or rows extended before their data
    arrived. The images kept are those present in every image column, with
    offsets that continue the previous image's, whose detections and feature
    rows are all present too.
    """
    return _cut(tables, *_prefix(tables))


def _check_consistent(t: Tables, label: str) -> None:
    """A closed segment's columns must agree exactly (what a crash leaves is only in ``.part`` files)."""
    n, n_det, n_feat, _, _ = _prefix(t)
    n_gt = int(t.numeric["images/gt_count"][:n].sum()) if "images/gt_count" in t.numeric else 0
    groups = [
        ("images/", n),
        ("detections/", n_det),
        ("features/", n_feat),
        ("targets/", n_gt),
        ("near_misses/", _n_near_misses(t, n)),
    ]
    for group, kept in groups:
        lengths = _lengths(t, group)
        if any(length != kept for length in lengths):
            raise CorruptResultError(
                f"{label}: its {group[:-1]} columns disagree (rows {sorted(set(lengths))}, "
                f"{kept} consistent): offsets or counts are damaged"
            )


def _cap(t: Tables, counts: dict[str, int]) -> Tables:
    """A live segment of this process, cut to the rows its writer completed and flushed."""
    return _cut(
        t,
        min(counts["images"], t.n_images),
        counts["detections"],
        counts["features"],
        counts["qrows"],
        counts["payload"],
    )


# -- results ----------------------------------------------------------------------------------


def merge_tables(
    parts: list[Tables], keep_epoch: int | None = None, use_epoch_filter: bool = False
) -> Tables:
    """Concatenates segments' tables, optionally keeping the images of one epoch, with offsets renumbered."""
    out = Tables()
    images_base = det_base = payload_base = qrow_base = gt_base = 0
    with_targets = any("images/gt_offset" in p.numeric for p in parts if p.n_images)
    for part in parts:
        for aggregates in part.aggregates:
            out.aggregates.append(aggregates.select(keep_epoch) if use_epoch_filter else aggregates)
    parts = _aligned_optional_columns(parts)
    nm_base = 0
    for part in parts:
        if part.n_images == 0:
            continue
        epoch = part.numeric["images/n_epoch"]
        keep = (
            np.ones(part.n_images, bool)
            if not use_epoch_filter
            else (epoch == (-1 if keep_epoch is None else keep_epoch))
        )
        rows = np.flatnonzero(keep)
        new_row = np.full(part.n_images, -1, np.int64)
        new_row[rows] = images_base + np.arange(len(rows))
        image_cols = {k: v[rows] for k, v in part.numeric.items() if k.startswith("images/")}
        det_rows, image_cols["images/det_offset"] = _picked_rows(
            part.numeric["images/det_offset"][rows],
            part.numeric["images/det_count"][rows],
            det_base,
        )
        det_cols = {k: v[det_rows] for k, v in part.numeric.items() if k.startswith("detections/")}
        gt_cols: dict[str, np.ndarray] = {}
        if with_targets:
            gt_rows, image_cols["images/gt_offset"] = _picked_rows(
                part.numeric["images/gt_offset"][rows],
                part.numeric["images/gt_count"][rows],
                gt_base,
            )
            gt_cols = {k: v[gt_rows] for k, v in part.numeric.items() if k.startswith("targets/")}
            gt_base += len(gt_rows)
        if "images/nm_offset" in part.numeric:
            nm_rows, image_cols["images/nm_offset"] = _picked_rows(
                part.numeric["images/nm_offset"][rows],
                part.numeric["images/nm_count"][rows],
                nm_base,
            )
            det_cols.update(
                {k: v[nm_rows] for k, v in part.numeric.items() if k.startswith("near_misses/")}
            )
            nm_base += len(nm_rows)
        feat_rows = (
            np.flatnonzero(keep[part.numeric["features/image_row"]])
            if "features/image_row" in part.numeric and len(part.numeric["features/image_row"])
            else np.empty(0, np.int64)
        )
        feat_cols = {k: v[feat_rows] for k, v in part.numeric.items() if k.startswith("features/")}
        payload_pieces, scale_pieces, offset_pieces = [], [], []
        if len(feat_rows):
            new_payload_offset = []
            new_qrow_offset = []
            p_cursor, q_cursor = payload_base, qrow_base
            for r in feat_rows:
                po, pn = (
                    part.numeric["features/payload_offset"][r],
                    part.numeric["features/payload_nbytes"][r],
                )
                qo, qn = (
                    part.numeric["features/qrow_offset"][r],
                    part.numeric["features/qrow_count"][r],
                )
                payload_pieces.append(part.payload[po : po + pn])
                scale_pieces.append(part.numeric["features_scale"][qo : qo + qn])
                offset_pieces.append(part.numeric["features_offset"][qo : qo + qn])
                new_payload_offset.append(p_cursor)
                new_qrow_offset.append(q_cursor)
                p_cursor += pn
                q_cursor += qn
            feat_cols["features/payload_offset"] = np.asarray(new_payload_offset, np.int64)
            feat_cols["features/qrow_offset"] = np.asarray(new_qrow_offset, np.int64)
            feat_cols["features/image_row"] = new_row[part.numeric["features/image_row"][feat_rows]]
            payload_base, qrow_base = p_cursor, q_cursor
        for cols in (image_cols, det_cols, feat_cols, gt_cols):
            for k, v in cols.items():
                out.numeric[k] = np.concatenate([out.numeric[k], v]) if k in out.numeric else v
        for k in ("features_scale", "features_offset"):
            pieces = scale_pieces if k == "features_scale" else offset_pieces
            joined = np.concatenate(pieces) if pieces else np.empty(0, np.float32)
            out.numeric[k] = (
                np.concatenate([out.numeric[k], joined]) if k in out.numeric else joined
            )
        out.payload = np.concatenate([out.payload] + payload_pieces)
        for k, texts in part.strings.items():
            picked = [texts[i] for i in (rows if k.startswith("images/") else feat_rows)]
            out.strings.setdefault(k, []).extend(picked)
        images_base += len(rows)
        det_base += len(det_rows)
        out.attrs = dict(part.attrs)
    return out


def _picked_rows(offset: np.ndarray, count: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows ``offset[i] : offset[i] + count[i]`` of the images kept, and their new offsets from ``base``."""
    if not len(offset):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    rows = np.concatenate([np.arange(o, o + c) for o, c in zip(offset, count)]).astype(np.int64)
    new = base + np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    return rows, new


# What a row of a segment written without an optional column gets when merged with segments that
# have it (pyodlog.io.columns.NOT_LOGGED, the writer's table): no near-miss, an envelope that says
# none was logged (nm_k -1), NaN uncertainty and embeddings, no ground truth, sample weight 1.
_NOT_LOGGED = NOT_LOGGED


def _group_rows(part: Tables, group: str) -> int:
    """Rows of a group of a segment's tables (0 for a group it does not have)."""
    if group == "images":
        return part.n_images
    for name, values in part.numeric.items():
        if name.startswith(group + "/"):
            return len(values)
    return 0


def _aligned_optional_columns(parts: list[Tables]) -> list[Tables]:
    """Parts where some segments have optional columns and others not (near-misses, uncertainty,
    embeddings, ground truth, sample weights, thumbnails): the others get them, filled as not
    logged (:data:`_NOT_LOGGED`; a group they have no rows of, e.g. ``targets``, with no rows),
    so that columns stay row-aligned. The one place the reader aligns segments' columns."""
    live = [p for p in parts if p.n_images]
    specs: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    for p in live:
        for k, v in p.numeric.items():
            if k in _NOT_LOGGED or k.startswith(("targets/", "near_misses/")):
                specs.setdefault(k, (v.dtype, v.shape[1:]))
    blobs = {k for p in live for k in p.strings if k in NOT_LOGGED_BLOBS}
    if not specs and not blobs:
        return parts
    out = []
    for p in parts:
        missing = [k for k in specs if k not in p.numeric]
        missing_blobs = [k for k in blobs if k not in p.strings]
        if not p.n_images or (not missing and not missing_blobs):
            out.append(p)
            continue
        numeric = dict(p.numeric)
        for k in missing:
            dtype, row = specs[k]
            n = _group_rows(p, k.split("/", 1)[0])
            if n == 0:
                numeric[k] = np.empty((0, *row), dtype)
            elif k in _NOT_LOGGED:
                numeric[k] = not_logged_rows(k, n, dtype, row)
        strings: dict[str, list[Any]] = dict(p.strings)
        for k in missing_blobs:
            strings[k] = [NOT_LOGGED_BLOBS[k]] * p.n_images
        out.append(Tables(numeric, strings, p.payload, p.attrs, p.aggregates))
    return out


def _empty_columns(
    schema: dict[str, Any] | None,
) -> dict[str, tuple[np.dtype, tuple[int, ...]] | None]:
    """Every column of a result with no rows: ``{name: (dtype, row shape)}``, None for a string column."""
    schema = schema if isinstance(schema, dict) else {}
    n_class = schema.get("n_class")
    columns: dict[str, tuple[np.dtype, tuple[int, ...]] | None] = {
        # A width that varies (None) is 0 in an empty column.
        name: (
            sorted(dtypes, key=str)[0] if len(dtypes) > 1 else next(iter(dtypes)),
            tuple(0 if d is None else d for d in row),
        )
        for name, (dtypes, row) in _NUMERIC.items()
        if name not in ("detections/embeddings", "features_payload", "aggregates")
        and name not in _TARGET_COLUMNS
        and (name not in _NOT_LOGGED or name == "images/sample_weight")
        and not name.startswith("near_misses/")  # optional: absent unless logged
        and not (name.startswith("detections/") and name.endswith(("_scale", "_offset")))
    }
    columns["images/image_size"] = (_I32, (2,))
    columns["features_scale"] = columns["features_offset"] = (_F32, ())
    columns["detections/logits"] = (
        _F32,
        (int(n_class) if isinstance(n_class, int) and n_class >= 0 else 0,),
    )
    columns.update({name: None for name in _STRINGS})
    for spec in schema.get("additional_fields") or []:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            continue
        dtype = str(spec.get("dtype"))
        name = f"images/fields/{spec['name']}"
        try:
            columns[name] = None if dtype == "str" else (np.dtype(dtype), ())
        except (TypeError, ValueError):
            columns[name] = None
    return columns


def _with_all_columns(tables: Tables, schema: dict[str, Any] | None) -> Tables:
    """Adds the column groups a result lacks entirely: a result with no rows has every column, empty."""
    present = {*tables.numeric, *tables.strings}
    groups = {name.split("/", 1)[0] for name in present if "/" in name}
    for name, spec in _empty_columns(schema).items():
        if name in present or ("/" in name and name.split("/", 1)[0] in groups):
            continue
        if spec is None:
            tables.strings[name] = []
        else:
            dtype, row = spec
            tables.numeric[name] = np.empty((0, *row), dtype)
    return tables


class ResultData:
    """Logged records read back: tables as arrays, per-image detections, decompressed features.

    Attributes:
        images: ``{column: array or list of str}``, one row per image
            (``input_id``, ``dataset_type``, ``n_epoch`` (-1: untagged),
            ``timestamp``, ``image_size``, ``det_offset``, ``det_count``,
            ``sample_weight`` (segment format 3 on), ``nm_*`` (the near-miss
            envelope, when logged), ``gt_*`` (when targets were logged), and one
            column per additional field under its own name). A result
            without records has every column, empty. Thumbnails: :meth:`thumbnail`.
        detections: ``{column: array}``, one row per detection (``boxes``
            [N, 4] xyxy, ``scores``, ``labels``, ``candidate_index``,
            ``logits`` [N, C], ``embeddings`` [N, E] when logged, ``entropy``,
            ``margin``, ``energy`` when logged), widened to float32.
        near_misses: ``{column: array}``, one row per near-miss (the columns of
            ``detections`` plus ``reason``, ``suppressed_by``, ``suppressor_iou``);
            see :meth:`image_near_misses`, :meth:`replay`, :meth:`sweep`.
        targets: ``{column: array}``, one row per ground-truth box of the calls that
            passed ``targets=`` (``boxes`` [M, 4] xyxy original-image pixels, ``labels``);
            images then have ``gt_offset``/``gt_count``. Empty (``{}``) when none was logged.
        manifest: the export manifest (ZIP) or the result's ``result.json`` (folder).
        skipped: damaged segments left out of a folder's records (each was warned about).
    """

    def __init__(
        self,
        tables: Tables,
        manifest: dict[str, Any],
        source: str | Path = "",
        skipped: list[Path] | None = None,
    ) -> None:
        self._t = tables
        self.manifest = manifest
        self.source = str(source)
        self.skipped = list(skipped or [])

        def strip(d, prefix):
            return {k[len(prefix) :]: v for k, v in d.items() if k.startswith(prefix)}

        images = {**strip(tables.numeric, "images/"), **strip(tables.strings, "images/")}
        # additional_fields appear under their own names
        self.images: dict[str, Any] = {k.split("/", 1)[-1]: v for k, v in images.items()}
        self.detections: dict[str, np.ndarray] = strip(tables.numeric, "detections/")
        self.targets: dict[str, np.ndarray] = strip(tables.numeric, "targets/")
        #: ``{column: array}``, one row per near-miss (empty when none was logged): the columns of
        #: ``detections`` plus ``reason``, ``suppressed_by``, ``suppressor_iou``.
        self.near_misses: dict[str, np.ndarray] = strip(tables.numeric, "near_misses/")

    def __len__(self) -> int:
        return self._t.n_images

    # -- ground truth, class names, slices (issue 15) ---------------------------------------

    @property
    def class_names(self) -> list[str] | None:
        """The name of each label (index = label), from the result's schema; None if unknown."""
        schema = self.manifest.get("schema") if isinstance(self.manifest, dict) else None
        names = schema.get("class_names") if isinstance(schema, dict) else None
        if names is None:
            raw = self._t.attrs.get("class_names")
            try:
                names = json.loads(raw) if isinstance(raw, str) else None
            except ValueError:
                names = None
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return list(names)
        return None

    def image_targets(self, i: int) -> dict[str, torch.Tensor]:
        """The ground truth logged for image row ``i``: ``{"boxes": Tensor[M, 4], "labels": Tensor[M]}``.

        Empty tensors when the image was logged without ``targets=``.
        """
        n_images = len(self)
        if not -n_images <= i < n_images:
            raise IndexError(f"image row {i} is out of range: this result has {n_images} images")
        i = i % n_images
        if "gt_offset" not in self.images or "boxes" not in self.targets:
            return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        o, n = int(self.images["gt_offset"][i]), int(self.images["gt_count"][i])
        return {
            "boxes": torch.from_numpy(np.ascontiguousarray(self.targets["boxes"][o : o + n])),
            "labels": torch.from_numpy(np.ascontiguousarray(self.targets["labels"][o : o + n])),
        }

    @property
    def has_targets(self) -> bool:
        """Whether any image was logged with ground truth (``targets=``)."""
        return "gt_count" in self.images and bool(len(self.targets.get("labels", ())))

    def where(
        self,
        dataset_type: str | list[str] | None = None,
        n_epoch: int | list[int] | None = None,
        input_id_prefix: str | None = None,
        **fields: Any,
    ) -> ResultData:
        """The images matching every condition, as a view (index arrays: no column is copied).

        Args:
            dataset_type: one value or a list of accepted values.
            n_epoch: one epoch or a list (-1: untagged).
            input_id_prefix: keep the ``input_id`` starting with it.
            **fields: ``images`` column = value, a list of accepted values, or a callable
                ``column array -> bool mask`` (e.g. ``score=lambda v: v > 3``).

        Returns:
            a :class:`ResultView`, usable wherever a ResultData is
            (``images``, ``detections``, ``targets``, ``image_detections``, ``feature``,
            ``where`` again, ``iter_chunks``).

        Raises:
            KeyError: a field that is no ``images`` column (the message lists them).
        """
        return ResultView.of(self).where(dataset_type, n_epoch, input_id_prefix, **fields)

    def iter_chunks(self, rows: int = 65536, progress: bool | None = None) -> Any:
        """Consecutive views of at most ``rows`` images (see :meth:`ResultView.iter_chunks`)."""
        return ResultView.of(self).iter_chunks(rows, progress)

    def to_arrow(self) -> dict[str, Any]:
        """``{"images", "detections"[, "targets"]}`` pyarrow Tables joined by ``image_row`` (:mod:`pyodlog.io.interop`)."""
        from pyodlog.io.interop import to_arrow

        return to_arrow(self)

    def to_pandas(self) -> dict[str, Any]:
        """:meth:`to_arrow` as pandas DataFrames."""
        from pyodlog.io.interop import to_pandas

        return to_pandas(self)

    def to_parquet(self, path: str | Path, rows: int = 65536) -> dict[str, Path]:
        """Writes ``images.parquet``, ``detections.parquet`` (``targets.parquet``) into folder ``path``, chunk by chunk."""
        from pyodlog.io.interop import to_parquet

        return to_parquet(self, path, rows)

    def to_coco(self, path: str | Path) -> dict[str, Path]:
        """Writes COCO ``results.json`` (and ``ground_truth.json`` when targets were logged) into folder ``path``."""
        from pyodlog.io.interop import to_coco

        return to_coco(self, path)

    def __repr__(self) -> str:
        return f"ResultData({self.source!r}, images={len(self)}, detections={len(self.detections.get('scores', []))})"

    def aggregates(self) -> Aggregates:
        """The always-on aggregates of every call, sampled out or not, merged over the segments read.

        Counts (calls, images, detections, histograms) are exact sums; the embedding sketch
        sums merge up to float64 rounding. Empty for results written without them (segment
        formats 1 and 2, or segments still open). See :class:`pyodlog.io.aggregates.Aggregates`.
        """
        n_class = (
            self.manifest.get("schema", {}).get("n_class")
            if isinstance(self.manifest.get("schema"), dict)
            else None
        )
        return Aggregates.merged(self._t.aggregates, n_class if isinstance(n_class, int) else None)

    def image_detections(self, i: int) -> DetectionOutput:
        """The detections of image row ``i``, as the model returned them.

        Returns:
            DetectionOutput: ``boxes`` ``Tensor[N, 4]`` xyxy in original-image
            coordinates, ``scores``, ``labels``, ``logits`` ``Tensor[N, C]``,
            ``candidate_index``, ``embeddings`` (or None) and ``image_size``.
        """
        n_images = len(self)
        if not -n_images <= i < n_images:
            raise IndexError(f"image row {i} is out of range: this result has {n_images} images")
        i = i % n_images
        o, n = int(self.images["det_offset"][i]), int(self.images["det_count"][i])

        def rows(name: str) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(self.detections[name][o : o + n]))

        h, w = (int(v) for v in self.images["image_size"][i])
        return DetectionOutput(
            rows("boxes"),
            rows("scores"),
            rows("labels"),
            rows("logits"),
            rows("candidate_index"),
            (h, w),
            rows("embeddings") if "embeddings" in self.detections else None,
        )

    def thumbnail(self, i: int) -> bytes | None:
        """The JPEG thumbnail of image row ``i`` (logged with ``log_images``), or None.

        None when the result has no thumbnails (logged without ``log_images``, or by an older
        pyodlog) or this image has none (its input was not an image tensor, or changed before
        the writer read it).

        Raises:
            IndexError: ``i`` is out of range.
        """
        n_images = len(self)
        if not -n_images <= i < n_images:
            raise IndexError(f"image row {i} is out of range: this result has {n_images} images")
        column: list[Any] | None = self._t.strings.get("images/thumbnail")
        if column is None:
            return None
        data = column[i % n_images]
        return bytes(data) if data else None

    def image_near_misses(self, i: int) -> dict[str, torch.Tensor]:
        """The near-misses of image row ``i``: ``{column: tensor}``, by score descending.

        Columns as :attr:`near_misses` (``boxes`` [N, 4] xyxy in original-image coordinates,
        ``scores``, ``labels``, ``logits`` [N, C], ``candidate_index``, ``reason`` (1
        below_score, 2 suppressed, 3 over_cap), ``suppressed_by`` (row of the suppressing
        detection in :meth:`image_detections`, -1 if none), ``suppressor_iou`` (NaN if none), and
        ``embeddings``/``entropy``/``margin``/``energy`` when logged); empty when none was logged.
        """
        n_images = len(self)
        if not -n_images <= i < n_images:
            raise IndexError(f"image row {i} is out of range: this result has {n_images} images")
        i = i % n_images
        if "nm_offset" not in self.images:
            return {
                k: torch.from_numpy(np.ascontiguousarray(v[:0]))
                for k, v in self.near_misses.items()
            }
        o, n = int(self.images["nm_offset"][i]), int(self.images["nm_count"][i])
        return {
            k: torch.from_numpy(np.ascontiguousarray(v[o : o + n]))
            for k, v in self.near_misses.items()
        }

    def replay(
        self,
        score_thresh: float | None = None,
        iou_thresh: float | None = None,
        max_detections_per_image: int | None = None,
        strict: bool = True,
    ):
        """The detections the model would have returned with other thresholds, without the model.

        Runs the model's post-processing (score filter, per-class NMS, the best
        ``max_detections_per_image``) on each image's logged detections and near-misses. Exact --
        the same boxes, scores, labels and order as running the model with those thresholds --
        inside the logged envelope: ``score_thresh`` at or above the image's floor (the
        ``near_miss_floor``; when the image's near-miss budget was exhausted, its lowest
        near-miss score), any ``iou_thresh`` and cap. See :mod:`pyodlog.io.replay`.

        Args:
            score_thresh, iou_thresh, max_detections_per_image: None keeps the logged value.
            strict: outside the envelope raise ``ValueError`` (stating it); with False, return a
                best effort and flag the images in ``Replay.exact``.

        Returns:
            :class:`pyodlog.io.replay.Replay` (``replay[i]`` is image ``i``'s
            :class:`~pyodlog.DetectionOutput`).
        """
        from pyodlog.io.replay import replay

        return replay(self, score_thresh, iou_thresh, max_detections_per_image, strict)

    def sweep(
        self,
        score_thresh: list[float],
        iou_thresh: list[float] | None = None,
        max_detections_per_image: int | None = None,
        strict: bool = True,
    ):
        """Detections per class over a grid of thresholds, replayed in one pass (no model).

        One NMS per IoU threshold (greedy NMS is prefix-consistent: a higher score threshold
        keeps the pairs of a lower one above it), vectorised over images and score thresholds.

        Returns:
            A ``pandas.DataFrame``, one row per (score_thresh, iou_thresh, label): ``detections``
            (how many), ``images`` (how many images have at least one), ``exact`` (every image
            inside the envelope; outside it a ``ValueError`` unless ``strict=False``).
        """
        from pyodlog.io.replay import sweep

        return sweep(self, score_thresh, iou_thresh, max_detections_per_image, strict)

    def feature_names(self) -> list[str]:
        return sorted(set(self._t.strings.get("features/name", [])))

    def feature(self, i: int, name: str, decompress: bool = True):
        """The captured tensor ``name`` of image row ``i``, decompressed (or the CompressedFeature).

        Raises:
            KeyError: no such feature for that image.
            CorruptResultError: the feature's stored description does not fit its bytes.
        """
        t = self._t
        names = t.strings.get("features/name", [])
        rows = [
            r
            for r in range(len(names))
            if names[r] == name and t.numeric["features/image_row"][r] == i
        ]
        if not rows:
            raise KeyError(f"no feature {name!r} for image {i}; names: {self.feature_names()}")
        r = rows[0]
        shape = tuple(int(v) for v in t.numeric["features/shape"][r] if v >= 0)
        original = tuple(int(v) for v in t.numeric["features/original_shape"][r] if v >= 0)
        po, pn = (
            int(t.numeric["features/payload_offset"][r]),
            int(t.numeric["features/payload_nbytes"][r]),
        )
        qo, qn = int(t.numeric["features/qrow_offset"][r]), int(t.numeric["features/qrow_count"][r])
        payload_dtype, dtype = (
            t.strings["features/payload_dtype"][r],
            t.strings["features/dtype"][r],
        )
        where = f"{self.source}: feature {name!r} of image {i}"
        if payload_dtype not in _PAYLOAD_DTYPES or dtype not in _TORCH_DTYPES:
            raise CorruptResultError(
                f"{where} has dtypes {payload_dtype!r}/{dtype!r}: pyodlog writes "
                f"{sorted(_PAYLOAD_DTYPES)}/{sorted(_TORCH_DTYPES)}"
            )
        np_dtype = np.dtype(_PAYLOAD_DTYPES[payload_dtype])
        if int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize != pn:
            raise CorruptResultError(f"{where}: shape {shape} does not fit its {pn} bytes")
        payload = torch.from_numpy(t.payload[po : po + pn].copy().view(np_dtype).reshape(shape))
        if payload_dtype == "bfloat16":
            payload = payload.view(torch.bfloat16)
        method = METHODS[int(t.numeric["features/method"][r])]
        pooled = tuple(int(v) for v in t.numeric["features/pooled_to"][r])
        per_image = bool(t.numeric["features/per_image"][r])
        if per_image:
            # The image's slice of a batch tensor: quantisation rows are its channels.
            payload, original = payload.unsqueeze(0), (1, *original)
        try:
            feature = CompressedFeature(
                method,
                payload,
                torch.from_numpy(t.numeric["features_scale"][qo : qo + qn].copy())
                if method == "uint8"
                else None,
                torch.from_numpy(t.numeric["features_offset"][qo : qo + qn].copy())
                if method == "uint8"
                else None,
                getattr(torch, dtype),
                original,
                None if pooled[0] < 0 else (int(pooled[0]), int(pooled[1])),
            )
            if not decompress:
                return feature
            restored = feature.decompress()
        except (RuntimeError, ValueError) as error:
            raise CorruptResultError(f"{where} cannot be restored ({error})") from error
        return restored[0] if per_image else restored


def _is_result(path: Path) -> bool:
    try:
        return path.is_dir() and (
            (path / "result.json").is_file()
            or (path / META).is_dir()
            or any(n.endswith((".h5", ".h5.part")) for n in os.listdir(path))
        )
    except OSError:
        return False


def _not_a_result(path: Path) -> str:
    """What a folder that holds no result is, and what to pass instead."""
    children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    results = [c.name for c in children if _is_result(c)]
    if results:
        return (
            f"{path} is not a result folder but holds the results {results[:20]}"
            f"{' ...' if len(results) > 20 else ''} (a version folder): pass one of them, e.g. "
            f"pyodlog.open_result({str(path / results[0])!r})"
        )
    versions = [c.name for c in children if any(_is_result(g) for g in c.iterdir() if g.is_dir())]
    if versions:
        return (
            f"{path} is not a result folder but holds the versions {versions[:20]} (a model folder): "
            f"pass a result folder, <model>/<version>/<result>"
        )
    return (
        f"{path} is not a pyodlog result folder: it has no result.json and no segment files "
        f"(*.h5): pass a result folder (PYODLOG_HOME/<model>/<version>/<result>) or an exported ZIP"
    )


def _segment_paths(directory: Path) -> list[Path]:
    """Closed segments and open ones (``.h5.part``) not closed yet, in name (creation) order."""
    names = os.listdir(directory)
    closed = {n for n in names if n.endswith(".h5")}
    return [
        directory / n
        for n in sorted(names)
        if n in closed or (n.endswith(".h5.part") and n[: -len(".part")] not in closed)
    ]


def open_result(
    path: str | Path, n_epoch: int | None = None, all_epochs: bool = True, strict: bool = False
) -> ResultData:
    """Reads a result folder or an exported ZIP, checking every file (nothing read is trusted).

    A folder's records are those of its closed segments and of its open ones
    (``.h5.part``: a running logger's, or a crashed one's before a new logger
    recovers it), read without changing them or taking their writer's lock, up
    to the last complete image their writer flushed (everything
    ``wait_for_save()`` acknowledged). A damaged segment (truncated, zeroed, not
    matching the SHA-256 recorded when it was closed, not pyodlog's layout) is
    left out with a warning naming it, unless ``strict``.

    Args:
        path: a result folder (``PYODLOG_HOME/model/version/result``, or a
            collector's) or a ZIP from ``export()``.
        n_epoch, all_epochs: for a folder, keep only the images of ``n_epoch``
            (-1/None: untagged) unless ``all_epochs``.
        strict: raise on a damaged segment instead of leaving it out.

    Raises:
        CorruptResultError: a damaged or tampered ZIP (always), or a damaged
            segment (``strict``); the message names the file or member.
        ValueError: ``path`` is a folder that is not a result (the message says
            what it is, e.g. a version folder and its results), or a file that
            is not a ZIP.
        FileNotFoundError: ``path`` does not exist.

    ``path`` may also be ``s3://bucket/prefix/<model>/<version>/<result>`` (a result that
    pyodlog's sync or its collector stored in an object store): it is read through a bounded
    local cache, each segment checked against its stored SHA-256 (:mod:`pyodlog.io.remote`).
    """
    if isinstance(path, str) and path.startswith("s3://"):
        from pyodlog.io.remote import RemoteChecksumError, fetch_s3_result

        try:
            path = fetch_s3_result(path)
        except RemoteChecksumError as error:
            raise CorruptResultError(str(error)) from None
    path = Path(path)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ValueError(
                f"{path} is a file but not a ZIP exported by pyodlog: pass an export ZIP or a result folder"
            )
        return _open_zip(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is neither a result folder nor an exported ZIP: it does not exist"
        )
    if not _is_result(path):
        raise ValueError(_not_a_result(path))
    manifest: dict[str, Any] = {}
    manifest_path = path / "result.json"
    if manifest_path.exists():
        try:
            manifest = json.loads(_read_small(manifest_path, MAX_JSON_BYTES, str(manifest_path)))
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (ValueError, CorruptResultError) as error:
            if strict:
                raise CorruptResultError(f"{manifest_path} is damaged ({error})") from error
            warnings.warn(f"pyodlog ignored {manifest_path}: damaged ({error})", stacklevel=2)
            manifest = {}
    parts, skipped = read_segments(_segment_paths(path), strict=strict)
    tables = merge_tables(parts, n_epoch, not all_epochs)
    return ResultData(_with_all_columns(tables, manifest.get("schema")), manifest, path, skipped)


# -- exported ZIPs --------------------------------------------------------------------------------


def _open_zip(path: Path) -> ResultData:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise CorruptResultError(f"{path} is not a readable ZIP ({error})") from error
    with archive:
        infos = {info.filename: info for info in archive.infolist()}
        missing = [m for m in ("manifest.json", "records.h5") if m not in infos]
        if missing:
            raise CorruptResultError(
                f"{path} lacks {missing}: not a ZIP written by pyodlog's export() "
                f"(its members: {sorted(infos)[:10]})"
            )
        manifest = _json_member(archive, infos["manifest.json"], path)
        entry = (
            (manifest.get("members") or {}).get("records.h5")
            if isinstance(manifest.get("members"), dict)
            else None
        )
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and _SHA256.fullmatch(entry["sha256"])
            and isinstance(entry.get("bytes"), int)
        ):
            raise CorruptResultError(
                f"{path}:manifest.json gives no SHA-256 and size for records.h5 (members.records.h5)"
            )
        info = infos["records.h5"]
        label = f"{path}:records.h5"
        _check_member_size(info, entry["bytes"], label)
        with tempfile.TemporaryDirectory(prefix="pyodlog-read-") as tmp:
            free = shutil.disk_usage(tmp).free
            if info.file_size > free:
                raise OSError(
                    f"{label} needs {info.file_size} bytes in {tmp}, {free} are free: set TMPDIR to a "
                    f"folder with more space"
                )
            target = Path(tmp) / "records.h5"
            _extract_verified(archive, info, target, entry, label)
            tables = _read_h5(target, False, label)
            _check_consistent(tables, label)
    return ResultData(_with_all_columns(tables, manifest.get("schema")), manifest, path)


def _json_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> dict[str, Any]:
    label = f"{path}:{info.filename}"
    if info.file_size > MAX_JSON_BYTES:
        raise CorruptResultError(
            f"{label} declares {info.file_size} bytes, more than the {MAX_JSON_BYTES} a manifest may have"
        )
    try:
        with archive.open(info) as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise CorruptResultError(f"{label} cannot be read ({error})") from error
    if len(data) > MAX_JSON_BYTES:
        raise CorruptResultError(
            f"{label} is larger than the {MAX_JSON_BYTES} bytes a manifest may have"
        )
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptResultError(f"{label} is not valid JSON ({error})") from error
    if not isinstance(manifest, dict):
        raise CorruptResultError(f"{label} is not a JSON object")
    return manifest


def _check_member_size(info: zipfile.ZipInfo, declared: int, label: str) -> None:
    """Refuses, before expanding anything, a member larger than its manifest says or than allowed."""
    if info.file_size != declared:
        raise CorruptResultError(
            f"{label} is {info.file_size} bytes in the ZIP's directory, {declared} in its manifest"
        )
    if info.file_size > MAX_MEMBER_BYTES:
        raise CorruptResultError(f"{label} is larger than the {MAX_MEMBER_BYTES} bytes allowed")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_COMPRESSION_RATIO * max(
        info.compress_size, 1
    ):
        raise CorruptResultError(
            f"{label} would expand {info.compress_size} bytes to {info.file_size} (more than "
            f"{MAX_COMPRESSION_RATIO}x): refused as a ZIP bomb (pyodlog stores its members uncompressed)"
        )


def _extract_verified(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, entry: dict[str, Any], label: str
) -> None:
    """Copies a member out, never more bytes than declared, and checks its size and SHA-256."""
    digest = hashlib.sha256()
    written = 0
    try:
        with archive.open(info) as src, open(target, "wb") as dst:
            while True:
                block = src.read(min(_READ_BLOCK, info.file_size - written + 1))
                if not block:
                    break
                written += len(block)
                if written > info.file_size:
                    raise CorruptResultError(
                        f"{label} holds more bytes than its declared {info.file_size}"
                    )
                digest.update(block)
                dst.write(block)
    except CorruptResultError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise  # a local disk problem, not the ZIP's
        raise CorruptResultError(f"{label} cannot be read ({error})") from error
    if written != entry["bytes"]:
        raise CorruptResultError(
            f"{label} holds {written} bytes, its manifest says {entry['bytes']}"
        )
    if digest.hexdigest() != entry["sha256"]:
        raise CorruptResultError(
            f"{label}: its SHA-256 ({digest.hexdigest()}) differs from the manifest's "
            f"({entry['sha256']}): the ZIP was changed or damaged after export"
        )


# -- views: slices of results by index arrays (issue 15) -------------------------------------------

_LABELS = ("source", "model_name", "version_name", "result_name")


def _take(column: Any, idx: np.ndarray) -> Any:
    if isinstance(column, list):
        return [column[i] for i in idx.tolist()]
    return column[idx]


def _concat(pieces: list[Any], name: str) -> Any:
    if pieces and isinstance(pieces[0], list):
        return [v for p in pieces for v in p]
    shapes = {p.shape[1:] for p in pieces}
    if len(shapes) > 1:
        raise ValueError(
            f"column {name!r} has rows of shapes {sorted(shapes)} in the results combined (e.g. "
            f"logits of models with different class counts): select one result with "
            f"where(model_name=..., version_name=...) first"
        )
    return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


class _Columns(Mapping):
    """Columns gathered on first access (then kept)."""

    def __init__(self, names: list[str], get: Callable[[str], Any]) -> None:
        self._names, self._get = names, get
        self._cache: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._cache:
            self._cache[name] = self._get(name)
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"<columns {self._names}>"


def _label_of(data: ResultData) -> dict[str, str]:
    manifest = data.manifest if isinstance(data.manifest, dict) else {}
    attrs = getattr(data, "_t", None)
    attrs = attrs.attrs if attrs is not None else {}
    return {
        "source": data.source,
        **{k: str(manifest.get(k, attrs.get(k, ""))) for k in _LABELS[1:]},
    }


class ResultView(ResultData):
    """Image rows of one or more results read back, by index: a ResultData that copies nothing up front.

    Everything a ResultData offers works on it: ``images``, ``detections``, ``targets`` (columns
    gathered on first access), ``image_detections(i)``, ``image_targets(i)``, ``feature(i,
    name)``, ``class_names``, ``where(...)``, ``iter_chunks(...)``. Row ``i`` of a view is its
    ``i``-th selected image; ``det_offset``/``gt_offset`` are renumbered for the view's own
    ``detections``/``targets``.

    Args:
        parts: ``(result, image rows)`` pairs (a result is a ResultData read back, not a view).
        labelled: add the image columns ``source``, ``model_name``, ``version_name``,
            ``result_name`` (what :func:`open_results` makes).
    """

    def __init__(self, parts: list[tuple[ResultData, np.ndarray]], labelled: bool = False) -> None:
        self._parts = [(data, np.asarray(idx, np.int64)) for data, idx in parts]
        self._labelled = labelled
        self._starts = np.cumsum([0] + [len(idx) for _, idx in self._parts]).astype(np.int64)
        first = self._parts[0][0] if self._parts else None
        self.manifest = first.manifest if first is not None else {}
        self.source = (
            first.source
            if len({d.source for d, _ in self._parts}) == 1 and first is not None
            else ", ".join(sorted({d.source for d, _ in self._parts}))
        )
        self.skipped = [p for d, _ in self._parts for p in d.skipped]
        with_targets = any("gt_offset" in d.images for d, _ in self._parts)
        image_names = _common([list(d.images) for d, _ in self._parts])
        if with_targets:
            image_names += [
                n for n in ("gt_offset", "gt_count", "gt_logged") if n not in image_names
            ]
        if labelled:
            image_names += [n for n in _LABELS if n not in image_names]
        self.images = _Columns(image_names, self._image_column)  # type: ignore[assignment]
        self.detections = _Columns(
            _common([list(d.detections) for d, _ in self._parts]), self._detection_column
        )  # type: ignore[assignment]
        self.targets = _Columns(  # type: ignore[assignment]
            ["boxes", "labels"] if with_targets else [], self._target_column
        )

    @classmethod
    def of(cls, data: ResultData) -> ResultView:
        """``data`` as a view (itself if it is one already)."""
        if isinstance(data, ResultView):
            return data
        return cls([(data, np.arange(len(data), dtype=np.int64))])

    # -- columns ---------------------------------------------------------------------------

    def _image_column(self, name: str) -> Any:
        if name in ("det_offset", "gt_offset"):
            counts = np.asarray(self.images["det_count" if name == "det_offset" else "gt_count"])
            return (np.cumsum(counts) - counts).astype(np.int64)
        pieces: list[Any] = []
        for data, idx in self._parts:
            if name in _LABELS and self._labelled and name not in data.images:
                pieces.append([_label_of(data)[name]] * len(idx))
            elif name in ("gt_count", "gt_logged") and name not in data.images:
                pieces.append(np.zeros(len(idx), np.int64 if name == "gt_count" else np.int8))
            else:
                pieces.append(_take(data.images[name], idx))
        if not pieces:
            return np.empty(0)
        return _concat(pieces, name)

    def _rows(self, data: ResultData, idx: np.ndarray, group: str) -> np.ndarray:
        prefix = "det" if group == "detections" else "gt"
        if f"{prefix}_offset" not in data.images:
            return np.empty(0, np.int64)
        return ranges(data.images[f"{prefix}_offset"][idx], data.images[f"{prefix}_count"][idx])

    def _detection_column(self, name: str) -> Any:
        pieces = [
            data.detections[name][self._rows(data, idx, "detections")] for data, idx in self._parts
        ]
        return _concat(pieces, name)

    def _target_column(self, name: str) -> Any:
        empty = np.empty((0, 4), np.float32) if name == "boxes" else np.empty(0, np.int64)
        pieces = [
            data.targets[name][self._rows(data, idx, "targets")] if name in data.targets else empty
            for data, idx in self._parts
        ]
        return _concat(pieces, name)

    # -- rows ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return f"ResultView({self.source!r}, images={len(self)})"

    def _locate(self, i: int) -> tuple[ResultData, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"image row {i} is out of range: this view has {n} images")
        i = i % n
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        data, idx = self._parts[part]
        return data, int(idx[i - self._starts[part]])

    def image_detections(self, i: int) -> DetectionOutput:
        data, row = self._locate(i)
        return data.image_detections(row)

    def image_targets(self, i: int) -> dict[str, torch.Tensor]:
        data, row = self._locate(i)
        return data.image_targets(row)

    def feature(self, i: int, name: str, decompress: bool = True):
        data, row = self._locate(i)
        return data.feature(row, name, decompress)

    def feature_names(self) -> list[str]:
        return sorted({n for data, _ in self._parts for n in data.feature_names()})

    @property
    def class_names(self) -> list[str] | None:
        names = [data.class_names for data, _ in self._parts]
        return names[0] if names and all(n == names[0] for n in names) else None

    @property
    def has_targets(self) -> bool:
        return any(data.has_targets for data, _ in self._parts)

    # -- slicing ---------------------------------------------------------------------------

    def _subset(self, keep: np.ndarray) -> ResultView:
        """The view of the rows where ``keep`` (a bool mask over this view's rows) is true."""
        parts = [
            (data, idx[keep[self._starts[k] : self._starts[k + 1]]])
            for k, (data, idx) in enumerate(self._parts)
        ]
        return ResultView([(d, i) for d, i in parts if len(i)] or parts[:1], self._labelled)

    def where(
        self,
        dataset_type: str | Sequence[str] | None = None,
        n_epoch: int | Sequence[int] | None = None,
        input_id_prefix: str | None = None,
        **fields: Any,
    ) -> ResultView:
        """See :meth:`pyodlog.io.reader.ResultData.where`."""
        keep = np.ones(len(self), bool)
        conditions: dict[str, Any] = dict(fields)
        if dataset_type is not None:
            conditions["dataset_type"] = dataset_type
        if n_epoch is not None:
            conditions["n_epoch"] = n_epoch
        for name, wanted in conditions.items():
            if name not in self.images:
                raise KeyError(
                    f"where({name}=...): no such image column; the columns are {sorted(self.images)}"
                )
            keep &= _match(self.images[name], wanted, name)
        if input_id_prefix is not None:
            if not isinstance(input_id_prefix, str):
                raise ValueError(f"input_id_prefix must be a str, got {input_id_prefix!r}")
            keep &= np.fromiter(
                (s.startswith(input_id_prefix) for s in self.images["input_id"]), bool, len(self)
            )
        return self._subset(keep)

    def iter_chunks(
        self, rows: int = DEFAULT_CHUNK_ROWS, progress: bool | None = None
    ) -> Iterator[ResultView]:
        """Consecutive views of at most ``rows`` images, in row order (a chunk never spans two results).

        Args:
            rows: images per chunk.
            progress: a tqdm bar (on stderr); None: only for more than 100,000 images and when
                stderr is a terminal.
        """
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be an int >= 1, got {rows!r}")
        with progress_bar(len(self), progress) as bar:
            for data, idx in self._parts:
                for start in range(0, len(idx), rows):
                    chunk = ResultView([(data, idx[start : start + rows])], self._labelled)
                    yield chunk
                    bar.update(len(chunk))


def _common(names: list[list[str]]) -> list[str]:
    """The names every list has, in the first list's order."""
    if not names:
        return []
    rest = [set(n) for n in names[1:]]
    return [n for n in names[0] if all(n in r for r in rest)]


def _match(column: Any, wanted: Any, name: str) -> np.ndarray:
    if callable(wanted):
        mask = np.asarray(wanted(column if not isinstance(column, list) else np.asarray(column)))
        if mask.dtype != bool or mask.shape != (len(column),):
            raise ValueError(
                f"where({name}=callable): the callable must return a bool mask of {len(column)} values"
            )
        return mask
    values = list(wanted) if isinstance(wanted, (list, tuple, set, frozenset)) else [wanted]
    if isinstance(column, list):
        accepted = set(values)
        return np.fromiter((v in accepted for v in column), bool, len(column))
    return np.isin(np.asarray(column), np.asarray(values))
