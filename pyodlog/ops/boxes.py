"""Box operators: per-image rescaling of xyxy boxes."""

from __future__ import annotations

import torch
from torch import Tensor

from pyodlog._extension import assert_has_ops, register_fake

__all__ = ["scale_boxes"]


def scale_boxes(
    boxes: Tensor,
    from_sizes: Tensor,
    to_sizes: Tensor,
    clip: bool = True,
    image_index: Tensor | None = None,
) -> Tensor:
    """Rescales xyxy boxes from the size their image had to another size.

    This is how a detector's boxes, predicted on the resized network input, are
    brought back to the original image (torchvision's
    ``GeneralizedRCNNTransform.postprocess``): ``x * (to_w / from_w)`` and
    ``y * (to_h / from_h)``, the ratio computed in float32 exactly as
    torchvision does. Half and bfloat16 boxes are scaled in float32.

    Args:
        boxes: ``Tensor[N, 4]`` xyxy boxes, floating point.
        from_sizes: ``Tensor[B, 2]`` (height, width) each image had when the boxes were made.
        to_sizes: ``Tensor[B, 2]`` (height, width) to scale to (e.g. the original images).
            Sizes may live on the CPU while the boxes are on a GPU (they are a few
            numbers, usually known on the host): they are copied to the boxes' device.
        clip: clamp the scaled boxes to ``[0, w] x [0, h]`` of ``to_sizes``
            (NaN coordinates stay NaN, as with ``torch.clamp``).
        image_index: ``Tensor[N]`` int64, the image each box belongs to. May be
            omitted when ``B == 1``.

    Returns:
        ``Tensor[N, 4]``: the scaled boxes, same dtype and device as ``boxes``.

    Raises:
        RuntimeError: a wrong shape, dtype or device, non-positive sizes (CPU) or
            an ``image_index`` out of range (CPU; on CUDA those rows become NaN
            rather than forcing a host sync).
    """
    assert_has_ops()
    if isinstance(from_sizes, Tensor) and from_sizes.device != boxes.device:
        from_sizes = from_sizes.to(boxes.device, non_blocking=True)
    if isinstance(to_sizes, Tensor) and to_sizes.device != boxes.device:
        to_sizes = to_sizes.to(boxes.device, non_blocking=True)
    return torch.ops.pyodlog.scale_boxes.default(boxes, from_sizes, to_sizes, clip, image_index)


@register_fake("pyodlog::scale_boxes")
def _scale_boxes_fake(boxes, from_sizes, to_sizes, clip=True, image_index=None):
    torch._check(
        boxes.dim() == 2 and boxes.shape[1] == 4,
        lambda: f"boxes must have shape [N, 4], got {tuple(boxes.shape)}",
    )
    torch._check(
        boxes.dtype.is_floating_point, lambda: f"boxes must be floating point, got {boxes.dtype}"
    )
    torch._check(
        from_sizes.dim() == 2 and from_sizes.shape[1] == 2,
        lambda: "from_sizes must have shape [B, 2]",
    )
    torch._check(
        to_sizes.dim() == 2 and to_sizes.shape[1] == 2, lambda: "to_sizes must have shape [B, 2]"
    )
    torch._check(
        from_sizes.shape[0] == to_sizes.shape[0],
        lambda: "from_sizes and to_sizes must describe the same images",
    )
    if image_index is not None:
        torch._check(
            image_index.shape == (boxes.shape[0],), lambda: "image_index must have shape [N]"
        )
    return torch.empty_like(boxes, memory_format=torch.contiguous_format)
