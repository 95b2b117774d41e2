"""torch.ops.pyodlog.scale_boxes against a plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.transform import resize_boxes

from pyodlog.ops import scale_boxes


def reference_scale_boxes(boxes, from_sizes, to_sizes, clip, image_index):
    """What torchvision's postprocess does per image, then an optional clamp."""
    out = torch.empty_like(boxes)
    if image_index is None:
        image_index = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
    for b in range(from_sizes.shape[0]):
        rows = image_index == b
        fh, fw = (int(v) for v in from_sizes[b])
        th, tw = (int(v) for v in to_sizes[b])
        scaled = resize_boxes(boxes[rows], (fh, fw), (th, tw))
        if clip:
            scaled[:, 0::2] = scaled[:, 0::2].clamp(0, tw)
            scaled[:, 1::2] = scaled[:, 1::2].clamp(0, th)
        out[rows] = scaled
    return out


def random_boxes(n, h, w, device, generator, spill=0.0):
    """xyxy boxes inside [0, w] x [0, h], spilling outside by `spill` of the size."""
    lo = torch.tensor([-spill * w, -spill * h], device=device)
    span = torch.tensor([w * (1 + 2 * spill), h * (1 + 2 * spill)], device=device)
    a = torch.rand(n, 2, generator=generator).to(device) * span + lo
    b = torch.rand(n, 2, generator=generator).to(device) * span + lo
    return torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)


@pytest.mark.parametrize("clip", [True, False])
def test_matches_reference_for_a_batch_of_non_square_images(device, clip):
    g = torch.Generator().manual_seed(0)
    from_sizes = torch.tensor([[800, 1066], [320, 320], [512, 704]], device=device)
    to_sizes = torch.tensor([[480, 640], [1080, 1920], [333, 1001]], device=device)
    image_index = torch.randint(0, 3, (500,), generator=g).to(device)
    boxes = torch.empty(500, 4, device=device)
    for b in range(3):
        rows = image_index == b
        boxes[rows] = random_boxes(int(rows.sum()), *from_sizes[b].tolist(), device, g, spill=0.2)
    got = scale_boxes(boxes, from_sizes, to_sizes, clip=clip, image_index=image_index)
    want = reference_scale_boxes(boxes, from_sizes, to_sizes, clip, image_index)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_clip_pulls_boxes_outside_the_image_onto_its_border(device):
    # The sizes stay on the CPU even for CUDA boxes: scale_boxes copies them to the boxes' device.
    boxes = torch.tensor([[-50.0, -10.0, 400.0, 300.0], [10.0, 20.0, 30.0, 40.0]], device=device)
    got = scale_boxes(boxes, torch.tensor([[200, 200]]), torch.tensor([[100, 400]]), clip=True)
    # ratio_w = 2, ratio_h = 0.5; the first box spills out on every side.
    expected = torch.tensor([[0.0, 0.0, 400.0, 100.0], [20.0, 10.0, 60.0, 20.0]], device=device)
    torch.testing.assert_close(got.cpu(), expected.cpu(), rtol=0, atol=0)


def test_empty_input_gives_empty_output(device):
    boxes = torch.empty(0, 4, device=device)
    out = scale_boxes(
        boxes, torch.tensor([[10, 10]], device=device), torch.tensor([[20, 20]], device=device)
    )
    assert out.shape == (0, 4) and out.device.type == device


