"""Fused post-processing of a detection head for a batch of images."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pyodlog._extension import assert_has_ops, register_fake

__all__ = ["PostprocessedDetections", "postprocess_detections"]


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
    fed their candidates (``scores`` already activated, ``boxes`` decoded):

    ==========================  =================================================
    Faster/Mask/Keypoint R-CNN  ``boxes [N, C, 4]``, ``first_label=1``, ``min_size=1e-2``
    RetinaNet, FCOS             ``topk=topk_candidates``, ``topk_group=image * L + level``
    SSD, SSDlite                ``first_label=1``, ``topk=topk_candidates``, ``topk_per_class=True``
    ==========================  =================================================

    Outputs are padded to ``max_detections``. On CUDA the kernel synchronises with the host once:
    counting the (candidate, class) pairs above ``score_thresh`` (``nonzero``) sizes the work. The
    family loggers do not call it on the inference path (they log the detections the model returned,
    see :func:`pyodlog.models.common.match_detections`); it is for users who post-process a head
    themselves.

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

    Returns:
        :class:`PostprocessedDetections`.
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
):
    torch._check(
        scores.dim() == 2, lambda: f"scores must have shape [N, C], got {tuple(scores.shape)}"
    )
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
