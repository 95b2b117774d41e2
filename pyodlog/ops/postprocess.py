"""Fused post-processing of a detection head for a batch of images."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pyodlog._extension import assert_has_ops, register_fake

__all__ = [
    "ACTIVATIONS",
    "BELOW_SCORE",
    "OVER_CAP",
    "REASONS",
    "SUPPRESSED",
    "NearMisses",
    "PostprocessedDetections",
    "PostprocessedWithNearMisses",
    "activated_rows",
    "postprocess_detections",
    "postprocess_detections_near_miss",
]


class PostprocessedDetections(NamedTuple):
    """Detections of a batch, padded to ``max_detections`` per image.

    Attributes:
        boxes: ``Tensor[B, D, 4]`` xyxy boxes in original-image coordinates.
        scores: ``Tensor[B, D]``.
        labels: ``Tensor[B, D]`` int64 class index, -1 in padding.
        candidates: ``Tensor[B, D]`` int64 row of the candidate (of ``scores``)
            each detection came from, -1 in padding: use it to fetch that
            candidate's logit vector or embedding.
        counts: ``Tensor[B]`` int64 number of detections of each image; rows
            ``[:counts[b]]`` of image ``b`` are filled, by score descending.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    candidates: Tensor
    counts: Tensor


def postprocess_detections(
    scores: Tensor,
    boxes: Tensor,
    image_index: Tensor,
    net_sizes: Tensor,
    orig_sizes: Tensor,
    score_thresh: float,
    iou_thresh: float,
    max_detections: int,
    first_label: int = 0,
    min_size: float = 0.0,
    topk: int = -1,
    topk_group: Tensor | None = None,
    topk_per_class: bool = False,
    clip: bool = True,
    activation: str = "none",
    centerness: Tensor | None = None,
) -> PostprocessedDetections:
    """Runs the post-processing of a detection head for a whole batch in one call.

    For every (candidate, class) pair with class ``>= first_label``:

    1. keep it if ``score > score_thresh``;
    2. clip its box to the network input ``net_sizes`` (``clip``), drop it if a
       side is shorter than ``min_size`` (when ``min_size > 0``);
    3. with ``topk > 0``: keep the ``topk`` best of its group (``topk_group`` of
       its candidate, default the image; per class too with ``topk_per_class``);
    4. NMS per (image, class) at ``iou_thresh``, as :func:`pyodlog.ops.batched_nms`;
    5. the ``max_detections`` best of each image, by score descending and
       ``candidate * C + class`` ascending among equal scores;
    6. boxes scaled from ``net_sizes`` to ``orig_sizes`` (as
       :func:`pyodlog.ops.scale_boxes`, no clipping after scaling).

    With the settings below it reproduces torchvision's detectors exactly when
    fed their candidates (``scores`` activated, or raw logits with ``activation``;
    ``boxes`` decoded):

    ==========================  =================================================
    Faster/Mask/Keypoint R-CNN  ``boxes [N, C, 4]``, ``first_label=1``, ``min_size=1e-2``
    RetinaNet, FCOS             ``topk=topk_candidates``, ``topk_group=image * L + level``
    SSD, SSDlite                ``first_label=1``, ``topk=topk_candidates``, ``topk_per_class=True``
    ==========================  =================================================

    ``activation="sigmoid"`` (RetinaNet) or ``"sigmoid_centerness"`` (FCOS: ``sqrt(sigmoid(logit)
    * sigmoid(centerness))``, ``centerness`` one logit per candidate) takes raw logits as
    ``scores``: on the CPU the operator reads them once, skips the candidates none of whose
    logits can pass the threshold (a bound in logit space with a wide margin) and activates the
    others only; each score is torch's own float activation (its vectorised path, the value
    ``torch.sigmoid`` gives every element but the last < 2 vectors of a contiguous run) and is
    compared with ``score_thresh`` as the heads compare it, so a score equal to the threshold
    fails. On other devices every pair is activated by torch's kernel first (no host sync).

    Outputs are padded to ``max_detections``. On CUDA the kernel synchronises with the host once,
    counting the (candidate, class) pairs above ``score_thresh`` (``nonzero``) to size the work,
    and with ``topk`` once more, counting the pairs the top-k keeps (the rest leave before NMS). The
    family loggers log the detections the model returned (see
    :func:`pyodlog.models.common.match_detections`); with ``near_miss`` they run
    :func:`postprocess_detections_near_miss` on the model's candidates for the near-misses.

    Args:
        scores: ``Tensor[N, C]`` activated class scores of each candidate.
        boxes: ``Tensor[N, 4]`` or ``Tensor[N, C, 4]`` decoded xyxy boxes in
            network-input coordinates, same dtype as ``scores``.
        image_index: ``Tensor[N]`` int64 image of each candidate.
        net_sizes: ``Tensor[B, 2]`` (h, w) of each image as the network saw it.
        orig_sizes: ``Tensor[B, 2]`` (h, w) of each original image.
        score_thresh: minimum score (exclusive).
        iou_thresh: NMS IoU threshold (a box overlapping a kept box by more is dropped).
        max_detections: detections kept per image.
        first_label: classes below this are background and never detected.
        min_size: minimum box side after clipping; ``<= 0`` disables.
        topk: candidates kept per top-k group before NMS; ``<= 0`` disables.
        topk_group: ``Tensor[N]`` int64 top-k group of each candidate (e.g. FPN level).
        topk_per_class: the top-k runs per (group, class).
        clip: clip boxes to the network input before everything else.
        activation: ``"none"`` (``scores`` are activated scores), ``"sigmoid"`` or
            ``"sigmoid_centerness"`` (``scores`` are raw logits).
        centerness: ``Tensor[N]`` (or ``[N, 1]``) centerness logits, with ``"sigmoid_centerness"`` only.

    Returns:
        :class:`PostprocessedDetections`; the scores are activated.
    """
    assert_has_ops()
    return PostprocessedDetections(
        *torch.ops.pyodlog.postprocess_detections.default(
            scores,
            boxes,
            image_index,
            net_sizes,
            orig_sizes,
            float(score_thresh),
            float(iou_thresh),
            int(max_detections),
            int(first_label),
            float(min_size),
            int(topk),
            topk_group,
            bool(topk_per_class),
            bool(clip),
            str(activation),
            centerness,
        )
    )


