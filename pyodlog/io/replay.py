"""Threshold replay from logged detections and near-misses, without the model.

A logged image holds its detections and up to ``K`` near-misses (see
:func:`pyodlog.ops.postprocess_detections_near_miss`): together, every (candidate, class) pair the
model could return at a score threshold at or above the image's **floor** -- the near-miss floor,
or, when the image had more near-misses than ``K`` (``exhausted``), the lowest near-miss score
logged. Replaying the model's post-processing (score filter, per-class greedy NMS, the best
``max_detections_per_image``) on that pool gives exactly what the model would have returned with
those thresholds, as long as the request lies inside that **envelope**:

* ``score_thresh >= floor`` (compared as the model compared its scores: in float32, or for a
  float16/bfloat16 head -- segment format 5 records it -- with both rounded to that dtype); any
  ``iou_thresh``; any ``max_detections_per_image``;
* an image logged without near-misses (``near_miss=0``, or a file of an older pyodlog) is exact
  only for ``score_thresh >=`` the logged threshold, the logged ``iou_thresh`` and at most the
  logged ``max_detections_per_image`` (a subset of its detections).

NMS runs on the logged boxes (original-image coordinates); the model runs it on network-input
boxes, which differ by a per-axis scale: IoU is invariant to it, up to float rounding (a pair
whose IoU lies within a rounding error of ``iou_thresh`` could be decided differently).

Greedy NMS is prefix-consistent (a pair's fate depends only on pairs visited before it), which is
what makes :func:`sweep` one NMS per IoU threshold, whatever the number of score thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pyodlog.io.columns import SCORE_DTYPES
from pyodlog.ops.nms import batched_nms
from pyodlog.structures import UNCERTAINTY_COLUMNS, DetectionOutput

__all__ = ["Replay", "envelope", "replay", "sweep"]

_COLUMNS = (
    "boxes",
    "scores",
    "labels",
    "logits",
    "candidate_index",
    "embeddings",
    *UNCERTAINTY_COLUMNS,
)


@dataclass
class Envelope:
    """Per image, where replay is exact.

    Attributes:
        floor: ``Tensor``-free float64 array: the lowest score threshold with an exact replay at
            any IoU threshold and cap (+inf where near-misses were not logged).
        score_thresh, iou_thresh, max_detections: the thresholds the image was logged with (NaN,
            NaN, -1 where unknown: a file of an older pyodlog).
        near_misses: whether near-misses were logged for the image.
        exhausted: whether its near-miss budget ``K`` was exhausted.
        k: the budget (-1 where near-misses were not logged).
        score_dtype: uint8 code of the dtype the model compared its scores in
            (:data:`pyodlog.io.columns.SCORE_DTYPES`; 0, float32, where not logged).
    """

    floor: np.ndarray
    score_thresh: np.ndarray
    iou_thresh: np.ndarray
    max_detections: np.ndarray
    near_misses: np.ndarray
    exhausted: np.ndarray
    k: np.ndarray
    score_dtype: np.ndarray


def _as_compared(thresholds: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Per image, a threshold as its model compared it with its scores: rounded to the dtype it
    compared in (torch rounds a Python float to the tensor's dtype: 0.3 is 0.30005 in float16),
    as float32 (exact). Scores, stored as float32, are compared with it in float32: the same
    answers as the model's comparison in its dtype."""
    wide = np.asarray(thresholds, np.float64)
    out = wide.astype(np.float32)
    for code, name in SCORE_DTYPES.items():
        sel = codes == code
        if name != "float32" and sel.any():
            out[sel] = torch.from_numpy(wide[sel]).to(getattr(torch, name)).float().numpy()
    return out


def _column(images: dict, name: str, n: int, fill: Any, dtype) -> np.ndarray:
    value = images.get(name)
    return np.full(n, fill, dtype) if value is None else np.asarray(value).astype(dtype)


def envelope(data: Any) -> Envelope:
    """The replay envelope of each image of a :class:`~pyodlog.ResultData`."""
    images, n = data.images, len(data)
    k = _column(images, "nm_k", n, -1, np.int64)
    exhausted = _column(images, "nm_exhausted", n, 0, np.int64).astype(bool)
    floor = _column(images, "nm_floor", n, np.nan, np.float64).astype(np.float32)
    nm_count = _column(images, "nm_count", n, 0, np.int64)
    nm_offset = _column(images, "nm_offset", n, 0, np.int64)
    near = k >= 0
    # Exhausted: every pair above the lowest near-miss score logged is in the pool.
    lowest = np.full(n, np.inf, np.float32)
    scores = data.near_misses.get("scores")
    if scores is not None and len(scores):
        has = nm_count > 0
        # Near-misses are stored in visiting order: an image's last one has its lowest score.
        lowest[has] = scores[(nm_offset + nm_count - 1)[has]]
    eff = np.where(exhausted, np.maximum(floor, lowest), floor)
    eff = np.where(near, eff, np.inf).astype(np.float64)
    return Envelope(
        floor=eff,
        score_thresh=_column(images, "nm_score_thresh", n, np.nan, np.float64),
        iou_thresh=_column(images, "nm_iou_thresh", n, np.nan, np.float64),
        max_detections=_column(images, "nm_max_detections", n, -1, np.int64),
        near_misses=near,
        exhausted=exhausted,
        k=k,
        score_dtype=_column(images, "nm_score_dtype", n, 0, np.uint8),
    )


