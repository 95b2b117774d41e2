"""torch.ops.pyodlog.batched_nms against torchvision.ops.batched_nms and a plain-PyTorch oracle."""

from __future__ import annotations

import pytest
import torch
import torchvision

from pyodlog.ops import batched_nms
from tests.helpers.nms_cases import clustered_boxes, uniform_boxes


def oracle_batched_nms(boxes, scores, idxs, iou_threshold):
    """Greedy NMS written plainly: visit by (score desc, NaN first, index asc), per category."""
    boxes, scores = boxes.double().tolist(), scores.double().tolist()
    idxs = idxs.tolist()
    order = sorted(
        range(len(scores)),
        key=lambda i: (scores[i] == scores[i], -scores[i] if scores[i] == scores[i] else 0, i),
    )
    kept = []
    for i in order:
        ok = True
        for k in kept:
            if idxs[k] != idxs[i]:
                continue
            a, b = boxes[k], boxes[i]
            # Same arithmetic as torchvision's CPU kernel, in float32.
            t = lambda v: torch.tensor(v, dtype=torch.float32)
            ax1, ay1, ax2, ay2 = map(t, a)
            bx1, by1, bx2, by2 = map(t, b)
            xx1 = bx1 if ax1 < bx1 else ax1
            yy1 = by1 if ay1 < by1 else ay1
            xx2 = bx2 if bx2 < ax2 else ax2
            yy2 = by2 if by2 < ay2 else ay2
            w = xx2 - xx1 if t(0) < xx2 - xx1 else t(0)
            h = yy2 - yy1 if t(0) < yy2 - yy1 else t(0)
            inter = w * h
            iou = inter / ((ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter)
            if float(iou) > iou_threshold:
                ok = False
                break
        if ok:
            kept.append(i)
    return torch.tensor(kept, dtype=torch.long)


def assert_same_keep(got, want):
    assert torch.equal(got.cpu(), want.cpu()), (
        f"kept {got.tolist()[:20]}..., expected {want.tolist()[:20]}..."
    )


@pytest.mark.parametrize("n", [1, 2, 10, 100, 1000])
@pytest.mark.parametrize("make", [uniform_boxes, clustered_boxes])
def test_equals_torchvision_offset_path_exactly(device, n, make):
    # Up to 1,000 boxes torchvision's CPU batched_nms takes its coordinate-offset
    # path: a stable sort by score, so the kept indices and their order are exact.
    for seed in range(3):
        boxes, scores, idxs = make(n, 80, seed)
        want = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
        got = batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5)
        assert_same_keep(got, want)


@pytest.mark.parametrize("n", [5000, 20000])
@pytest.mark.parametrize("make", [uniform_boxes, clustered_boxes])
def test_equals_torchvision_per_class_path_as_a_set(device, n, make):
    # Above 1,000 boxes torchvision loops over classes and orders tied scores
    # arbitrarily: compare the kept set, and our order against our definition.
    boxes, scores, idxs = make(n, 80, 7)
    want = torchvision.ops.batched_nms(boxes, scores, idxs, 0.6)
    got = batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.6).cpu()
    assert set(got.tolist()) == set(want.tolist())
    key = [(-float(scores[i]), int(i)) for i in got]
    assert key == sorted(key)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_matches_the_oracle_for_every_threshold(device, threshold):
    boxes, scores, idxs = clustered_boxes(300, 5, seed=11)
    got = batched_nms(boxes.to(device), scores.to(device), idxs.to(device), threshold)
    assert_same_keep(got, oracle_batched_nms(boxes, scores, idxs, threshold))


def test_empty_input(device):
    out = batched_nms(
        torch.empty(0, 4, device=device),
        torch.empty(0, device=device),
        torch.empty(0, dtype=torch.long, device=device),
        0.5,
    )
    assert out.shape == (0,) and out.dtype == torch.long