@register_fake("pyodlog::postprocess_detections")
def _postprocess_detections_fake(
    scores,
    boxes,
    image_index,
    net_sizes,
    orig_sizes,
    score_thresh,
    iou_thresh,
    max_detections,
    first_label=0,
    min_size=0.0,
    topk=-1,
    topk_group=None,
    topk_per_class=False,
    clip=True,
    activation="none",
    centerness=None,
):
    torch._check(
        scores.dim() == 2, lambda: f"scores must have shape [N, C], got {tuple(scores.shape)}"
    )
    _check_activation(activation, centerness)
    torch._check(boxes.dtype == scores.dtype, lambda: "boxes and scores must have the same dtype")
    torch._check(
        net_sizes.dim() == 2 and net_sizes.shape[1] == 2, lambda: "net_sizes must have shape [B, 2]"
    )
    torch._check(max_detections >= 0, lambda: "max_detections must be >= 0")
    n_images = net_sizes.shape[0]
    return (
        boxes.new_empty((n_images, max_detections, 4)),
        scores.new_empty((n_images, max_detections)),
        scores.new_empty((n_images, max_detections), dtype=torch.long),
        scores.new_empty((n_images, max_detections), dtype=torch.long),
        scores.new_empty((n_images,), dtype=torch.long),
    )


# -- activation ----------------------------------------------------------------------------------

#: The activations the post-processing operators apply to raw logits (``activation=``).
ACTIVATIONS = ("none", "sigmoid", "sigmoid_centerness")


def _check_activation(activation: str, centerness: Tensor | None) -> None:
    torch._check(
        activation in ACTIVATIONS,
        lambda: f"activation must be one of {ACTIVATIONS}, got {activation!r}",
    )
    torch._check(
        (centerness is not None) == (activation == "sigmoid_centerness"),
        lambda: "centerness is given with activation 'sigmoid_centerness' only",
    )