@dataclass
class _Pool:
    """Every logged pair (detections, then near-misses), sorted by (image, visiting order)."""

    image: np.ndarray
    score: np.ndarray  # float32
    label: np.ndarray
    boxes: np.ndarray  # float32 [P, 4]
    source: np.ndarray  # 0 detections, 1 near_misses
    row: np.ndarray  # row in its table


def _pool(data: Any) -> _Pool:
    images, n = data.images, len(data)
    det, nm = data.detections, data.near_misses
    det_count = np.asarray(images["det_count"], np.int64)
    parts = [(0, det, np.repeat(np.arange(n), det_count), np.arange(int(det_count.sum())))]
    if nm and "nm_count" in images:
        nm_count = np.asarray(images["nm_count"], np.int64)
        parts.append((1, nm, np.repeat(np.arange(n), nm_count), np.arange(int(nm_count.sum()))))
    image = np.concatenate([p[2] for p in parts])
    source = np.concatenate([np.full(len(p[3]), p[0], np.int8) for p in parts])
    row = np.concatenate([p[3] for p in parts])
    score = np.concatenate([np.asarray(p[1]["scores"], np.float32)[p[3]] for p in parts])
    label = np.concatenate([np.asarray(p[1]["labels"], np.int64)[p[3]] for p in parts])
    cand = np.concatenate([np.asarray(p[1]["candidate_index"], np.int64)[p[3]] for p in parts])
    boxes = np.concatenate([np.asarray(p[1]["boxes"], np.float32)[p[3]] for p in parts]).reshape(
        -1, 4
    )
    n_class = int(max(label.max(initial=0), 0)) + 1
    # The model's visiting order: score descending, candidate * C + class ascending.
    order = np.lexsort((cand * n_class + label, -score.astype(np.float64), image))
    return _Pool(image[order], score[order], label[order], boxes[order], source[order], row[order])


def _per_image(value: Any, n: int, logged: np.ndarray, dtype) -> np.ndarray:
    return logged.astype(dtype) if value is None else np.full(n, value, dtype)


def _check(
    data: Any,
    env: Envelope,
    score: np.ndarray,
    iou: np.ndarray,
    cap: np.ndarray,
    strict: bool,
    asked: str,
) -> np.ndarray:
    """Per image whether the request is inside the envelope; raises outside it when ``strict``."""
    s32 = _as_compared(score, env.score_dtype)
    inside_pool = env.near_misses & (s32 >= _as_compared(env.floor, env.score_dtype))
    logged_known = ~np.isnan(env.score_thresh)
    subset = (
        logged_known
        & (s32 >= _as_compared(env.score_thresh, env.score_dtype))
        & (iou == env.iou_thresh)
        & (cap <= env.max_detections)
    )
    exact = inside_pool | subset
    if strict and not exact.all():
        bad = np.flatnonzero(~exact)
        floors = env.floor[bad]
        finite = floors[np.isfinite(floors)]
        without = int((~env.near_misses[bad]).sum())
        parts = [
            f"{asked} is outside the logged envelope for {len(bad)} of {len(exact)} images "
            f"(image rows {bad[:10].tolist()}{' ...' if len(bad) > 10 else ''})."
        ]
        if len(finite):
            logged_floor = _column(data.images, "nm_floor", len(data), np.nan, np.float64)[bad]
            parts.append(
                f" With near-misses, replay is exact for score_thresh >= the image's floor (here up "
                f"to {float(finite.max()):.6g}; near_miss_floor {float(np.nanmax(logged_floor)):.6g}, "
                f"near_miss K={int(env.k[bad].max())}, exhausted on {int(env.exhausted[bad].sum())} "
                "of these images: then the floor is the lowest near-miss score logged), any "
                "iou_thresh and any max_detections_per_image."
            )
        if without:
            known = env.score_thresh[bad][~env.near_misses[bad]]
            known = known[~np.isnan(known)]
            parts.append(
                f" {without} of them were logged without near-misses: "
                + (
                    f"exact only for score_thresh >= the logged one ({float(known.max()):.6g}), "
                    "the logged iou_thresh and at most the logged max_detections_per_image."
                    if len(known)
                    else "their thresholds were not logged either (an older pyodlog), so only "
                    "replay() without arguments (the logged detections) is exact."
                )
            )
        parts.append(
            " Raise score_thresh, log with a larger near_miss (or a lower near_miss_floor), or "
            "pass strict=False for a best effort flagged per image (Replay.exact)."
        )
        raise ValueError("".join(parts))
    return exact


