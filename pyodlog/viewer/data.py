"""What the viewer shows, computed from a result's columns with numpy (no loop over detections).

:class:`ViewerResult` wraps one :class:`~pyodlog.io.reader.ResultData` and answers the gallery's
queries (:class:`Query`: filters, sort, page) on the columns, so that the first page of a result
with a million detections comes back in well under a second. Optional columns are used when
present: ``entropy`` / ``margin`` (uncertainty), ``near_misses`` and ``targets`` (ground truth),
``thumbnail``; the viewer never writes into the result.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyodlog.io.reader import ResultData, open_result

__all__ = ["ImageDetail", "Query", "ViewerResult", "find_results", "load_result"]

SORTS = ("time", "score", "uncertainty")
# Families whose class head is per-class sigmoid (the others: softmax over the logit row).
SIGMOID_FAMILIES = {"RetinaNetLogger", "FCOSLogger", "UltralyticsYOLOLogger"}
# A detection and a ground-truth box agree at this IoU (same class); a detection counts from this score.
MATCH_IOU = 0.5
ERROR_SCORE = 0.5


def _is_result_dir(path: Path) -> bool:
    try:
        return path.is_dir() and (
            (path / "result.json").is_file()
            or any(n.endswith((".h5", ".h5.part")) for n in os.listdir(path))
        )
    except OSError:
        return False


def find_results(path: str | Path) -> list[Path]:
    """The results ``path`` names: itself (a ZIP, a result folder or an ``s3://`` result), or those
    under it (PYODLOG_HOME).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a folder without any result (the message says what to pass).
    """
    if isinstance(path, str) and "://" in path:
        return [path]  # type: ignore[list-item]  # a remote result: open_result reads it via its cache
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: pass a result folder, a ZIP or PYODLOG_HOME"
        )
    if _is_result_dir(path):
        return [path]
    found: list[Path] = []
    for depth in ("*", "*/*", "*/*/*"):
        found += [
            p for p in sorted(path.glob(depth)) if not p.name.startswith(".") and _is_result_dir(p)
        ]
        if found:
            break
    found += sorted(p for p in path.glob("*.zip") if p.is_file())
    if not found:
        raise ValueError(
            f"{path} holds no pyodlog result: pass a result folder (PYODLOG_HOME/MODEL/VERSION/RESULT), "
            f"an exported ZIP, or a PYODLOG_HOME that holds results"
        )
    return found


def load_result(path: Path) -> ResultData:
    return open_result(path)


@dataclass
class Query:
    """The gallery's filters, sort and page (all optional; see :meth:`ViewerResult.select`)."""

    dataset_type: str | None = None
    epoch: int | None = None
    label: int | None = None
    score_min: float | None = None
    score_max: float | None = None
    unc_min: float | None = None
    unc_max: float | None = None
    near_miss: bool = False
    gt_error: bool = False
    fields: dict[str, str] = field(default_factory=dict)
    sort: str = "time"
    page: int = 0
    per_page: int = 48


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else counts


def _per_image(values: np.ndarray, owner: np.ndarray, n: int, how: str, empty: float) -> np.ndarray:
    """Per image, the max (or min) of its detections' values; ``empty`` for an image without any."""
    out = np.full(n, -np.inf if how == "max" else np.inf, np.float64)
    if len(values):
        (np.maximum if how == "max" else np.minimum).at(out, owner, values.astype(np.float64))
    out[~np.isfinite(out)] = empty
    return out


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


@dataclass
class ImageDetail:
    """Everything the image page shows for one image."""

    row: int
    input_id: str
    size: tuple[int, int]
    info: dict[str, Any]
    detections: list[dict[str, Any]]
    near_misses: list[dict[str, Any]]
    targets: list[dict[str, Any]]


class ViewerResult:
    """One result, indexed for the viewer's queries (see the module docstring)."""

    def __init__(self, data: ResultData, name: str = "") -> None:
        self.data = data
        self.name = name or data.source
        images, det = data.images, data.detections
        self.n_images = n = len(data)
        self.counts = np.asarray(images.get("det_count", np.zeros(n, np.int64)), np.int64)
        self.offsets = np.asarray(images.get("det_offset", _offsets(self.counts)), np.int64)
        self.owner = np.repeat(np.arange(n, dtype=np.int64), self.counts)
        self.scores = np.asarray(det.get("scores", np.zeros(0, np.float32)))
        self.labels = np.asarray(det.get("labels", np.zeros(0, np.int64)))
        self.max_score = _per_image(self.scores, self.owner, n, "max", 0.0)
        self.entropy = np.asarray(det["entropy"]) if "entropy" in det else None
        self.margin = np.asarray(det["margin"]) if "margin" in det else None
        # Per image: the most uncertain detection (highest entropy, else lowest margin).
        if self.entropy is not None:
            self.uncertainty: np.ndarray | None = _per_image(
                self.entropy, self.owner, n, "max", 0.0
            )
            self.uncertainty_name = "entropy"
        elif self.margin is not None:
            self.uncertainty = -_per_image(self.margin, self.owner, n, "min", math.inf)
            self.uncertainty_name = "margin"
        else:
            self.uncertainty, self.uncertainty_name = None, ""
        self.timestamps = np.asarray(images.get("timestamp", np.zeros(n)))
        self.dataset_types = np.asarray(images.get("dataset_type", []), dtype=object)
        self.epochs = np.asarray(images.get("n_epoch", np.zeros(n, np.int64)))
        self.thumbnails = images.get("thumbnail")
        self.near_misses: dict[str, np.ndarray] | None = getattr(data, "near_misses", None) or None
        self.nm_counts = (
            np.asarray(images["nm_count"], np.int64)
            if self.near_misses is not None and "nm_count" in images
            else None
        )
        self.targets: dict[str, np.ndarray] | None = getattr(data, "targets", None) or None
        self.gt_counts = (
            np.asarray(images["gt_count"], np.int64)
            if self.targets is not None and "gt_count" in images
            else None
        )
        self._gt_error: np.ndarray | None = None
        self._class_counts: list[tuple[int, int]] | None = None
        schema = data.manifest.get("schema") if isinstance(data.manifest, dict) else None
        self.field_names = sorted(
            f["name"]
            for f in ((schema or {}).get("additional_fields") or [])
            if isinstance(f, dict) and isinstance(f.get("name"), str) and f["name"] in images
        )
        family = (schema or {}).get("family") if isinstance(schema, dict) else None
        self.activation = "sigmoid" if family in SIGMOID_FAMILIES else "softmax"
        names = getattr(data, "class_names", None)
        if not names and isinstance(schema, dict):
            names = schema.get("class_names")
        self.class_names: list[str] | None = list(names) if names else None

    # -- naming ----------------------------------------------------------------------------------

    def class_name(self, label: int) -> str:
        names = self.class_names
        if names and 0 <= label < len(names):
            return str(names[label])
        return f"class {label}"

    def has_thumbnail(self, i: int) -> bool:
        return self.thumbnails is not None and bool(self.thumbnails[i])

    def image_size(self, i: int) -> tuple[int, int]:
        h, w = (int(v) for v in self.data.images["image_size"][i])
        return h, w

    def input_id(self, i: int) -> str:
        return str(self.data.images["input_id"][i])

    # -- ground truth ----------------------------------------------------------------------------

    def gt_error(self) -> np.ndarray | None:
        """Per image: a ground-truth box missed or a detection (score >= 0.5) matching none (IoU 0.5, same class)."""
        if self.targets is None or self.gt_counts is None:
            return None
        if self._gt_error is None:
            gt_offsets = np.asarray(self.data.images["gt_offset"], np.int64)
            boxes = np.asarray(self.data.detections["boxes"])
            gt_boxes, gt_labels = (
                np.asarray(self.targets["boxes"]),
                np.asarray(self.targets["labels"]),
            )
            error = np.zeros(self.n_images, bool)
            confident = self.scores >= ERROR_SCORE
            for i in np.flatnonzero((self.gt_counts > 0) | (self.counts > 0)):
                o, c = self.offsets[i], self.counts[i]
                keep = np.flatnonzero(confident[o : o + c]) + o
                go, gc = gt_offsets[i], self.gt_counts[i]
                if not len(keep) or not gc:
                    error[i] = bool(len(keep)) != bool(gc)
                    continue
                iou = _box_iou(boxes[keep], gt_boxes[go : go + gc])
                iou[self.labels[keep][:, None] != gt_labels[go : go + gc][None, :]] = 0
                hit = iou >= MATCH_IOU
                error[i] = not (hit.any(0).all() and hit.any(1).all())
            self._gt_error = error
        return self._gt_error

    # -- the gallery ------------------------------------------------------------------------------

    def _images_with(self, det_mask: np.ndarray) -> np.ndarray:
        out = np.zeros(self.n_images, bool)
        out[self.owner[det_mask]] = True
        return out

    def select(self, q: Query) -> tuple[np.ndarray, int]:
        """The image rows of page ``q.page`` matching ``q`` in ``q.sort`` order, and how many match."""
        keep = np.ones(self.n_images, bool)
        if q.dataset_type:
            keep &= self.dataset_types == q.dataset_type
        if q.epoch is not None:
            keep &= self.epochs == q.epoch
        det = None
        if q.label is not None:
            det = self.labels == q.label
        if q.score_min is not None or q.score_max is not None:
            s = self.scores
            m = np.ones(len(s), bool)
            if q.score_min is not None:
                m &= s >= q.score_min
            if q.score_max is not None:
                m &= s <= q.score_max
            det = m if det is None else det & m
        if self.uncertainty is not None and (q.unc_min is not None or q.unc_max is not None):
            u = self.entropy if self.entropy is not None else self.margin
            assert u is not None
            m = np.ones(len(u), bool)
            if q.unc_min is not None:
                m &= u >= q.unc_min
            if q.unc_max is not None:
                m &= u <= q.unc_max
            det = m if det is None else det & m
        if det is not None:
            keep &= self._images_with(det)
        if q.near_miss and self.nm_counts is not None:
            keep &= self.nm_counts > 0
        if q.gt_error:
            error = self.gt_error()
            if error is not None:
                keep &= error
        for name, value in q.fields.items():
            if name in self.field_names and value != "":
                column = self.data.images[name]
                if isinstance(column, list):
                    keep &= np.asarray(column, dtype=object) == value
                elif column.dtype.kind == "b":
                    keep &= column == (value.lower() in ("1", "true", "yes"))
                else:
                    keep &= _numeric_equal(column, value)
        rows = np.flatnonzero(keep)
        if q.sort == "score":
            rows = rows[np.argsort(-self.max_score[rows], kind="stable")]
        elif q.sort == "uncertainty" and self.uncertainty is not None:
            rows = rows[np.argsort(-self.uncertainty[rows], kind="stable")]
        else:
            rows = rows[np.argsort(self.timestamps[rows], kind="stable")]
        start = max(q.page, 0) * q.per_page
        return rows[start : start + q.per_page], len(rows)

    def field_values(self, name: str, limit: int = 50) -> list[str]:
        column = self.data.images[name]
        values = column if isinstance(column, list) else [str(v) for v in np.unique(column)[:limit]]
        return sorted(set(values))[:limit]

    # -- one image --------------------------------------------------------------------------------

    def detail(self, i: int) -> ImageDetail:
        data = self.data
        o, c = int(self.offsets[i]), int(self.counts[i])
        det = data.detections
        dets = _rows(det, o, c, self)
        near: list[dict[str, Any]] = []
        if self.near_misses is not None and "nm_offset" in data.images:
            no, nc = int(data.images["nm_offset"][i]), int(data.images["nm_count"][i])
            near = _rows(self.near_misses, no, nc, self)
            reasons = {1: "below score", 2: "suppressed", 3: "over cap"}
            for k, row in enumerate(near):
                nm = self.near_misses
                if "reason" in nm:
                    row["reason"] = reasons.get(
                        int(nm["reason"][no + k]), str(int(nm["reason"][no + k]))
                    )
                if "suppressed_by" in nm:
                    by = int(nm["suppressed_by"][no + k])
                    row["suppressed_by"] = by if 0 <= by < c else None
                if "suppressor_iou" in nm:
                    iou = float(nm["suppressor_iou"][no + k])
                    row["suppressor_iou"] = None if math.isnan(iou) else iou
        targets: list[dict[str, Any]] = []
        if self.targets is not None and "gt_offset" in data.images:
            go, gc = int(data.images["gt_offset"][i]), int(data.images["gt_count"][i])
            for k in range(go, go + gc):
                label = int(self.targets["labels"][k])
                targets.append(
                    {
                        "box": [float(v) for v in self.targets["boxes"][k]],
                        "label": label,
                        "name": self.class_name(label),
                    }
                )
        info: dict[str, Any] = {
            "dataset_type": str(self.dataset_types[i]) if len(self.dataset_types) else "",
            "epoch": int(self.epochs[i]),
            "timestamp": float(self.timestamps[i]),
        }
        for name in self.field_names:
            value = data.images[name][i]
            info[name] = value.item() if hasattr(value, "item") else value
        return ImageDetail(i, self.input_id(i), self.image_size(i), info, dets, near, targets)

    # -- the result page ---------------------------------------------------------------------------

    def class_counts(self) -> list[tuple[int, int]]:
        """(label, detections) by decreasing count (computed once)."""
        cached = self._class_counts
        if cached is None:
            cached = []
            if len(self.labels):
                labels, counts = np.unique(self.labels, return_counts=True)
                order = np.argsort(-counts, kind="stable")
                cached = [(int(labels[k]), int(counts[k])) for k in order]
            self._class_counts = cached
        return cached

    def embedding_map(
        self, limit: int = 3000, seed: int = 0
    ) -> list[tuple[float, float, int, int]]:
        """A 2-D PCA map (``torch.pca_lowrank``) of detection embeddings: (x, y, label, image row)."""
        emb = self.data.detections.get("embeddings")
        if emb is None or len(emb) < 3 or emb.shape[1] < 2:
            return []
        import torch

        rows = np.arange(len(emb))
        if len(rows) > limit:
            rows = np.sort(np.random.default_rng(seed).choice(len(emb), limit, replace=False))
        x = torch.from_numpy(np.ascontiguousarray(emb[rows], dtype=np.float32))
        x = torch.nan_to_num(x)
        _, _, v = torch.pca_lowrank(x, q=2, center=True)
        xy = ((x - x.mean(0)) @ v[:, :2]).numpy()
        return [
            (float(a), float(b), int(self.labels[r]), int(self.owner[r]))
            for (a, b), r in zip(xy, rows)
        ]


def _numeric_equal(column: np.ndarray, value: str) -> np.ndarray:
    try:
        return np.asarray(column) == float(value)
    except ValueError:
        return np.zeros(len(column), bool)


def _top5(logits: np.ndarray, activation: str) -> list[tuple[int, float, float]]:
    """(class, logit, probability) of the 5 largest logits; softmax or per-class sigmoid."""
    if not len(logits):
        return []
    z = logits.astype(np.float64)
    if activation == "sigmoid":
        p = 1 / (1 + np.exp(-z))
    else:
        p = np.exp(z - z.max())
        p /= p.sum()
    top = np.argsort(-z, kind="stable")[:5]
    return [(int(k), float(z[k]), float(p[k])) for k in top]


def _rows(
    columns: dict[str, np.ndarray], o: int, c: int, result: ViewerResult
) -> list[dict[str, Any]]:
    out = []
    for k in range(o, o + c):
        label = int(columns["labels"][k])
        row: dict[str, Any] = {
            "box": [float(v) for v in columns["boxes"][k]],
            "score": float(columns["scores"][k]),
            "label": label,
            "name": result.class_name(label),
            "top5": [
                (kk, result.class_name(kk), z, p)
                for kk, z, p in _top5(np.asarray(columns["logits"][k]), result.activation)
            ]
            if "logits" in columns
            else [],
        }
        for name in ("entropy", "margin", "energy"):
            if name in columns:
                row[name] = float(columns[name][k])
        out.append(row)
    return out