def test_a_pair_just_over_and_just_under_the_threshold(device):
    # Two 10x10 boxes offset by dx overlap with IoU (10-dx)/(10+dx).
    # dx=10/3 gives exactly 0.5; nudge either side.
    for dx, suppressed in [(3.3, True), (3.4, False)]:
        boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [dx, 0.0, 10.0 + dx, 10.0]], device=device)
        scores = torch.tensor([0.9, 0.8], device=device)
        idxs = torch.zeros(2, dtype=torch.long, device=device)
        got = batched_nms(boxes, scores, idxs, 0.5).tolist()
        assert got == ([0] if suppressed else [0, 1])
        assert (
            got == torchvision.ops.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.5).tolist()
        )


def test_equal_iou_and_threshold_is_not_suppressed(device):
    # IoU exactly 0.5 (boxes of area 2 and 2 sharing area 1 is 1/3; use halves):
    # [0,0,2,1] and [1,0,3,1]... IoU = 1/3; [0,0,4,1],[0,0,2,1] IoU = 0.5 exactly.
    boxes = torch.tensor([[0.0, 0.0, 4.0, 1.0], [0.0, 0.0, 2.0, 1.0]], device=device)
    scores = torch.tensor([0.9, 0.8], device=device)
    got = batched_nms(boxes, scores, torch.zeros(2, dtype=torch.long, device=device), 0.5)
    assert got.tolist() == [0, 1]  # strictly greater than suppresses


def test_tied_scores_visit_lower_index_first(device):
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 4 + [[50.0, 50.0, 60.0, 60.0]], device=device)
    scores = torch.tensor([0.5, 0.7, 0.7, 0.7, 0.7], device=device)
    idxs = torch.zeros(5, dtype=torch.long, device=device)
    got = batched_nms(boxes, scores, idxs, 0.5)
    assert got.tolist() == [1, 4]
    assert (
        got.tolist()
        == torchvision.ops.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.5).tolist()
    )


def test_categories_never_suppress_each_other(device):
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3, device=device)
    scores = torch.tensor([0.9, 0.8, 0.7], device=device)
    idxs = torch.tensor([2, 1, 2], device=device)
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == [0, 1]


def test_thousands_of_categories_and_sparse_huge_ids(device):
    boxes, scores, _ = clustered_boxes(3000, 1, seed=3)
    g = torch.Generator().manual_seed(0)
    dense = torch.randint(0, 2000, (3000,), generator=g)
    sparse = dense * 10**12 - 5 * 10**14  # not a compact range: the sort-based bucketing
    want = torchvision.ops.batched_nms(boxes, scores, dense, 0.5)
    for idxs in (dense, sparse):
        got = batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5)
        assert set(got.tolist()) == set(want.tolist())


def test_single_category(device):
    boxes, scores, _ = clustered_boxes(800, 1, seed=4)
    idxs = torch.zeros(800, dtype=torch.long)
    want = torchvision.ops.nms(boxes, scores, 0.5)
    assert_same_keep(batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5), want)


def test_zero_area_and_inverted_boxes_follow_torchvision(device):
    boxes = torch.tensor(
        [
            [5.0, 5.0, 5.0, 5.0],
            [5.0, 5.0, 5.0, 5.0],
            [10.0, 10.0, 0.0, 0.0],
            [0.0, 0.0, 10.0, 10.0],
            [9.0, 9.0, 1.0, 1.0],
        ],
        device=device,
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5], device=device)
    idxs = torch.zeros(5, dtype=torch.long, device=device)
    want = torchvision.ops.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.3)
    assert_same_keep(batched_nms(boxes, scores, idxs, 0.3), want)


def test_nan_scores_are_visited_first_like_torchvision(device):
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [100.0, 100.0, 110.0, 110.0]],
        device=device,
    )
    scores = torch.tensor([0.9, float("nan"), float("inf")], device=device)
    idxs = torch.zeros(3, dtype=torch.long, device=device)
    got = batched_nms(boxes, scores, idxs, 0.5)
    assert got.tolist() == [1, 2]  # NaN first, then inf; box 0 suppressed by the NaN-scored box
    assert (
        got.tolist()
        == torchvision.ops.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.5).tolist()
    )