def _thresholds(data: Any, env: Envelope, score_thresh, iou_thresh, max_detections):
    n = len(data)
    score = _per_image(score_thresh, n, env.score_thresh, np.float64)
    iou = _per_image(iou_thresh, n, env.iou_thresh, np.float64)
    cap = _per_image(max_detections, n, env.max_detections, np.int64)
    return score, iou, cap


def _kept(pool: _Pool, compared: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """Positions (in the pool) kept by the score filter and per-class NMS, in pool order
    (``compared``: each image's score threshold as its model compared it, :func:`_as_compared`)."""
    above = pool.score > compared[pool.image]
    kept = np.zeros(len(pool.score), bool)
    n_class = int(pool.label.max(initial=0)) + 1
    for value in np.unique(iou[pool.image[above]]) if above.any() else []:
        sel = np.flatnonzero(above & (iou[pool.image] == value))
        keep = batched_nms(
            torch.from_numpy(pool.boxes[sel]),
            torch.from_numpy(pool.score[sel]),
            torch.from_numpy(pool.image[sel] * n_class + pool.label[sel]),
            float(value),
        ).numpy()
        kept[sel[keep]] = True
    return kept


def _rank_in_image(image: np.ndarray) -> np.ndarray:
    """Rank of each row among the rows of its image (rows grouped by image, in order)."""
    if not len(image):
        return np.empty(0, np.int64)
    starts = np.flatnonzero(np.r_[True, image[1:] != image[:-1]])
    run = np.repeat(starts, np.diff(np.r_[starts, len(image)]))
    return np.arange(len(image)) - run


class Replay:
    """What the model would have returned with other thresholds, per logged image.

    Attributes:
        detections: ``{column: array}`` of every image's replayed detections, image by image, each
            image's by score descending (as :attr:`pyodlog.ResultData.detections`).
        offsets, counts: ``int64 [n_images]``: image ``i``'s rows are
            ``offsets[i] : offsets[i] + counts[i]``.
        exact: ``bool [n_images]``: the request lay inside the image's envelope (always all True
            with ``strict=True``).
        source: ``int8`` per row: 0 a logged detection, 1 a logged near-miss.
        image_sizes: ``(h, w)`` of each image.
    """

    def __init__(
        self,
        detections: dict[str, np.ndarray],
        counts: np.ndarray,
        exact: np.ndarray,
        source: np.ndarray,
        image_sizes: np.ndarray,
    ) -> None:
        self.detections = detections
        self.counts = counts
        self.offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.exact = exact
        self.source = source
        self.image_sizes = image_sizes

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, i: int) -> DetectionOutput:
        """Image ``i``'s replayed detections as a :class:`~pyodlog.DetectionOutput`."""
        o, n = int(self.offsets[i]), int(self.counts[i])

        def rows(name: str) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(self.detections[name][o : o + n]))

        h, w = (int(v) for v in self.image_sizes[i])
        return DetectionOutput(
            rows("boxes"),
            rows("scores"),
            rows("labels"),
            rows("logits"),
            rows("candidate_index"),
            (h, w),
            rows("embeddings") if "embeddings" in self.detections else None,
        )

    def __repr__(self) -> str:
        return (
            f"Replay(images={len(self)}, detections={int(self.counts.sum())}, "
            f"exact={int(self.exact.sum())}/{len(self)})"
        )


