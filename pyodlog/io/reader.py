"""Reading logged records back: segment files, result folders and exported ZIPs."""

from __future__ import annotations

import json
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from pyodlog.ops.compression import METHODS, CompressedFeature

__all__ = ["ResultData", "merge_tables", "open_result", "read_segment", "trim_to_consistent"]


@dataclass
class Tables:
    """The columns of one or more segments: numeric arrays, decoded strings, the feature payload."""

    numeric: dict[str, np.ndarray] = field(default_factory=dict)
    strings: dict[str, list[str]] = field(default_factory=dict)
    payload: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint8))
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return (
            int(self.numeric["images/det_count"].shape[0])
            if "images/det_count" in self.numeric
            else 0
        )


def read_segment(path: str | Path, swmr: bool = False) -> Tables:
    """All columns of one segment (``swmr=True`` reads a crashed ``.part`` up to its last flush)."""
    tables = Tables()
    with h5py.File(path, "r", swmr=swmr, libver="latest" if swmr else "earliest") as f:
        tables.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        names: list[str] = []
        f.visititems(
            lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None
        )
        data = {name: f[name][()] for name in names}
    spans = [n for n in data if n.endswith(".spans")]
    for span_name in spans:
        base = span_name[: -len(".spans")]
        raw = data.pop(base + ".bytes").tobytes()
        pairs = data.pop(span_name)
        # A crashed segment may hold spans whose bytes never reached the disk: stop there.
        complete = pairs[:, 0] + pairs[:, 1] <= len(raw) if len(pairs) else np.ones(0, bool)
        cut = int(np.flatnonzero(~complete)[0]) if (~complete).any() else len(pairs)
        tables.strings[base] = [raw[o : o + n].decode("utf-8") for o, n in pairs[:cut]]
    tables.payload = data.pop("features_payload", np.empty(0, np.uint8))
    tables.numeric = data
    return tables


def trim_to_consistent(tables: Tables) -> Tables:
    """Keeps the longest prefix of images whose every row is complete.

    SWMR keeps each dataset readable, but a crash in the middle of appending a
    batch can leave the columns at different lengths (one dataset's metadata
    reached the disk, another's did not). The images kept are those present in
    every image column whose detections and feature rows are all present too.
    """
    t = tables
    image_cols = [v for k, v in t.numeric.items() if k.startswith("images/")]
    image_cols += [v for k, v in t.strings.items() if k.startswith("images/")]
    n = min((len(v) for v in image_cols), default=0)
    det_cols = [v for k, v in t.numeric.items() if k.startswith("detections/")]
    n_det = min((len(v) for v in det_cols), default=0)
    if n:
        ends = t.numeric["images/det_offset"][:n] + t.numeric["images/det_count"][:n]
        bad = np.flatnonzero(ends > n_det)
        n = int(bad[0]) if len(bad) else n
    feat_cols = [v for k, v in t.numeric.items() if k.startswith("features/")]
    feat_cols += [v for k, v in t.strings.items() if k.startswith("features/")]
    n_feat = min((len(v) for v in feat_cols), default=0)
    if n_feat:
        num = t.numeric
        complete = (
            num["features/payload_offset"][:n_feat] + num["features/payload_nbytes"][:n_feat]
            <= len(t.payload)
        ) & (
            num["features/qrow_offset"][:n_feat] + num["features/qrow_count"][:n_feat]
            <= min(len(num["features_scale"]), len(num["features_offset"]))
        )
        bad = np.flatnonzero(~complete)
        n_feat = int(bad[0]) if len(bad) else n_feat
        # An image is complete only with all of its features.
        first_incomplete_image = (
            num["features/image_row"][n_feat] if n_feat < len(num["features/image_row"]) else n
        )
        n = min(n, int(first_incomplete_image))
        n_feat = int(np.searchsorted(num["features/image_row"][:n_feat], n))
    if n:
        n_det = int(t.numeric["images/det_offset"][n - 1] + t.numeric["images/det_count"][n - 1])
    else:
        n_det, n_feat = 0, 0
    out = Tables(attrs=t.attrs)
    for k, v in t.numeric.items():
        if k.startswith("images/"):
            out.numeric[k] = v[:n]
        elif k.startswith("detections/"):
            out.numeric[k] = v[:n_det]
        elif k.startswith("features/"):
            out.numeric[k] = v[:n_feat]
    for k, v in t.strings.items():
        out.strings[k] = v[:n] if k.startswith("images/") else v[:n_feat]
    if n_feat:
        last_q = int(
            t.numeric["features/qrow_offset"][n_feat - 1]
            + t.numeric["features/qrow_count"][n_feat - 1]
        )
        last_p = int(
            t.numeric["features/payload_offset"][n_feat - 1]
            + t.numeric["features/payload_nbytes"][n_feat - 1]
        )
    else:
        last_q = last_p = 0
    out.numeric["features_scale"] = t.numeric.get("features_scale", np.empty(0, np.float32))[
        :last_q
    ]
    out.numeric["features_offset"] = t.numeric.get("features_offset", np.empty(0, np.float32))[
        :last_q
    ]
    out.payload = t.payload[:last_p]
    return out


