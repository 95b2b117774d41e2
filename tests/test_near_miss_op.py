"""torch.ops.pyodlog.postprocess_detections_near_miss: the near-misses of the fused post-processing."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import pyodlog
from pyodlog.ops import postprocess_detections, postprocess_detections_near_miss
from pyodlog.ops.postprocess import BELOW_SCORE, OVER_CAP, SUPPRESSED
from tests.helpers.detector_candidates import FAMILIES, candidates_of

CUDA = torch.cuda.is_available() and pyodlog.build_info()["cuda"]


@functools.cache
def cached_candidates(name):
    return candidates_of(name, random_head=True)


def _iou(a: np.ndarray, b: np.ndarray) -> np.float32:
    """common::iou's arithmetic in float32."""
    f = np.float32
    w = max(f(0), f(min(a[2], b[2]) - max(a[0], b[0])))
    h = max(f(0), f(min(a[3], b[3]) - max(a[1], b[1])))
    inter = f(w * h)
    area_a = f(f(a[2] - a[0]) * f(a[3] - a[1]))
    area_b = f(f(b[2] - b[0]) * f(b[3] - b[1]))
    return f(inter / f(f(area_a + area_b) - inter))


def reference(scores, boxes, image_index, n_images, thresh, iou, max_det, k, floor, first_label=0):
    """Near-misses by their definition, one pair at a time (boxes [N, 4], no clipping, no scaling)."""
    s = scores.numpy().astype(np.float32)
    bx = boxes.numpy().astype(np.float32)
    img = image_index.numpy()
    _n, c = s.shape
    out = []
    for b in range(n_images):
        pairs = [
            (float(s[r, lab]), r * c + lab, r, lab)
            for r in np.flatnonzero(img == b)
            for lab in range(first_label, c)
            if s[r, lab] > np.float32(floor)
        ]
        pairs.sort(key=lambda p: (-p[0], p[1]))
        kept: dict[int, list] = {}
        kept_order, misses = [], []
        for p in pairs:
            score, _, r, lab = p
            if not np.float32(score) > np.float32(thresh):
                misses.append((p, BELOW_SCORE, None, np.nan))
                continue
            for q in kept.get(lab, []):
                v = _iou(bx[q[2]], bx[r])
                # The float32 IoU against the threshold as a double, as torchvision's NMS (and
                # the operator) compare it: an IoU of float32(0.3) = 0.30000001 suppresses at 0.3.
                if float(v) > iou:
                    misses.append((p, SUPPRESSED, q, v))
                    break
            else:
                kept.setdefault(lab, []).append(p)
                kept_order.append(p)
        kept_order.sort(key=lambda p: (-p[0], p[1]))
        dets = kept_order[:max_det]
        misses += [(p, OVER_CAP, None, np.nan) for p in kept_order[max_det:]]
        misses.sort(key=lambda m: (-m[0][0], m[0][1]))
        rows = [
            (m[0][2], m[0][3], m[1], dets.index(m[2]) if m[2] in dets else -1, m[3])
            for m in misses[:k]
        ]
        out.append(([(p[2], p[3]) for p in dets], rows, len(misses) > k))
    return out


def run_nm(scores, boxes, image_index, n_images, device="cpu", **kw):
    net = torch.tensor([[1000, 1000]] * n_images)
    args = dict(
        score_thresh=0.5, iou_thresh=0.5, max_detections=5, near_miss=8, near_miss_floor=0.1
    )
    args.update(kw)
    out = postprocess_detections_near_miss(
        scores.to(device),
        boxes.to(device),
        image_index.to(device),
        net.to(device),
        net.to(device),
        clip=False,
        **args,
    )
    return out, args


def assert_like_reference(out, ref):
    det, nm = out
    for b, (dets, rows, exhausted) in enumerate(ref):
        n = int(det.counts[b])
        got = list(zip(det.candidates[b, :n].tolist(), det.labels[b, :n].tolist()))
        assert got == [(int(r), int(lab)) for r, lab in dets], f"image {b}: detections"
        m = int(nm.counts[b])
        assert m == len(rows), f"image {b}: {m} near-misses, expected {len(rows)}"
        assert bool(nm.exhausted[b]) == exhausted
        for j, (r, lab, reason, by, v) in enumerate(rows):
            assert (int(nm.candidates[b, j]), int(nm.labels[b, j])) == (int(r), int(lab)), (b, j)
            assert int(nm.reason[b, j]) == reason, (b, j)
            assert int(nm.suppressed_by[b, j]) == by, (b, j)
            if np.isnan(v):
                assert torch.isnan(nm.suppressor_iou[b, j])
            else:
                assert float(nm.suppressor_iou[b, j]) == pytest.approx(float(v), rel=1e-6)
        # Padding is marked.
        assert (nm.labels[b, m:] == -1).all() and (nm.reason[b, m:] == 0).all()