def test_one_box_and_sizes_given_as_floats(device):
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]], device=device)
    out = scale_boxes(
        boxes,
        torch.tensor([[4.0, 8.0]], device=device),
        torch.tensor([[2.0, 16.0]], device=device),
        clip=False,
    )
    torch.testing.assert_close(out.cpu(), torch.tensor([[2.0, 1.0, 6.0, 2.0]]), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_are_scaled_in_float32_and_keep_their_dtype(device, dtype):
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(64, 300, 500, "cpu", g).to(device=device, dtype=dtype)
    sizes_from, sizes_to = (
        torch.tensor([[300, 500]], device=device),
        torch.tensor([[600, 250]], device=device),
    )
    out = scale_boxes(boxes, sizes_from, sizes_to, clip=False)
    assert out.dtype == dtype
    want = reference_scale_boxes(boxes.float(), sizes_from, sizes_to, False, None).to(dtype)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_nan_coordinates_stay_nan_and_do_not_disturb_other_boxes(device):
    boxes = torch.tensor([[float("nan"), 1.0, 2.0, 3.0], [1.0, 1.0, 2.0, 2.0]], device=device)
    out = scale_boxes(
        boxes, torch.tensor([[10, 10]], device=device), torch.tensor([[20, 20]], device=device)
    )
    assert torch.isnan(out[0, 0]) and torch.equal(out[0, 1:].cpu(), torch.tensor([2.0, 4.0, 6.0]))
    assert torch.equal(out[1].cpu(), torch.tensor([2.0, 2.0, 4.0, 4.0]))


def test_non_contiguous_boxes(device):
    g = torch.Generator().manual_seed(2)
    wide = random_boxes(40, 100, 100, "cpu", g).to(device).repeat(1, 2)[:, 2:6]
    assert not wide.is_contiguous()
    sizes_from, sizes_to = (
        torch.tensor([[100, 100]], device=device),
        torch.tensor([[50, 70]], device=device),
    )
    torch.testing.assert_close(
        scale_boxes(wide, sizes_from, sizes_to),
        scale_boxes(wide.contiguous(), sizes_from, sizes_to),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize(
    "boxes, from_sizes, to_sizes, image_index, message",
    [
        (torch.zeros(3, 5), [[1, 1]], [[1, 1]], None, r"boxes must have shape \[N, 4\]"),
        (
            torch.zeros(3, 4, dtype=torch.long),
            [[1, 1]],
            [[1, 1]],
            None,
            "boxes must be a floating-point tensor",
        ),
        (torch.zeros(3, 4), [[1, 1, 1]], [[1, 1]], None, r"from_sizes must have shape \[B, 2\]"),
        (torch.zeros(3, 4), [[1, 1]], [[1, 1], [2, 2]], None, "same images"),
        (torch.zeros(3, 4), [[1, 1], [2, 2]], [[1, 1], [2, 2]], None, "pass image_index"),
        (
            torch.zeros(3, 4),
            [[1, 1], [2, 2]],
            [[1, 1], [2, 2]],
            [0, 1],
            r"image_index must have shape \[3\]",
        ),
        (
            torch.zeros(3, 4),
            [[1, 1], [2, 2]],
            [[1, 1], [2, 2]],
            [0, 1, 2],
            "out of range for 2 images",
        ),
        (torch.zeros(3, 4), [[0, 1]], [[1, 1]], None, "image sizes must be positive"),
    ],
)
def test_wrong_input_gets_a_clear_error(boxes, from_sizes, to_sizes, image_index, message):
    index = None if image_index is None else torch.tensor(image_index)
    with pytest.raises(RuntimeError, match=message):
        scale_boxes(boxes, torch.tensor(from_sizes), torch.tensor(to_sizes), image_index=index)


def test_opcheck(device):
    g = torch.Generator().manual_seed(3)
    samples = [
        (
            random_boxes(10, 50, 60, "cpu", g).to(device),
            torch.tensor([[50, 60]], device=device),
            torch.tensor([[100, 30]], device=device),
            True,
            None,
        ),
        (
            random_boxes(6, 50, 60, "cpu", g).to(device),
            torch.tensor([[50, 60], [10, 10]], device=device),
            torch.tensor([[100, 30], [5, 5]], device=device),
            False,
            torch.tensor([0, 1, 1, 0, 1, 0], device=device),
        ),
        (
            torch.empty(0, 4, device=device),
            torch.tensor([[5, 5]], device=device),
            torch.tensor([[6, 6]], device=device),
            True,
            None,
        ),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.pyodlog.scale_boxes.default, args)