def merge_tables(
    parts: list[Tables], keep_epoch: int | None = None, use_epoch_filter: bool = False
) -> Tables:
    """Concatenates segments' tables, optionally keeping the images of one epoch, with offsets renumbered."""
    out = Tables()
    images_base = det_base = payload_base = qrow_base = 0
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
        det_off, det_cnt = (
            part.numeric["images/det_offset"][rows],
            part.numeric["images/det_count"][rows],
        )
        det_rows = (
            np.concatenate([np.arange(o, o + c) for o, c in zip(det_off, det_cnt)])
            if len(rows)
            else np.empty(0, np.int64)
        )
        image_cols = {k: v[rows] for k, v in part.numeric.items() if k.startswith("images/")}
        image_cols["images/det_offset"] = (
            det_base + np.concatenate([[0], np.cumsum(det_cnt)[:-1]]).astype(np.int64)
            if len(rows)
            else np.empty(0, np.int64)
        )
        det_cols = {
            k: v[det_rows.astype(np.int64)]
            for k, v in part.numeric.items()
            if k.startswith("detections/")
        }
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
        for cols in (image_cols, det_cols, feat_cols):
            for k, v in cols.items():
                out.numeric[k] = np.concatenate([out.numeric[k], v]) if k in out.numeric else v
        for k in ("features_scale", "features_offset"):
            pieces = scale_pieces if k == "features_scale" else offset_pieces
            joined = np.concatenate(pieces) if pieces else np.empty(0, np.float32)
            out.numeric[k] = (
                np.concatenate([out.numeric[k], joined]) if k in out.numeric else joined
            )
        out.payload = np.concatenate([out.payload] + payload_pieces)
        for k, v in part.strings.items():
            picked = [v[i] for i in (rows if k.startswith("images/") else feat_rows)]
            out.strings.setdefault(k, []).extend(picked)
        images_base += len(rows)
        det_base += len(det_rows)
        out.attrs = dict(part.attrs)
    return out


class ResultData:
    """Logged records read back: tables as arrays, per-image detections, decompressed features.

    Attributes:
        images: ``{column: array or list of str}``, one row per image
            (``input_id``, ``dataset_type``, ``n_epoch`` (-1: untagged),
            ``timestamp``, ``image_size``, ``det_offset``, ``det_count``,
            ``fields/<name>``).
        detections: ``{column: array}``, one row per detection.
        manifest: the export manifest (ZIP) or the result's manifest (folder).
    """

    def __init__(self, tables: Tables, manifest: dict[str, Any]) -> None:
        self._t = tables
        self.manifest = manifest
        strip = lambda d, prefix: {
            k[len(prefix) :]: v for k, v in d.items() if k.startswith(prefix)
        }
        images = {**strip(tables.numeric, "images/"), **strip(tables.strings, "images/")}
        # additional_fields appear under their own names
        self.images: dict[str, Any] = {k.split("/", 1)[-1]: v for k, v in images.items()}
        self.detections: dict[str, np.ndarray] = strip(tables.numeric, "detections/")

    def __len__(self) -> int:
        return self._t.n_images

    def image_detections(self, i: int) -> dict[str, torch.Tensor]:
        """The detections of image row ``i`` as tensors (boxes, scores, labels, logits, ...)."""
        o, n = int(self.images["det_offset"][i]), int(self.images["det_count"][i])
        return {
            k: torch.from_numpy(np.ascontiguousarray(v[o : o + n]))
            for k, v in self.detections.items()
        }

    def feature_names(self) -> list[str]:
        return sorted(set(self._t.strings.get("features/name", [])))

    def feature(self, i: int, name: str, decompress: bool = True):
        """The captured tensor ``name`` of image row ``i``, decompressed (or the CompressedFeature)."""
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
        payload_dtype = t.strings["features/payload_dtype"][r]
        np_dtype = {"bfloat16": np.uint16}.get(payload_dtype, payload_dtype)
        payload = torch.from_numpy(t.payload[po : po + pn].copy().view(np_dtype).reshape(shape))
        if payload_dtype == "bfloat16":
            payload = payload.view(torch.bfloat16)
        method = METHODS[int(t.numeric["features/method"][r])]
        pooled = tuple(int(v) for v in t.numeric["features/pooled_to"][r])
        per_image = bool(t.numeric["features/per_image"][r])
        if per_image:
            # The image's slice of a batch tensor: quantisation rows are its channels.
            payload, original = payload.unsqueeze(0), (1, *original)
        feature = CompressedFeature(
            method,
            payload,
            torch.from_numpy(t.numeric["features_scale"][qo : qo + qn].copy())
            if method == "uint8"
            else None,
            torch.from_numpy(t.numeric["features_offset"][qo : qo + qn].copy())
            if method == "uint8"
            else None,
            getattr(torch, t.strings["features/dtype"][r]),
            original,
            None if pooled[0] < 0 else pooled,
        )
        if not decompress:
            return feature
        restored = feature.decompress()
        return restored[0] if per_image else restored


def open_result(
    path: str | Path, n_epoch: int | None = None, all_epochs: bool = True
) -> ResultData:
    """Reads a result folder (its closed segments) or an exported ZIP.

    Args:
        path: a result folder (``PYODLOG_HOME/model/version/result``) or a ZIP from ``export()``.
        n_epoch, all_epochs: for a folder, keep only the images of ``n_epoch``
            (-1/None: untagged) unless ``all_epochs``.
    """
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z, tempfile.TemporaryDirectory() as tmp:
            manifest = json.loads(z.read("manifest.json"))
            z.extract("records.h5", tmp)
            return ResultData(read_segment(Path(tmp) / "records.h5"), manifest)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a result folder nor an exported ZIP")
    segments = sorted(path.glob("*.h5"))
    manifest_path = path / "result.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return ResultData(
        merge_tables([read_segment(s) for s in segments], n_epoch, not all_epochs), manifest
    )


def segment_epochs(path: str | Path) -> set[int]:
    """The epochs (``n_epoch`` values, -1: untagged) of the images a closed segment holds."""
    with h5py.File(path, "r") as f:
        column = f["images/n_epoch"][()] if "images/n_epoch" in f else np.empty(0, np.int64)
    return {int(e) for e in np.unique(column)}
