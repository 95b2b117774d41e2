"""Tensor helpers shared by the model families: all device-side, no host sync."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["gather_rows", "host_tensor", "level_roi_features", "local_index", "rows_of_images"]


def host_tensor(values: Sequence, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small tensor of host values on ``device`` without stalling the device
    (pinned memory + non-blocking copy on CUDA)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def rows_of_images(counts: Sequence[int], device: torch.device) -> Tensor:
    """``Tensor[sum(counts)]``: the image of each row when images' rows are concatenated."""
    if not counts:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(
        [torch.full((int(n),), i, dtype=torch.long, device=device) for i, n in enumerate(counts)]
    )


def gather_rows(table: Tensor, candidates: Tensor) -> Tensor:
    """``table[candidates]`` for ``candidates`` ``Tensor[B, D]`` with -1 padding (zeros there)."""
    b, d = candidates.shape
    width = table.shape[1:]
    if table.shape[0] == 0 or candidates.numel() == 0:
        return table.new_zeros((b, d, *width))
    valid = candidates >= 0
    rows = table.index_select(0, candidates.clamp(min=0).reshape(-1)).reshape(b, d, *width)
    mask = valid.reshape(b, d, *([1] * len(width)))
    return torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def local_index(candidates: Tensor, first_row: Tensor) -> Tensor:
    """Global candidate rows -> rows within each image (``first_row``: ``Tensor[B]``); -1 stays -1."""
    return torch.where(candidates >= 0, candidates - first_row[:, None], candidates)


def level_roi_features(
    features: list[Tensor], boxes: Tensor, level: Tensor, padded_size: tuple[int, int]
) -> Tensor:
    """An RoI-pooled feature per detection from the FPN level it was detected on.

    Args:
        features: per level ``Tensor[B, F, h, w]`` (all levels with F channels).
        boxes: ``Tensor[B, D, 4]`` xyxy in network-input coordinates.
        level: ``Tensor[B, D]`` level of each detection (-1 in padding).
        padded_size: (h, w) of the padded batch the features were computed on.

    Returns:
        ``Tensor[B, D, F]``: RoIAlign to 1x1 (2x2 samples) on the level's map.
    """
    b, d, _ = boxes.shape
    if b * d == 0:
        return boxes.new_zeros((b, d, features[0].shape[1]))
    batch_index = torch.arange(b, device=boxes.device, dtype=boxes.dtype)[:, None, None].expand(
        b, d, 1
    )
    rois = torch.cat([batch_index, boxes], dim=2).reshape(-1, 5).to(features[0].dtype)
    pooled = torch.stack(
        [
            roi_align(
                f,
                rois,
                output_size=1,
                spatial_scale=f.shape[-1] / padded_size[1],
                sampling_ratio=2,
                aligned=True,
            ).flatten(1)
            for f in features
        ]
    )  # [L, B*D, F]
    flat_level = level.reshape(-1).clamp(min=0)
    picked = pooled[flat_level, torch.arange(b * d, device=boxes.device)]
    return torch.where(
        (level.reshape(-1) >= 0)[:, None],
        picked,
        torch.zeros((), dtype=picked.dtype, device=picked.device),
    ).reshape(b, d, -1)