def activated_rows(
    logits: Tensor,
    activation: str,
    thresh: float,
    first_label: int = 0,
    centerness: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The rows of raw class logits that may score above ``thresh``, and their activated scores.

    On the CPU one read of ``logits`` (no activation) finds the rows with a logit above a bound in
    logit space, set below ``thresh`` with a wide margin (2 % of it plus 1e-6): a superset of the
    rows holding a pair (class ``>= first_label``) whose score exceeds ``thresh``. Only those rows
    are activated, each score exactly as :func:`postprocess_detections` computes it (torch's own
    float activation). On other devices every row is activated and the rows are exact.

    Args:
        logits: ``Tensor[N, C]`` raw class logits.
        activation: ``"sigmoid"`` or ``"sigmoid_centerness"`` (``"none"``: ``logits`` are scores).
        thresh: the score a pair must exceed.
        first_label: classes below this are ignored (background).
        centerness: ``Tensor[N]`` centerness logits, with ``"sigmoid_centerness"`` only.

    Returns:
        ``(rows, scores)``: ``Tensor[R]`` int64 ascending rows and ``Tensor[R, C]`` their scores.
    """
    assert_has_ops()
    rows, scores = torch.ops.pyodlog.activated_rows.default(
        logits, str(activation), float(thresh), int(first_label), centerness
    )
    return rows, scores


@register_fake("pyodlog::activated_rows")
def _activated_rows_fake(logits, activation, thresh, first_label=0, centerness=None):
    torch._check(
        logits.dim() == 2, lambda: f"logits must have shape [N, C], got {tuple(logits.shape)}"
    )
    _check_activation(activation, centerness)
    r = torch.library.get_ctx().new_dynamic_size()
    return logits.new_empty((r,), dtype=torch.long), logits.new_empty((r, logits.shape[1]))


# -- near-misses ---------------------------------------------------------------------------------

#: Near-miss reason codes (``NearMisses.reason``, the ``reason`` column of ``near_misses``).
BELOW_SCORE, SUPPRESSED, OVER_CAP = 1, 2, 3
REASONS = {BELOW_SCORE: "below_score", SUPPRESSED: "suppressed", OVER_CAP: "over_cap"}


class NearMisses(NamedTuple):
    """The near-misses of a batch, padded to ``K`` per image, in visiting order.

    A near-miss is a (candidate, class) pair that passed the floor, ``min_size`` and the top-k but
    is not a detection. Of an image's near-misses the first ``K`` by score descending (ties:
    ``candidate * C + class`` ascending) are returned, whatever their reason.

    Attributes:
        boxes: ``Tensor[B, K, 4]`` xyxy in original-image coordinates (as detections).
        scores: ``Tensor[B, K]``.
        labels: ``Tensor[B, K]`` int64, -1 in padding.
        candidates: ``Tensor[B, K]`` int64 row of ``scores`` the pair came from, -1 in padding.
        reason: ``Tensor[B, K]`` uint8: 1 ``below_score`` (``floor < score <= score_thresh``),
            2 ``suppressed`` (NMS removed it), 3 ``over_cap`` (kept by NMS, beyond
            ``max_detections``); 0 in padding.
        suppressed_by: ``Tensor[B, K]`` int64: for ``suppressed``, the detection row (within the
            image) of the kept pair that suppressed it (greedy NMS's suppressor: the first kept
            pair of its class in visiting order overlapping it by more than ``iou_thresh``); -1
            otherwise, and when that pair was itself cut by ``max_detections``.
        suppressor_iou: ``Tensor[B, K]`` float32 IoU with the suppressor, NaN when none.
        counts: ``Tensor[B]`` int64 near-misses of each image.
        exhausted: ``Tensor[B]`` bool: the image had more than ``K`` near-misses (always False
            with ``K = 0``: no near-miss is computed then).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    candidates: Tensor
    reason: Tensor
    suppressed_by: Tensor
    suppressor_iou: Tensor
    counts: Tensor
    exhausted: Tensor


