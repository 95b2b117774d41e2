"""The candidates' boxes are computed with torchvision's own arithmetic, bit for bit, on every device.

The logger finds the candidate behind each returned detection by comparing boxes bit for bit, so
``clip_and_resize`` must round exactly as torchvision's ``clip_boxes_to_image`` and
``transform.resize_boxes`` do, in every dtype. The two devices differ: torchvision multiplies by a
0-dim float32 tensor on the boxes' device, which the CPU reads as an exact float32 scalar and CUDA
first casts to the boxes' float16/bfloat16 (seen on an H200: SSDlite in float16 matched only a
third of its detections before the CUDA case rounded the ratio).
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import clip_boxes_to_image

from pyodlog.models.common import clip_and_resize

# (height, width) pairs whose ratios are not representable in float16 (e.g. 112 / 320).
NET = [(320, 320), (800, 1066)]
ORIGINAL = [(96, 112), (333, 1001)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_clip_and_resize_rounds_as_torchvision_does(device, dtype):
    g = torch.Generator().manual_seed(0)
    rows = [500, 300]
    boxes = []
    for (h, w), n in zip(NET, rows):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 1.1 - 10
        wh = torch.rand(n, 2, generator=g) * 200
        boxes.append(torch.cat([xy, xy + wh], 1).to(device, dtype))
    want = torch.cat(
        [
            resize_boxes(clip_boxes_to_image(b, net), net, original)
            for b, net, original in zip(boxes, NET, ORIGINAL)
        ]
    )
    got = clip_and_resize(torch.cat(boxes), rows, NET, NET, ORIGINAL)
    assert got.dtype == dtype and got.device == want.device
    differ = (got != want).any(1)
    assert not bool(differ.any()), (
        f"{int(differ.sum())} of {len(got)} boxes differ from torchvision's, e.g. "
        f"{got[differ][:2].tolist()} vs {want[differ][:2].tolist()}"
    )
