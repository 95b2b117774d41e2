"""COCO-style evaluation of logged detections against logged ground truth (``targets=``).

The average precision and recall are pycocotools' own (``COCOeval``, bbox), not a
reimplementation: the logged detections and targets are handed to it as a COCO dataset and
results. pyodlog adds what COCOeval does not report: per-class results by class name, a detection
confusion matrix with a background row and column, and the worst errors by ``input_id``.

Memory: the evaluated slice is read chunk by chunk (``iter_chunks``), keeping only boxes, scores
and labels (28 bytes a detection or ground-truth box, plus pycocotools' own per-annotation
dicts, about 1 KiB each): logits, embeddings and features are never gathered.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from pyodlog.analysis.classes import class_name as _name
from pyodlog.io.interop import coco_dataset, coco_results
from pyodlog.io.rows import ranges

__all__ = ["COCO_IOU_THRESHOLDS", "Evaluation", "coco_dataset", "coco_results", "evaluate"]

#: COCO's IoU thresholds: 0.50, 0.55, ..., 0.95.
COCO_IOU_THRESHOLDS = tuple(float(t) for t in np.linspace(0.5, 0.95, 10))


@dataclass
class _Collected:
    """What evaluation needs of a slice: per image its id, size, detections and ground truth."""

    input_ids: list[str] = field(default_factory=list)
    sizes: list[np.ndarray] = field(default_factory=list)
    det_counts: list[np.ndarray] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    gt_counts: list[np.ndarray] = field(default_factory=list)
    gt_boxes: list[np.ndarray] = field(default_factory=list)
    gt_labels: list[np.ndarray] = field(default_factory=list)

    def arrays(self) -> dict[str, Any]:
        def cat(pieces: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
            return np.concatenate(pieces) if pieces else empty

        return {
            "input_ids": self.input_ids,
            "sizes": cat(self.sizes, np.empty((0, 2), np.int64)),
            "det_counts": cat(self.det_counts, np.empty(0, np.int64)),
            "boxes": cat(self.boxes, np.empty((0, 4), np.float32)),
            "scores": cat(self.scores, np.empty(0, np.float32)),
            "labels": cat(self.labels, np.empty(0, np.int64)),
            "gt_counts": cat(self.gt_counts, np.empty(0, np.int64)),
            "gt_boxes": cat(self.gt_boxes, np.empty((0, 4), np.float32)),
            "gt_labels": cat(self.gt_labels, np.empty(0, np.int64)),
        }


def _collect(data: Any, chunk_rows: int, progress: bool | None) -> dict[str, Any]:
    """The images of ``data`` logged with ``targets=``, chunk by chunk (boxes, scores, labels only)."""
    out = _Collected()
    for chunk in data.iter_chunks(rows=chunk_rows, progress=progress):
        images = chunk.images
        if "gt_logged" not in images or not len(chunk):
            continue
        keep = np.flatnonzero(np.asarray(images["gt_logged"]) == 1)
        if not len(keep):
            continue
        det_rows = ranges(images["det_offset"][keep], images["det_count"][keep])
        gt_rows = ranges(images["gt_offset"][keep], images["gt_count"][keep])
        ids = images["input_id"]
        out.input_ids.extend(ids[i] for i in keep.tolist())
        out.sizes.append(np.asarray(images["image_size"][keep], np.int64))
        out.det_counts.append(np.asarray(images["det_count"][keep], np.int64))
        out.gt_counts.append(np.asarray(images["gt_count"][keep], np.int64))
        det = chunk.detections
        out.boxes.append(np.asarray(det["boxes"][det_rows], np.float32))
        out.scores.append(np.asarray(det["scores"][det_rows], np.float32))
        out.labels.append(np.asarray(det["labels"][det_rows], np.int64))
        out.gt_boxes.append(np.asarray(chunk.targets["boxes"][gt_rows], np.float32))
        out.gt_labels.append(np.asarray(chunk.targets["labels"][gt_rows], np.int64))
    return out.arrays()


@dataclass
class Evaluation:
    """The result of :func:`evaluate`; :meth:`to_dict` gives it as plain JSON-able values.

    Attributes:
        map, map_50, map_75: AP averaged over ``iou_thresholds`` / at IoU 0.5 / 0.75 (None when
            that threshold was not evaluated; NaN when no image had ground truth).
        map_small, map_medium, map_large: AP by COCO object size.
        recall: COCO's average recall (at ``max_detections``).
        per_class: ``{class name: {"label", "ap", "ap_50", "ap_75", "recall", "n_ground_truth",
            "n_detections"}}``.
        confusion_matrix: ``{"labels": [names..., "background"], "matrix": rows = ground truth,
            columns = predicted; the last row: detections of no object (false positives), the last
            column: objects no detection found (missed)}``, at ``score_threshold`` and IoU 0.5.
        errors: ``{"false_positives", "missed", "confusions"}``, each a list (worst first) of
            dicts with ``input_id``, ``image_row``, boxes, labels, class names, score, IoU.
        n_images, n_detections, n_ground_truth: what was evaluated (images logged with targets).
    """

    map: float
    map_50: float | None
    map_75: float | None
    map_small: float
    map_medium: float
    map_large: float
    recall: float
    per_class: dict[str, dict[str, Any]]
    confusion_matrix: dict[str, Any]
    errors: dict[str, list[dict[str, Any]]]
    n_images: int
    n_detections: int
    n_ground_truth: int
    iou_thresholds: list[float]
    max_detections: int
    score_threshold: float

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain Python values (NaN where a value is undefined)."""
        return {
            "map": self.map,
            "map_50": self.map_50,
            "map_75": self.map_75,
            "map_small": self.map_small,
            "map_medium": self.map_medium,
            "map_large": self.map_large,
            "recall": self.recall,
            "per_class": self.per_class,
            "confusion_matrix": self.confusion_matrix,
            "errors": self.errors,
            "n_images": self.n_images,
            "n_detections": self.n_detections,
            "n_ground_truth": self.n_ground_truth,
            "iou_thresholds": self.iou_thresholds,
            "max_detections": self.max_detections,
            "score_threshold": self.score_threshold,
        }

    def __str__(self) -> str:
        def f(v: float | None) -> str:
            return "-" if v is None or v != v else f"{v:.3f}"

        lines = [
            f"images {self.n_images}, detections {self.n_detections}, ground truth "
            f"{self.n_ground_truth}",
            f"mAP {f(self.map)}  mAP@.5 {f(self.map_50)}  mAP@.75 {f(self.map_75)}  "
            f"recall {f(self.recall)}",
            f"{'class':<24} {'AP':>6} {'AP50':>6} {'recall':>6} {'gt':>6} {'det':>6}",
        ]
        for name, row in self.per_class.items():
            lines.append(
                f"{name[:24]:<24} {f(row['ap']):>6} {f(row['ap_50']):>6} {f(row['recall']):>6} "
                f"{row['n_ground_truth']:>6} {row['n_detections']:>6}"
            )
        return "\n".join(lines)


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else float("nan")