class PostprocessedWithNearMisses(NamedTuple):
    """:class:`PostprocessedDetections` and the :class:`NearMisses` of the same pass."""

    detections: PostprocessedDetections
    near_misses: NearMisses


def postprocess_detections_near_miss(
    scores: Tensor,
    boxes: Tensor,
    image_index: Tensor,
    net_sizes: Tensor,
    orig_sizes: Tensor,
    score_thresh: float,
    iou_thresh: float,
    max_detections: int,
    near_miss: int,
    near_miss_floor: float,
    first_label: int = 0,
    min_size: float = 0.0,
    topk: int = -1,
    topk_group: Tensor | None = None,
    topk_per_class: bool = False,
    clip: bool = True,
    activation: str = "none",
    centerness: Tensor | None = None,
) -> PostprocessedWithNearMisses:
    """:func:`postprocess_detections` that also returns up to ``near_miss`` near-misses per image.

    One pass: pairs are collected down to ``near_miss_floor`` (exclusive) instead of
    ``score_thresh``; the top-k ranks them among all of those (a pair's rank depends only on the
    pairs above it, so the detections are exactly :func:`postprocess_detections`'s); pairs at or
    below ``score_thresh`` are ``below_score`` near-misses and take no part in NMS; NMS records,
    for each pair it removes, which kept pair removed it and their IoU; kept pairs beyond
    ``max_detections`` are ``over_cap``. See :class:`NearMisses`.

    Together the detections and the near-misses of an image hold every pair with a score above
    the floor that the model could return at any score threshold >= the floor (any IoU
    threshold, any cap) -- unless ``exhausted``; then every pair above the lowest near-miss
    score. That is what :meth:`pyodlog.ResultData.replay` replays from.

    Args:
        near_miss: near-misses kept per image (>= 0; 0 returns none).
        near_miss_floor: the lowest score (exclusive) a ``below_score`` near-miss may have.
        Others: as :func:`postprocess_detections` (``activation``: raw logits in, activated
            scores out; on the CPU only the candidates that can pass the floor are activated).

    Returns:
        :class:`PostprocessedWithNearMisses`.
    """
    assert_has_ops()
    out = torch.ops.pyodlog.postprocess_detections_near_miss.default(
        scores,
        boxes,
        image_index,
        net_sizes,
        orig_sizes,
        float(score_thresh),
        float(iou_thresh),
        int(max_detections),
        int(near_miss),
        float(near_miss_floor),
        int(first_label),
        float(min_size),
        int(topk),
        topk_group,
        bool(topk_per_class),
        bool(clip),
        str(activation),
        centerness,
    )
    return PostprocessedWithNearMisses(PostprocessedDetections(*out[:5]), NearMisses(*out[5:]))


@register_fake("pyodlog::postprocess_detections_near_miss")
def _postprocess_detections_near_miss_fake(
    scores,
    boxes,
    image_index,
    net_sizes,
    orig_sizes,
    score_thresh,
    iou_thresh,
    max_detections,
    near_miss,
    near_miss_floor,
    first_label=0,
    min_size=0.0,
    topk=-1,
    topk_group=None,
    topk_per_class=False,
    clip=True,
    activation="none",
    centerness=None,
):
    detections = _postprocess_detections_fake(
        scores,
        boxes,
        image_index,
        net_sizes,
        orig_sizes,
        score_thresh,
        iou_thresh,
        max_detections,
        activation=activation,
        centerness=centerness,
    )
    torch._check(near_miss >= 0, lambda: "near_miss must be >= 0")
    n_images, k = net_sizes.shape[0], near_miss
    return (
        *detections,
        boxes.new_empty((n_images, k, 4)),
        scores.new_empty((n_images, k)),
        scores.new_empty((n_images, k), dtype=torch.long),
        scores.new_empty((n_images, k), dtype=torch.long),
        scores.new_empty((n_images, k), dtype=torch.uint8),
        scores.new_empty((n_images, k), dtype=torch.long),
        scores.new_empty((n_images, k), dtype=torch.float32),
        scores.new_empty((n_images,), dtype=torch.long),
        scores.new_empty((n_images,), dtype=torch.bool),
    )
