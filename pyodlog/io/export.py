"""export(): the records of one epoch, from closed segments, into a self-describing ZIP.

Each segment is verified as :func:`pyodlog.open_result` does (its SHA-256,
its layout); a damaged one is left out with a warning and listed in the
manifest's ``skipped_segments``.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pyodlog.io.aggregates import Aggregates
from pyodlog.io.reader import CorruptResultError, Tables, merge_tables, read_segments
from pyodlog.io.segment import SEGMENT_FORMAT, encode_strings, sha256_file

__all__ = ["export_zip", "write_tables"]


def write_tables(path: Path, tables: Tables, attrs: dict[str, Any]) -> None:
    """Writes tables as one plain (non-SWMR) HDF5 file in the segment layout."""
    with h5py.File(path, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = value if not isinstance(value, (dict, list)) else json.dumps(value)
        f.attrs["segment_format"] = SEGMENT_FORMAT
        for name, values in tables.numeric.items():
            f.create_dataset(
                name,
                data=values,
                chunks=True if values.size else None,
                maxshape=(None, *values.shape[1:]),
            )
        for name, texts in tables.strings.items():
            data, lengths = encode_strings(texts)
            offsets = (np.cumsum(lengths) - lengths).astype(np.int64)
            f.create_dataset(name + ".bytes", data=data)
            f.create_dataset(
                name + ".spans",
                data=np.stack([offsets, lengths], 1)
                if len(lengths)
                else np.empty((0, 2), np.int64),
            )
        f.create_dataset("features_payload", data=tables.payload)
        if tables.aggregates:  # the segments' always-on aggregates, merged into one
            merged = Aggregates.merged(tables.aggregates).to_json()
            f.create_dataset("aggregates", data=np.frombuffer(merged, np.uint8))


def export_zip(
    segments: list[Path],
    output: Path,
    n_epoch: int | None,
    meta: dict[str, Any],
    strict: bool = False,
) -> Path:
    """Merges the images of ``n_epoch`` (None: all) from ``segments`` into ``output``, atomically.

    A damaged segment is left out with a warning naming it (manifest: ``skipped_segments``);
    with ``strict``, any damaged or foreign segment stops the export before anything is written.

    Raises:
        CorruptResultError: (``strict``) naming every segment that is not a valid pyodlog segment.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parts, skipped = read_segments(list(segments))
    if skipped and strict:
        raise CorruptResultError(
            "these files are not valid pyodlog segments (nothing was read from them beyond their "
            "structure):\n  " + "\n  ".join(str(w.message) for w in caught)
        )
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    tables = merge_tables(parts, n_epoch, use_epoch_filter=n_epoch is not None)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        records = Path(tmp) / "records.h5"
        write_tables(records, tables, dict(meta, n_epoch=-1 if n_epoch is None else n_epoch))
        manifest = dict(
            meta,
            n_epoch=n_epoch,
            exported=datetime.datetime.now(datetime.timezone.utc).isoformat(),
            counts={
                "images": tables.n_images,
                "detections": len(tables.numeric.get("detections/scores", [])),
                "features": len(tables.strings.get("features/name", [])),
                "segments": len(segments) - len(skipped),
            },
            segments=[s.name for s in segments if s not in skipped],
            skipped_segments=[s.name for s in skipped],
            members={
                "records.h5": {"sha256": sha256_file(records), "bytes": records.stat().st_size}
            },
        )
        partial = Path(tmp) / (output.name + ".partial")
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as z:
            z.writestr("manifest.json", json.dumps(manifest, indent=2, default=str))
            z.write(records, "records.h5")
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, output)  # never a half ZIP under the final name
    return output
