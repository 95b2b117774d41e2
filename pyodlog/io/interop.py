"""Logged records for other tools: Arrow tables, Parquet files, pandas frames, COCO JSON.

Tables (:func:`to_arrow`): ``images`` (one row per image: ``image_row``, ``input_id``,
``dataset_type``, ``n_epoch``, ``timestamp``, ``height``, ``width``, ``det_count``, the additional
fields, …), ``detections`` (one row per detection: ``image_row`` (the join key), ``input_id``,
``x1``, ``y1``, ``x2``, ``y2``, ``score``, ``label``, ``class_name``, ``candidate_index``,
``logits`` as a fixed-size list, ``embedding`` as one) and, when ground truth was logged,
``targets`` (``image_row``, ``input_id``, box, ``label``, ``class_name``). So DuckDB, Polars or
Spark read a fleet's logs without pyodlog. Parquet is written chunk by chunk (``iter_chunks``):
memory is one chunk's columns, whatever the result's size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pyodlog.io.rows import ranges

__all__ = ["coco_dataset", "coco_results", "to_arrow", "to_coco", "to_pandas", "to_parquet"]

# Image columns the tables carry differently (sizes as height/width; offsets are pyodlog's own).
_IMAGE_SKIP = {"image_size", "det_offset", "gt_offset"}


def _class_name(names: list[str] | None, label: int) -> str:
    if names is not None and 0 <= label < len(names) and names[label]:
        return names[label]
    return str(label)


def _fixed(values: np.ndarray) -> Any:
    """A [N, K] float array as an Arrow fixed-size list column (no copy)."""
    import pyarrow as pa

    values = np.ascontiguousarray(values, np.float32)
    width = values.shape[1] if values.ndim == 2 else 0
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)


def _rows2d(values: Any, n: int) -> np.ndarray:
    """A per-detection vector column as [n, width] (width 0 when it has no rows and no shape)."""
    values = np.asarray(values)
    if values.ndim == 2:
        return values
    width = int(np.prod(values.shape[1:])) if values.ndim > 1 else 0
    return values.reshape(n, width)


def _names_column(names: list[str] | None, labels: np.ndarray) -> Any:
    import pyarrow as pa

    if names is None:
        return pa.nulls(len(labels), pa.string())
    lookup = np.asarray([*(n or str(i) for i, n in enumerate(names)), ""], dtype=object)
    idx = np.where((labels >= 0) & (labels < len(names)), labels, len(names))
    out = lookup[idx]
    missing = idx == len(names)
    if missing.any():
        out[missing] = [str(v) for v in labels[missing].tolist()]
    return pa.array(out.tolist(), pa.string())


def _chunk_tables(chunk: Any, first_row: int, names: list[str] | None) -> dict[str, Any]:
    """The Arrow tables of one chunk (a ResultData or view), image rows numbered from ``first_row``."""
    import pyarrow as pa

    images = chunk.images
    n = len(chunk)
    image_row = np.arange(first_row, first_row + n, dtype=np.int64)
    cols: dict[str, Any] = {"image_row": image_row}
    sizes = np.asarray(images["image_size"]).reshape(n, 2)
    for name in images:
        if name in _IMAGE_SKIP:
            continue
        if name == "det_count":
            cols["height"], cols["width"] = (
                sizes[:, 0].astype(np.int64),
                sizes[:, 1].astype(np.int64),
            )
        column = images[name]
        cols[name] = pa.array(column, pa.string()) if isinstance(column, list) else column
    tables = {"images": pa.table(cols)}
    det = chunk.detections
    counts = np.asarray(images["det_count"], np.int64)
    det_image = np.repeat(image_row, counts)
    ids = np.asarray(images["input_id"], dtype=object)
    boxes = np.asarray(det["boxes"], np.float32).reshape(-1, 4)
    labels = np.asarray(det["labels"], np.int64)
    dcols: dict[str, Any] = {
        "image_row": det_image,
        "input_id": pa.array(np.repeat(ids, counts).tolist(), pa.string()),
        "x1": boxes[:, 0],
        "y1": boxes[:, 1],
        "x2": boxes[:, 2],
        "y2": boxes[:, 3],
        "score": np.asarray(det["scores"], np.float32),
        "label": labels,
        "class_name": _names_column(names, labels),
        "candidate_index": np.asarray(det["candidate_index"], np.int64),
        "logits": _fixed(_rows2d(det["logits"], len(labels))),
    }
    for extra in det:
        if extra == "embeddings":
            dcols["embedding"] = _fixed(_rows2d(det[extra], len(labels)))
        elif extra not in ("boxes", "scores", "labels", "candidate_index", "logits"):
            values = np.asarray(det[extra])
            dcols[extra] = values if values.ndim == 1 else _fixed(_rows2d(values, len(labels)))
    tables["detections"] = pa.table(dcols)
    if "gt_count" in images and "boxes" in chunk.targets:
        gt_counts = np.asarray(images["gt_count"], np.int64)
        rows = ranges(np.asarray(images["gt_offset"]), gt_counts)
        gt_boxes = np.asarray(chunk.targets["boxes"], np.float32).reshape(-1, 4)[rows]
        gt_labels = np.asarray(chunk.targets["labels"], np.int64)[rows]
        tables["targets"] = pa.table(
            {
                "image_row": np.repeat(image_row, gt_counts),
                "input_id": pa.array(np.repeat(ids, gt_counts).tolist(), pa.string()),
                "x1": gt_boxes[:, 0],
                "y1": gt_boxes[:, 1],
                "x2": gt_boxes[:, 2],
                "y2": gt_boxes[:, 3],
                "label": gt_labels,
                "class_name": _names_column(names, gt_labels),
            }
        )
    return tables


def _metadata(data: Any) -> dict[bytes, bytes]:
    names = getattr(data, "class_names", None)
    return {b"pyodlog": json.dumps({"class_names": names, "source": str(data.source)}).encode()}


def to_arrow(data: Any) -> dict[str, Any]:
    """``{"images": pyarrow.Table, "detections": pyarrow.Table[, "targets": ...]}`` (joined by ``image_row``).

    ``image_row`` is the row in ``data`` (a view's own rows). The class names (when known) are in
    each table's schema metadata (``b"pyodlog"``) and the ``class_name`` columns.
    """
    import pyarrow as pa

    names = data.class_names
    pieces: dict[str, list[Any]] = {}
    start = 0
    for chunk in data.iter_chunks(progress=False):
        for key, table in _chunk_tables(chunk, start, names).items():
            pieces.setdefault(key, []).append(table)
        start += len(chunk)
    if not pieces:  # no rows: the tables' columns all the same
        pieces = {k: [v] for k, v in _chunk_tables(data, 0, names).items()}
    return {
        key: pa.concat_tables(tables).replace_schema_metadata(_metadata(data))
        for key, tables in pieces.items()
    }


def to_pandas(data: Any) -> dict[str, Any]:
    """``{"images": DataFrame, "detections": DataFrame[, "targets": ...]}`` (:func:`to_arrow`, as pandas)."""
    return {key: table.to_pandas() for key, table in to_arrow(data).items()}


def to_parquet(data: Any, path: str | os.PathLike, rows: int = 65536) -> dict[str, Path]:
    """Writes ``images.parquet``, ``detections.parquet`` (and ``targets.parquet``) into folder ``path``.

    Written chunk by chunk (``rows`` images each): memory is one chunk's columns.

    Returns:
        ``{"images": path, "detections": path[, "targets": path]}``.
    """
    import pyarrow.parquet as pq

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    names = data.class_names
    writers: dict[str, Any] = {}
    out: dict[str, Path] = {}
    start = 0
    try:
        for chunk in data.iter_chunks(rows=rows):
            for key, table in _chunk_tables(chunk, start, names).items():
                if key not in writers:
                    out[key] = folder / f"{key}.parquet"
                    schema = table.schema.with_metadata(_metadata(data))
                    writers[key] = pq.ParquetWriter(out[key], schema)
                writers[key].write_table(table.cast(writers[key].schema))
            start += len(chunk)
        if not writers:
            for key, table in to_arrow(data).items():
                out[key] = folder / f"{key}.parquet"
                pq.write_table(table, out[key])
    finally:
        for writer in writers.values():
            writer.close()
    return out


# -- COCO -------------------------------------------------------------------------------------------


def _xywh(boxes: np.ndarray) -> np.ndarray:
    out = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    out[:, 2:] -= out[:, :2]
    return out


def coco_dataset(
    input_ids: list[str],
    sizes: np.ndarray,
    gt_counts: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    class_names: list[str] | None = None,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Ground truth as a COCO dataset dict (image ``id`` = row + 1, ``file_name`` = ``input_id``).

    Category ids are the logged labels; ``labels`` (e.g. the detections') adds categories that
    have no ground truth.
    """
    image_of_gt = np.repeat(np.arange(len(gt_counts)), gt_counts)
    xywh = _xywh(gt_boxes)
    used = set(np.unique(gt_labels).tolist()) | (
        set(np.unique(labels).tolist()) if labels is not None else set()
    )
    return {
        "images": [
            {"id": i + 1, "file_name": input_ids[i], "height": int(h), "width": int(w)}
            for i, (h, w) in enumerate(np.asarray(sizes).reshape(-1, 2).tolist())
        ],
        "annotations": [
            {
                "id": k + 1,
                "image_id": int(image_of_gt[k]) + 1,
                "category_id": int(gt_labels[k]),
                "bbox": [float(v) for v in xywh[k]],
                "area": float(xywh[k, 2] * xywh[k, 3]),
                "iscrowd": 0,
            }
            for k in range(len(gt_labels))
        ],
        "categories": [{"id": c, "name": _class_name(class_names, c)} for c in sorted(used)],
    }


def coco_results(
    det_counts: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray
) -> list[dict[str, Any]]:
    """Detections as COCO results (``image_id`` = row + 1, ``bbox`` xywh, ``score``, ``category_id``)."""
    image_of_det = np.repeat(np.arange(len(det_counts)), det_counts)
    xywh = _xywh(boxes)
    return [
        {
            "image_id": int(image_of_det[k]) + 1,
            "category_id": int(labels[k]),
            "bbox": [float(v) for v in xywh[k]],
            "score": float(scores[k]),
        }
        for k in range(len(labels))
    ]


def to_coco(data: Any, path: str | os.PathLike) -> dict[str, Path]:
    """Writes COCO JSON into folder ``path``: ``results.json`` (the detections, COCO's results format)
    and, when ground truth was logged, ``ground_truth.json`` (a COCO dataset: images, annotations,
    categories). Image ``id`` is the row in ``data`` + 1 and its ``file_name`` the ``input_id``;
    category ids are the labels, named by ``class_names``.

    Returns:
        ``{"results": path[, "ground_truth": path]}``.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    names = data.class_names
    ids: list[str] = []
    sizes, det_counts, boxes, scores, labels = [], [], [], [], []
    gt_counts, gt_boxes, gt_labels = [], [], []
    with_targets = False
    for chunk in data.iter_chunks():
        images = chunk.images
        ids.extend(images["input_id"])
        sizes.append(np.asarray(images["image_size"]).reshape(-1, 2))
        det_counts.append(np.asarray(images["det_count"], np.int64))
        boxes.append(np.asarray(chunk.detections["boxes"], np.float32).reshape(-1, 4))
        scores.append(np.asarray(chunk.detections["scores"], np.float32))
        labels.append(np.asarray(chunk.detections["labels"], np.int64))
        if "gt_count" in images and "boxes" in chunk.targets:
            with_targets = True
            counts = np.asarray(images["gt_count"], np.int64)
            rows = ranges(np.asarray(images["gt_offset"]), counts)
            gt_counts.append(counts)
            gt_boxes.append(np.asarray(chunk.targets["boxes"], np.float32)[rows].reshape(-1, 4))
            gt_labels.append(np.asarray(chunk.targets["labels"], np.int64)[rows])
        else:
            gt_counts.append(np.zeros(len(chunk), np.int64))

    def cat(pieces: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
        return np.concatenate(pieces) if pieces else empty

    all_labels = cat(labels, np.empty(0, np.int64))
    results = coco_results(
        cat(det_counts, np.empty(0, np.int64)),
        cat(boxes, np.empty((0, 4), np.float32)),
        cat(scores, np.empty(0, np.float32)),
        all_labels,
    )
    out = {"results": folder / "results.json"}
    out["results"].write_text(json.dumps(results))
    if with_targets:
        dataset = coco_dataset(
            ids,
            cat(sizes, np.empty((0, 2), np.int64)),
            cat(gt_counts, np.empty(0, np.int64)),
            cat(gt_boxes, np.empty((0, 4), np.float32)),
            cat(gt_labels, np.empty(0, np.int64)),
            names,
            all_labels,
        )
        out["ground_truth"] = folder / "ground_truth.json"
        out["ground_truth"].write_text(json.dumps(dataset))
    return out