def _threshold_index(thresholds: np.ndarray, value: float) -> int | None:
    hits = np.flatnonzero(np.isclose(thresholds, value))
    return int(hits[0]) if len(hits) else None


def _check_thresholds(iou_thresholds: Any) -> np.ndarray:
    if iou_thresholds is None:
        return np.asarray(COCO_IOU_THRESHOLDS)
    try:
        values = np.asarray(sorted(float(t) for t in iou_thresholds), np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"iou_thresholds must be a list of numbers in (0, 1], got {iou_thresholds!r}"
        ) from None
    if not len(values) or np.any(values <= 0) or np.any(values > 1):
        raise ValueError(f"iou_thresholds must be numbers in (0, 1], got {iou_thresholds!r}")
    return values


def evaluate(
    data: Any,
    iou_thresholds: Any = None,
    *,
    score_threshold: float = 0.25,
    max_detections: int | None = None,
    worst: int = 20,
    chunk_rows: int = 65536,
    progress: bool | None = None,
) -> Evaluation:
    """COCO mAP, per-class AP and recall (pycocotools), a confusion matrix and the worst errors.

    Evaluates the images logged with ``targets=`` (``images["gt_logged"] == 1``); images of the
    slice logged without targets are left out.

    Args:
        data: a ResultData, a view (``where(...)``), :func:`pyodlog.open_results`'s result or a
            :class:`pyodlog.io.views.LazyResults` (streamed).
        iou_thresholds: None: COCO's 0.50:0.05:0.95.
        score_threshold: detections at or above it count in the confusion matrix and the errors
            (AP uses every detection, as COCO does).
        max_detections: detections per image COCOeval considers (its ``maxDets``); None: 100, or
            the most any image has when that is more.
        worst: how many of each kind of error to list.
        chunk_rows, progress: how the slice is read (see ``iter_chunks``).

    Raises:
        ValueError: bad arguments, or no image of the slice was logged with targets.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    thresholds = _check_thresholds(iou_thresholds)
    a = _collect(data, chunk_rows, progress)
    n_images = len(a["input_ids"])
    if n_images == 0:
        raise ValueError(
            "no image of this slice was logged with ground truth: pass targets=[{'boxes': ..., "
            "'labels': ...}, ...] to the logged calls (one per image), then evaluate that slice "
            "(e.g. data.where(dataset_type='val'))"
        )
    names = getattr(data, "class_names", None)
    most = int(a["det_counts"].max()) if len(a["det_counts"]) else 0
    max_dets = int(max_detections) if max_detections is not None else max(100, most)
    gt = COCO()
    gt.dataset = coco_dataset(
        a["input_ids"],
        a["sizes"],
        a["gt_counts"],
        a["gt_boxes"],
        a["gt_labels"],
        names,
        a["labels"],
    )
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        results = coco_results(a["det_counts"], a["boxes"], a["scores"], a["labels"])
        dt = gt.loadRes(results) if results else COCO()
        if not results:
            dt.dataset = {"images": gt.dataset["images"], "annotations": [], "categories": []}
            dt.createIndex()
        coco_eval = COCOeval(gt, dt, "bbox")
        coco_eval.params.iouThrs = thresholds
        coco_eval.params.maxDets = [1, 10, max_dets]
        coco_eval.evaluate()
        coco_eval.accumulate()
    precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
    recall = coco_eval.eval["recall"]  # [T, K, A, M]
    cat_ids = list(coco_eval.params.catIds)
    i50, i75 = _threshold_index(thresholds, 0.5), _threshold_index(thresholds, 0.75)

    def ap(t: int | None = None, k: int | None = None, area: int = 0) -> float:
        p = precision[:, :, :, area, -1]
        if t is not None:
            p = p[t : t + 1]
        if k is not None:
            p = p[:, :, k]
        return _mean_valid(p)

    gt_per_class = {int(c): int(n) for c, n in zip(*np.unique(a["gt_labels"], return_counts=True))}
    det_per_class = {int(c): int(n) for c, n in zip(*np.unique(a["labels"], return_counts=True))}
    per_class: dict[str, dict[str, Any]] = {}
    for k, cat in enumerate(cat_ids):
        name = _name(names, cat)
        if name in per_class:
            name = f"{name} ({cat})"
        per_class[name] = {
            "label": int(cat),
            "ap": ap(None, k),
            "ap_50": ap(i50, k) if i50 is not None else None,
            "ap_75": ap(i75, k) if i75 is not None else None,
            "recall": _mean_valid(recall[:, k, 0, -1]),
            "n_ground_truth": gt_per_class.get(int(cat), 0),
            "n_detections": det_per_class.get(int(cat), 0),
        }
    matrix, errors = _confusion_and_errors(a, names, score_threshold, worst)
    return Evaluation(
        map=ap(),
        map_50=ap(i50) if i50 is not None else None,
        map_75=ap(i75) if i75 is not None else None,
        map_small=ap(area=1),
        map_medium=ap(area=2),
        map_large=ap(area=3),
        recall=_mean_valid(recall[:, :, 0, -1]),
        per_class=per_class,
        confusion_matrix=matrix,
        errors=errors,
        n_images=n_images,
        n_detections=len(a["labels"]),
        n_ground_truth=len(a["gt_labels"]),
        iou_thresholds=[float(t) for t in thresholds],
        max_detections=max_dets,
        score_threshold=float(score_threshold),
    )


def _confusion_and_errors(
    a: dict[str, Any], names: list[str] | None, score_threshold: float, worst: int, iou: float = 0.5
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Per image: detections above ``score_threshold`` matched greedily (best IoU first, any class)
    to ground truth at IoU >= ``iou``; a match of another class is a confusion."""
    labels_seen = np.concatenate([a["labels"], a["gt_labels"]])
    size = int(labels_seen.max()) + 1 if len(labels_seen) else 0
    if names is not None:
        size = max(size, len(names))
    bg = size
    matrix = np.zeros((size + 1, size + 1), np.int64)
    false_positives: list[dict[str, Any]] = []
    missed: list[dict[str, Any]] = []
    confusions: list[dict[str, Any]] = []
    det_start = np.concatenate([[0], np.cumsum(a["det_counts"])])
    gt_start = np.concatenate([[0], np.cumsum(a["gt_counts"])])
    for i, input_id in enumerate(a["input_ids"]):
        d0, d1, g0, g1 = det_start[i], det_start[i + 1], gt_start[i], gt_start[i + 1]
        scores = a["scores"][d0:d1]
        kept = np.flatnonzero(scores >= score_threshold)
        boxes, labels, scores = a["boxes"][d0:d1][kept], a["labels"][d0:d1][kept], scores[kept]
        gt_boxes, gt_labels = a["gt_boxes"][g0:g1], a["gt_labels"][g0:g1]
        matched_det = np.full(len(kept), -1)
        matched_gt = np.full(len(gt_labels), -1)
        ious = np.zeros((len(kept), len(gt_labels)), np.float64)
        if len(kept) and len(gt_labels):
            ious = box_iou(torch.from_numpy(boxes), torch.from_numpy(gt_boxes)).double().numpy()
            pairs = np.argwhere(ious >= iou)
            order = np.lexsort((-ious[pairs[:, 0], pairs[:, 1]],))  # best IoU first
            for d, g in pairs[order]:
                if matched_det[d] < 0 and matched_gt[g] < 0:
                    matched_det[d], matched_gt[g] = g, d
        row = {"input_id": input_id, "image_row": i}
        for d in range(len(kept)):
            g = matched_det[d]
            label = int(labels[d])
            if g < 0:
                matrix[bg, label] += 1
                best = float(ious[d].max()) if ious.shape[1] else 0.0
                false_positives.append(
                    {
                        **row,
                        "box": boxes[d].tolist(),
                        "label": label,
                        "class": _name(names, label),
                        "score": float(scores[d]),
                        "best_iou": best,
                    }
                )
                continue
            true = int(gt_labels[g])
            matrix[true, label] += 1
            if true != label:
                confusions.append(
                    {
                        **row,
                        "box": boxes[d].tolist(),
                        "gt_box": gt_boxes[g].tolist(),
                        "label": label,
                        "class": _name(names, label),
                        "gt_label": true,
                        "gt_class": _name(names, true),
                        "score": float(scores[d]),
                        "iou": float(ious[d, g]),
                    }
                )
        for g in np.flatnonzero(matched_gt < 0):
            true = int(gt_labels[g])
            matrix[true, bg] += 1
            box = gt_boxes[g]
            best_score = (
                float(scores[ious[:, g] > 0].max()) if len(kept) and (ious[:, g] > 0).any() else 0.0
            )
            missed.append(
                {
                    **row,
                    "gt_box": box.tolist(),
                    "gt_label": true,
                    "gt_class": _name(names, true),
                    "area": float((box[2] - box[0]) * (box[3] - box[1])),
                    "best_overlapping_score": best_score,
                }
            )
    false_positives.sort(key=lambda e: -e["score"])
    confusions.sort(key=lambda e: -e["score"])
    missed.sort(key=lambda e: -e["area"])
    labels_out = [_name(names, k) for k in range(size)] + ["background"]
    return (
        {
            "labels": labels_out,
            "matrix": matrix.tolist(),
            "rows": "ground truth",
            "columns": "predicted",
            "score_threshold": float(score_threshold),
            "iou_threshold": iou,
        },
        {
            "false_positives": false_positives[:worst],
            "missed": missed[:worst],
            "confusions": confusions[:worst],
        },
    )