def replay(
    data: Any,
    score_thresh: float | None = None,
    iou_thresh: float | None = None,
    max_detections_per_image: int | None = None,
    strict: bool = True,
) -> Replay:
    """See :meth:`pyodlog.ResultData.replay`."""
    _check_args(score_thresh, iou_thresh, max_detections_per_image)
    env = envelope(data)
    n = len(data)
    if score_thresh is None and iou_thresh is None and max_detections_per_image is None:
        # The logged thresholds: the logged detections themselves.
        counts = np.asarray(data.images["det_count"], np.int64)
        return Replay(
            {k: data.detections[k] for k in _COLUMNS if k in data.detections},
            counts,
            np.ones(n, bool),
            np.zeros(int(counts.sum()), np.int8),
            np.asarray(data.images["image_size"]),
        )
    score, iou, cap = _thresholds(data, env, score_thresh, iou_thresh, max_detections_per_image)
    asked = (
        f"replay(score_thresh={score_thresh}, iou_thresh={iou_thresh}, "
        f"max_detections_per_image={max_detections_per_image})"
    )
    unknown = np.isnan(score) | np.isnan(iou) | (cap < 0)
    if unknown.any():
        raise ValueError(
            f"{asked}: {int(unknown.sum())} images were logged without their thresholds (a file of an "
            "older pyodlog, or a logger without near-misses): pass score_thresh, iou_thresh and "
            "max_detections_per_image explicitly"
        )
    exact = _check(data, env, score, iou, cap, strict, asked)
    pool = _pool(data)
    kept = _kept(pool, _as_compared(score, env.score_dtype), iou)
    pos = np.flatnonzero(kept)
    rank = _rank_in_image(pool.image[pos])
    pos = pos[rank < cap[pool.image[pos]]]
    counts = np.bincount(pool.image[pos], minlength=n).astype(np.int64)
    out: dict[str, np.ndarray] = {}
    for name in _COLUMNS:
        tables = [data.detections, data.near_misses]
        if name not in data.detections or (
            (pool.source[pos] == 1).any() and name not in data.near_misses
        ):
            continue
        first = np.asarray(data.detections[name])
        values = np.empty((len(pos), *first.shape[1:]), first.dtype)
        for src in (0, 1):
            sel = pool.source[pos] == src
            if sel.any():
                values[sel] = np.asarray(tables[src][name])[pool.row[pos][sel]]
        out[name] = values
    return Replay(out, counts, exact, pool.source[pos], np.asarray(data.images["image_size"]))


def _check_args(score_thresh, iou_thresh, max_detections) -> None:
    for name, value in (("score_thresh", score_thresh), ("iou_thresh", iou_thresh)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or value != value
        ):
            raise ValueError(f"{name} must be a number or None, got {value!r}")
    if max_detections is not None and (
        isinstance(max_detections, bool)
        or not isinstance(max_detections, int)
        or max_detections < 0
    ):
        raise ValueError(
            f"max_detections_per_image must be an int >= 0 or None, got {max_detections!r}"
        )


def sweep(
    data: Any,
    score_thresh: Sequence[float],
    iou_thresh: Sequence[float] | None = None,
    max_detections_per_image: int | None = None,
    strict: bool = True,
):
    """See :meth:`pyodlog.ResultData.sweep`."""
    import pandas as pd

    scores = [float(s) for s in score_thresh]
    ious = [None] if iou_thresh is None else [float(v) for v in iou_thresh]
    if not scores or not ious:
        raise ValueError("sweep needs at least one score_thresh and one iou_thresh")
    for s in scores:
        for v in ious:
            _check_args(s, v, max_detections_per_image)
    env = envelope(data)
    n = len(data)
    pool = _pool(data)
    n_class = int(pool.label.max(initial=0)) + 1
    s_grid = np.asarray(scores, np.float64)
    frames = []
    for v in ious:
        _, iou, cap = _thresholds(data, env, min(scores), v, max_detections_per_image)
        exact = np.ones(n, bool)
        for s in scores:
            asked = f"sweep point (score_thresh={s}, iou_thresh={v})"
            exact &= _check(data, env, np.full(n, s), iou, cap, strict, asked)
        # One NMS at the lowest score threshold: at a higher one, the kept pairs are those of it
        # above that threshold, ranked as before (greedy NMS is prefix-consistent).
        lowest = _as_compared(np.full(n, s_grid.min()), env.score_dtype)
        kept = np.flatnonzero(_kept(pool, lowest, iou))
        image, label, sc = pool.image[kept], pool.label[kept], pool.score[kept]
        rank = _rank_in_image(image)
        within_cap = rank < cap[image]
        compared = np.stack([_as_compared(np.full(n, s), env.score_dtype) for s in scores])
        alive = (sc[None, :] > compared[:, image]) & within_cap[None, :]  # [S, K]
        counts = np.zeros((len(scores), n_class), np.int64)
        images_with = np.zeros((len(scores), n_class), np.int64)
        for si in range(len(scores)):  # a handful of grid points, vectorised over detections
            a = alive[si]
            counts[si] = np.bincount(label[a], minlength=n_class)
            pairs = np.unique(image[a] * n_class + label[a])
            images_with[si] = np.bincount(pairs % n_class, minlength=n_class)
        grid_s, grid_c = np.meshgrid(np.arange(len(scores)), np.arange(n_class), indexing="ij")
        frames.append(
            pd.DataFrame(
                {
                    "score_thresh": s_grid[grid_s.ravel()],
                    "iou_thresh": np.full(grid_s.size, iou[0] if n else np.nan),
                    "label": grid_c.ravel(),
                    "detections": counts.ravel(),
                    "images": images_with.ravel(),
                    "exact": np.full(grid_s.size, bool(exact.all())),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)