def random_case(seed, n=60, c=4, n_images=2, quantise=None):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, c, generator=g)
    if quantise:
        scores = (scores * quantise).round() / quantise  # many exact ties
    xy = torch.rand(n, 2, generator=g) * 80
    wh = torch.rand(n, 2, generator=g) * 40 + 5
    boxes = torch.cat([xy, xy + wh], 1)
    image_index = torch.randint(0, n_images, (n,), generator=g)
    return scores, boxes, image_index, n_images


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("quantise", [None, 8])
def test_matches_the_definition_on_random_cases(device, seed, quantise):
    scores, boxes, image_index, n_images = random_case(seed, quantise=quantise)
    for kw in (
        {},
        dict(near_miss=100),
        dict(max_detections=2, near_miss=3),
        dict(near_miss_floor=0.7),  # floor above the threshold: no below_score
        dict(max_detections=0, near_miss=50),
    ):
        out, args = run_nm(scores, boxes, image_index, n_images, device, **kw)
        ref = reference(
            scores,
            boxes,
            image_index,
            n_images,
            args["score_thresh"],
            args["iou_thresh"],
            args["max_detections"],
            args["near_miss"],
            max(args["near_miss_floor"], 0.0) if args["near_miss_floor"] < 0.5 else 0.5,
        )
        out = type(out)(*(type(o)(*(t.cpu() for t in o)) for o in out))
        assert_like_reference(out, ref)


def test_every_reason_occurs_and_the_detections_are_unchanged(device):
    scores, boxes, image_index, n_images = random_case(7, n=200)
    out, _args = run_nm(scores, boxes, image_index, n_images, device, near_miss=400)
    plain = postprocess_detections(
        scores.to(device),
        boxes.to(device),
        image_index.to(device),
        torch.tensor([[1000, 1000]] * n_images).to(device),
        torch.tensor([[1000, 1000]] * n_images).to(device),
        0.5,
        0.5,
        5,
        clip=False,
    )
    for a, b in zip(out.detections, plain):
        assert torch.equal(a.cpu(), b.cpu())
    reasons = set(out.near_misses.reason.cpu().unique().tolist())
    assert {BELOW_SCORE, SUPPRESSED, OVER_CAP} <= reasons


def test_k_zero_empty_one_box_and_nan():
    scores, boxes, image_index, n_images = random_case(3)
    out, _ = run_nm(scores, boxes, image_index, n_images, near_miss=0)
    assert out.near_misses.boxes.shape == (2, 0, 4) and out.near_misses.counts.tolist() == [0, 0]
    # K = 0 computes no near-misses (the detections' pass alone).
    assert out.near_misses.exhausted.tolist() == [False, False]
    empty, _ = run_nm(scores[:0], boxes[:0], image_index[:0], 1)
    assert empty.near_misses.counts.tolist() == [0] and empty.detections.counts.tolist() == [0]
    assert empty.near_misses.exhausted.tolist() == [False]
    one, _ = run_nm(
        torch.tensor([[0.3, 0.9]]), torch.tensor([[1.0, 1.0, 5.0, 5.0]]), torch.tensor([0]), 1
    )
    assert one.detections.counts.tolist() == [1] and one.detections.labels[0, 0] == 1
    assert one.near_misses.counts.tolist() == [1]
    assert one.near_misses.reason[0, 0] == BELOW_SCORE and one.near_misses.labels[0, 0] == 0
    assert one.near_misses.scores[0, 0] == pytest.approx(0.3)
    # NaN scores are neither detections nor near-misses.
    nan, _ = run_nm(
        torch.tensor([[float("nan"), 0.2]]),
        torch.tensor([[1.0, 1.0, 5.0, 5.0]]),
        torch.tensor([0]),
        1,
    )
    assert nan.detections.counts.tolist() == [0] and nan.near_misses.counts.tolist() == [1]
    assert nan.near_misses.labels[0, 0] == 1
    with pytest.raises(RuntimeError, match="near_miss must be >= 0"):
        run_nm(scores, boxes, image_index, n_images, near_miss=-1)
    with pytest.raises(RuntimeError, match="near_miss_floor must be a number"):
        run_nm(scores, boxes, image_index, n_images, near_miss_floor=float("nan"))


