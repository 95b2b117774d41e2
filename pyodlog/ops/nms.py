"""Batched non-maximum suppression."""

from __future__ import annotations

import torch
from torch import Tensor

from pyodlog._extension import assert_has_ops, register_fake

__all__ = ["batched_nms"]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Non-maximum suppression within each category, for all categories at once.

    Keeps exactly the boxes ``torchvision.ops.batched_nms`` keeps. Boxes are
    visited by score descending, ties by index ascending; a box is kept when no
    kept box of the same category overlaps it with IoU ``> iou_threshold``.

    Defined behaviour for awkward input (tested):

    * NaN scores sort above every number (as ``torch.sort`` orders them), so a
      NaN-scored box is visited first in its category.
    * A box with a NaN coordinate has a NaN IoU with every box: it neither
      suppresses nor is suppressed. Inverted and zero-area boxes take part with
      the IoU arithmetic of torchvision (a zero-area box suppresses nothing).
      This is what ``torchvision.ops.nms`` does per category. (torchvision's
      ``batched_nms`` differs: its coordinate offset ``idxs * (boxes.max() + 1)``
      becomes NaN once any coordinate is NaN or infinite, which switches off
      suppression for every box of the call.)
    * float16 and bfloat16 boxes are processed in float32 (torchvision's CPU NMS
      rejects them); float64 in float64.

    On the CPU, categories are bucketed and suppressed in parallel, each box
    tested against the kept boxes of its category only. On CUDA one launch
    sequence handles every category without host synchronisation; the one sync
    is reading the number of kept boxes to size the result.

    Args:
        boxes: ``Tensor[N, 4]`` xyxy boxes.
        scores: ``Tensor[N]`` scores.
        idxs: ``Tensor[N]`` int64 category of each box (e.g. class, or
            ``image * n_classes + class`` for several images at once).
        iou_threshold: suppress boxes overlapping a kept box by more than this.

    Returns:
        ``Tensor[K]`` int64: indices of the kept boxes, by score descending and
        index ascending among equal scores.
    """
    assert_has_ops()
    return torch.ops.pyodlog.batched_nms.default(boxes, scores, idxs, float(iou_threshold))


@register_fake("pyodlog::batched_nms")
def _batched_nms_fake(boxes, scores, idxs, iou_threshold):
    torch._check(
        boxes.dim() == 2 and boxes.shape[1] == 4,
        lambda: f"boxes must have shape [N, 4], got {tuple(boxes.shape)}",
    )
    torch._check(scores.shape == (boxes.shape[0],), lambda: "scores must have shape [N]")
    torch._check(idxs.shape == (boxes.shape[0],), lambda: "idxs must have shape [N]")
    ctx = torch.library.get_ctx()
    kept = ctx.new_dynamic_size()
    return boxes.new_empty((kept,), dtype=torch.long)