def test_nan_and_inf_coordinates_never_suppress_nor_are_suppressed(device):
    nan, inf = float("nan"), float("inf")
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [nan, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, nan],
            [0.0, 0.0, inf, inf],
            [0.0, 0.0, 10.0, 10.0],
        ],
        device=device,
    )
    scores = torch.tensor([0.5, 0.9, 0.8, 0.7, 0.4], device=device)
    idxs = torch.zeros(5, dtype=torch.long, device=device)
    got = batched_nms(boxes, scores, idxs, 0.5)
    # NaN boxes 1 and 2 are kept and suppress nothing; the infinite box 3 has IoU 0
    # with finite boxes; box 4 duplicates box 0 and is suppressed by it.
    assert got.tolist() == [1, 2, 3, 0]
    assert got.tolist() == torchvision.ops.nms(boxes.cpu(), scores.cpu(), 0.5).tolist()
    # torchvision.ops.batched_nms differs here on purpose: its coordinate offset
    # (idxs * (boxes.max() + 1)) becomes NaN once any coordinate is NaN or inf,
    # which turns off suppression for every box. We keep suppressing box 4.
    assert 4 in torchvision.ops.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.5).tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_equal_torchvision_on_upcast_boxes(device, dtype):
    boxes, scores, idxs = clustered_boxes(500, 10, seed=5)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    up = torch.float64 if dtype == torch.float64 else torch.float32
    want = torchvision.ops.batched_nms(boxes.to(up), scores.to(up), idxs, 0.5)
    assert_same_keep(batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5), want)


def test_int32_categories(device):
    boxes, scores, idxs = uniform_boxes(200, 4, seed=6)
    want = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
    assert_same_keep(
        batched_nms(boxes.to(device), scores.to(device), idxs.int().to(device), 0.5), want
    )


@pytest.mark.parametrize(
    "boxes, scores, idxs, threshold, message",
    [
        (
            torch.zeros(3, 5),
            torch.zeros(3),
            torch.zeros(3, dtype=torch.long),
            0.5,
            r"boxes must have shape \[N, 4\]",
        ),
        (
            torch.zeros(3, 4),
            torch.zeros(2),
            torch.zeros(3, dtype=torch.long),
            0.5,
            r"scores must have shape \[3\]",
        ),
        (
            torch.zeros(3, 4),
            torch.zeros(3),
            torch.zeros(3),
            0.5,
            "idxs must be an int64 or int32 tensor",
        ),
        (
            torch.zeros(3, 4),
            torch.zeros(3),
            torch.zeros(4, dtype=torch.long),
            0.5,
            r"idxs must have shape \[3\]",
        ),
        (
            torch.zeros(3, 4),
            torch.zeros(3),
            torch.zeros(3, dtype=torch.long),
            float("nan"),
            "iou_threshold must be a number",
        ),
        (
            torch.zeros(3, 4, dtype=torch.long),
            torch.zeros(3),
            torch.zeros(3, dtype=torch.long),
            0.5,
            "boxes must be a floating-point",
        ),
    ],
)
def test_wrong_input_gets_a_clear_error(boxes, scores, idxs, threshold, message):
    with pytest.raises(RuntimeError, match=message):
        batched_nms(boxes, scores, idxs, threshold)


def test_opcheck(device):
    samples = [
        uniform_boxes(50, 3, seed=1),
        clustered_boxes(120, 4, seed=2),
        (torch.empty(0, 4), torch.empty(0), torch.empty(0, dtype=torch.long)),
    ]
    for boxes, scores, idxs in samples:
        torch.library.opcheck(
            torch.ops.pyodlog.batched_nms.default,
            (boxes.to(device), scores.to(device), idxs.to(device), 0.5),
        )