def test_ties_are_ordered_by_candidate_then_class():
    # Four identical scores on separate boxes: visiting order is candidate * C + class.
    scores = torch.tensor([[0.3, 0.3], [0.3, 0.3]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    out, _ = run_nm(scores, boxes, torch.tensor([0, 0]), 1, near_miss=3)
    nm = out.near_misses
    assert nm.candidates[0].tolist() == [0, 0, 1] and nm.labels[0].tolist() == [0, 1, 0]
    assert nm.exhausted.tolist() == [True]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_detections_unchanged_and_the_pool_replays_lower_thresholds(device, family):
    """With the family's settings: the detections are torchvision's, and detections + near-misses
    hold exactly the pairs the operator returns at a lower score threshold."""
    c = cached_candidates(family)
    kwargs = dict(c.kwargs)
    if kwargs.get("topk_group") is not None:
        kwargs["topk_group"] = kwargs["topk_group"].to(device)
    tensors = [t.to(device) for t in (c.scores, c.boxes, c.image_index, c.net_sizes, c.orig_sizes)]
    thresh = kwargs["score_thresh"]
    floor = thresh / 4
    out = postprocess_detections_near_miss(
        *tensors, near_miss=100000, near_miss_floor=floor, **kwargs
    )
    det = type(out.detections)(*(t.cpu() for t in out.detections))
    nm = type(out.near_misses)(*(t.cpu() for t in out.near_misses))
    for b, expected in enumerate(c.expected):
        n = int(det.counts[b])
        assert torch.equal(det.boxes[b, :n], expected["boxes"])
        assert torch.equal(det.scores[b, :n], expected["scores"])
    assert not nm.exhausted.any() and int(nm.counts.sum()) > 0
    lower = dict(kwargs, score_thresh=(thresh + floor) / 2)
    at_lower = postprocess_detections(*tensors, **lower)
    at_lower = type(at_lower)(*(t.cpu() for t in at_lower))
    for b in range(len(c.expected)):
        n, m = int(det.counts[b]), int(nm.counts[b])
        pool = set(zip(det.candidates[b, :n].tolist(), det.labels[b, :n].tolist()))
        pool |= set(zip(nm.candidates[b, :m].tolist(), nm.labels[b, :m].tolist()))
        k = int(at_lower.counts[b])
        wanted = set(zip(at_lower.candidates[b, :k].tolist(), at_lower.labels[b, :k].tolist()))
        assert wanted <= pool
    # Near-misses are in visiting order per image.
    for b in range(len(c.expected)):
        m = int(nm.counts[b])
        assert (nm.scores[b, : m - 1] >= nm.scores[b, 1:m]).all()


def test_opcheck():
    # Every slot filled with a suppressed pair (IoU 1): no NaN padding, which the AOT check's
    # assert_close (equal_nan=False) would call a difference.
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.95], [0.85], [0.75], [0.65]])
    boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0]] * 4 + [[5.0, 5.0, 50.0, 60.0]] * 4)
    image_index = torch.tensor([0] * 4 + [1] * 4)
    net = torch.tensor([[100, 100]] * 2)
    args = (scores, boxes, image_index, net, net * 2, 0.5, 0.5, 5, 3, 0.2)
    out = postprocess_detections_near_miss(*args)
    assert (out.near_misses.reason == SUPPRESSED).all()
    torch.library.opcheck(torch.ops.pyodlog.postprocess_detections_near_miss.default, args)
    # With padding (NaN IoU): schema, fake tensor and autograd registration.
    scores, boxes, image_index, n_images = random_case(5)
    net = torch.tensor([[100, 100]] * n_images)
    args = (scores, boxes, image_index, net, net * 2, 0.5, 0.5, 5, 6, 0.2)
    torch.library.opcheck(
        torch.ops.pyodlog.postprocess_detections_near_miss.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("topk", [-1, 100])
@pytest.mark.parametrize("per_class", [False, True])
def test_tied_below_score_pairs_across_classes_keep_visiting_order(device, per_class, topk):
    # Pair (5, 0) is collected first when classes are walked one by one; (1, 1) ties it and
    # visits first (lower row). With K=1 and the held pair pruned to, the tie must still win.
    scores = torch.zeros(6, 2)
    scores[5, 0], scores[0, 1], scores[1, 1] = 0.3, 0.2, 0.3
    boxes = torch.tensor([[i * 100.0, 0.0, i * 100.0 + 50, 50.0] for i in range(6)])
    out, _ = run_nm(
        scores,
        boxes,
        torch.zeros(6, dtype=torch.long),
        1,
        device,
        near_miss=1,
        near_miss_floor=0.0,
        topk=topk,
        topk_per_class=per_class,
    )
    nm = out.near_misses
    assert int(nm.counts[0]) == 1 and bool(nm.exhausted[0])
    assert (int(nm.candidates[0, 0]), int(nm.labels[0, 0])) == (1, 1)


@pytest.mark.parametrize("n_above", [4, 5, 6, 9])
@pytest.mark.parametrize("below_first", [False, True])
def test_below_pairs_around_the_point_where_they_stop_mattering(device, n_above, below_first):
    # max_detections 2 + K 3: with more than 5 pairs above the threshold, no below pair can be a
    # near-miss and the budget is exhausted; the CPU stops collecting below pairs there. At 4 or
    # 5 above pairs the below pairs still decide the near-misses and the exhausted flag.
    n_below = 3
    scores = torch.zeros(n_above + n_below, 2)
    above = torch.linspace(0.9, 0.6, n_above)
    below = torch.tensor([0.45, 0.3, 0.2])
    if below_first:
        scores[:n_below, 1], scores[n_below:, 0] = below, above
    else:
        scores[:n_above, 0], scores[n_above:, 1] = above, below
    n = n_above + n_below
    boxes = torch.tensor([[i * 100.0, 0.0, i * 100.0 + 50, 50.0] for i in range(n)])  # disjoint
    image_index = torch.zeros(n, dtype=torch.long)
    for k in (3, 4):
        out, _ = run_nm(scores, boxes, image_index, 1, device, max_detections=2, near_miss=k)
        ref = reference(scores, boxes, image_index, 1, 0.5, 0.5, 2, k, 0.1)
        out = type(out)(*(type(o)(*(t.cpu() for t in o)) for o in out))
        assert_like_reference(out, ref)


def test_reference_and_operator_suppress_at_an_iou_equal_to_the_float32_threshold(device):
    # IoU of these boxes is float32(0.3) = 0.30000001192..., above 0.3 as a double: torchvision's
    # NMS suppresses the second box at iou_thresh=0.3, and so must the operator and the reference.
    from torchvision.ops import nms

    boxes = torch.tensor([[3.75, 2.75, 11.25, 13.25], [5.75, 4.75, 10.25, 10.0]])
    scores = torch.tensor([[0.9], [0.8]])
    assert _iou(boxes[0].numpy(), boxes[1].numpy()) == np.float32(0.3)
    assert nms(boxes, scores[:, 0], 0.3).tolist() == [0]
    image_index = torch.zeros(2, dtype=torch.long)
    out, _ = run_nm(
        scores, boxes, image_index, 1, device, iou_thresh=0.3, near_miss=4, near_miss_floor=0.1
    )
    ref = reference(scores, boxes, image_index, 1, 0.5, 0.3, 5, 4, 0.1)
    assert ref[0][0] == [(0, 0)]
    out = type(out)(*(type(o)(*(t.cpu() for t in o)) for o in out))
    assert_like_reference(out, ref)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU present")
@pytest.mark.parametrize("per_class_boxes", [False, True])
@pytest.mark.parametrize("topk_per_class", [False, True])
def test_a_dense_head_cut_by_the_top_k_gives_the_cpu_result_on_cuda(
    per_class_boxes, topk_per_class
):
    """On CUDA the pairs the top-k cuts leave the operator before NMS (a compaction), and boxes
    of class-agnostic heads are clipped and checked per row: the result is the CPU kernel's,
    field by field, with most pairs cut, tied scores, boxes under min_size and NaN boxes."""
    g = torch.Generator().manual_seed(11)
    n_images, n, c, levels = 3, 4000, 9, 4
    scores = (torch.rand(n, c, generator=g) * 16).round() / 16  # many exact ties
    shape = (n, c, 2) if per_class_boxes else (n, 2)
    xy = torch.rand(shape, generator=g) * 300
    wh = torch.rand(shape, generator=g) * 60
    boxes = torch.cat([xy, xy + wh], -1)  # some narrower than min_size
    boxes[::97] = float("nan")
    image_index = torch.randint(0, n_images, (n,), generator=g)
    topk_group = image_index * levels + torch.arange(n) % levels
    net = torch.tensor([[256, 320], [300, 300], [320, 256]])
    orig = torch.tensor([[512, 640], [300, 300], [160, 128]])

    def run(device):
        out = postprocess_detections_near_miss(
            scores.to(device),
            boxes.to(device),
            image_index.to(device),
            net.to(device),
            orig.to(device),
            0.3,
            0.5,
            20,
            25,
            0.1,
            min_size=2.0,
            topk=15 if topk_per_class else 40,
            topk_group=topk_group.to(device),
            topk_per_class=topk_per_class,
        )
        return [t.cpu() for part in out for t in part]

    got, want = run("cuda"), run("cpu")
    assert int(want[4].sum()) > 0 and int(want[-2].sum()) > 0  # detections and near-misses
    for a, b in zip(got, want):
        assert torch.equal(a, b) or (
            a.is_floating_point() and torch.allclose(a, b, equal_nan=True, rtol=0, atol=0)
        )
