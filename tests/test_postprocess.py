"""torch.ops.pyodlog.postprocess_detections against torchvision's own post-processing."""

from __future__ import annotations

import functools

import pytest
import torch

from pyodlog.ops import postprocess_detections, postprocess_detections_near_miss
from tests.helpers.detector_candidates import FAMILIES, candidates_of


@functools.cache
def cached_candidates(name, random_head):
    return candidates_of(name, random_head=random_head)


def run(c, device, **overrides):
    kwargs = dict(c.kwargs)
    if kwargs.get("topk_group") is not None:
        kwargs["topk_group"] = kwargs["topk_group"].to(device)
    kwargs.update(overrides)
    out = postprocess_detections(
        c.scores.to(device),
        c.boxes.to(device),
        c.image_index.to(device),
        c.net_sizes.to(device),
        c.orig_sizes.to(device),
        **kwargs,
    )
    return type(out)(*(t.cpu() for t in out))


def assert_matches(out, c):
    for b, expected in enumerate(c.expected):
        n = int(out.counts[b])
        assert n == len(expected["boxes"]), (
            f"image {b}: {n} detections, torchvision {len(expected['boxes'])}"
        )
        assert torch.equal(out.scores[b, :n], expected["scores"]), f"image {b}: scores differ"
        assert torch.equal(out.labels[b, :n], expected["labels"]), f"image {b}: labels differ"
        assert torch.equal(out.boxes[b, :n], expected["boxes"]), f"image {b}: boxes differ"
        # Padding is marked, and each detection points at the candidate it came from.
        assert (out.labels[b, n:] == -1).all() and (out.candidates[b, n:] == -1).all()
        rows, labels = out.candidates[b, :n], out.labels[b, :n]
        assert (c.image_index[rows] == b).all()
        assert torch.equal(c.scores[rows, labels], out.scores[b, :n])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_equals_torchvision_on_random_head_outputs(device, family):
    # Real proposals/anchors, sizes and post-processing code; random head outputs
    # so that every score is distinct and there is exactly one right answer.
    c = cached_candidates(family, True)
    assert sum(len(e["boxes"]) for e in c.expected) > 50
    assert_matches(run(c, device), c)


@pytest.mark.parametrize(
    "family", ["fasterrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn", "fcos_resnet50_fpn"]
)
def test_equals_torchvision_on_the_models_own_heads(device, family):
    c = cached_candidates(family, False)
    assert sum(len(e["boxes"]) for e in c.expected) > 50
    assert_matches(run(c, device), c)


def test_tied_scores_give_the_same_detections_in_a_tie_order_of_their_own(device):
    # MobileNet's random initialisation gives many exactly equal scores.
    from torchvision.models import detection

    from tests.helpers.detector_candidates import faster_rcnn, images

    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.011
    ).eval()
    c = faster_rcnn(model, images(0))
    out = run(c, device)
    for b, expected in enumerate(c.expected):
        n = int(out.counts[b])
        assert n == len(expected["scores"]) and n > 0
        assert torch.equal(
            out.scores[b, :n], expected["scores"]
        )  # the score sequence is fixed even with ties
        # Which of the candidates tied at the cut-off score make the max_detections
        # is a matter of tie order; every detection scoring above it is the same.
        cut = float(expected["scores"][-1])
        got = {
            (s, lab, tuple(box))
            for s, lab, box in zip(
                out.scores[b, :n].tolist(), out.labels[b, :n].tolist(), out.boxes[b, :n].tolist()
            )
            if s > cut
        }
        want = {
            (s, lab, tuple(box))
            for s, lab, box in zip(
                expected["scores"].tolist(), expected["labels"].tolist(), expected["boxes"].tolist()
            )
            if s > cut
        }
        assert got == want


def test_interleaved_candidates_of_several_images_give_the_same_result(device):
    c = cached_candidates("fcos_resnet50_fpn", True)
    perm = torch.randperm(len(c.image_index), generator=torch.Generator().manual_seed(0))
    shuffled = type(c)(
        c.scores[perm],
        c.boxes[perm],
        c.image_index[perm],
        c.net_sizes,
        c.orig_sizes,
        dict(c.kwargs, topk_group=c.kwargs["topk_group"][perm]),
        c.expected,
    )
    out, ref = run(shuffled, device), run(c, device)
    # Same detections; candidates point at the shuffled rows. Order among equal
    # scores follows the candidate index, which the shuffle changed: compare sets.
    assert torch.equal(out.counts, ref.counts)
    for b in range(len(c.expected)):
        n = int(ref.counts[b])
        assert torch.equal(out.scores[b, :n], ref.scores[b, :n])
        assert torch.equal(perm[out.candidates[b, :n]], ref.candidates[b, :n])


def small_case(device, n=6, n_classes=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(n, n_classes, generator=g, dtype=dtype)
    xy = torch.rand(n, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 10], 1).to(dtype)
    return (
        scores.to(device),
        boxes.to(device),
        torch.zeros(n, dtype=torch.long, device=device),
        torch.tensor([[100, 100]], device=device),
        torch.tensor([[200, 50]], device=device),
    )


def test_no_candidates_and_no_detections(device):
    scores, boxes, index, net, orig = small_case(device)
    empty = postprocess_detections(scores[:0], boxes[:0], index[:0], net, orig, 0.1, 0.5, 5)
    assert empty.counts.tolist() == [0] and empty.boxes.shape == (1, 5, 4)
    none_pass = postprocess_detections(scores, boxes, index, net, orig, 2.0, 0.5, 5)
    assert none_pass.counts.tolist() == [0] and (none_pass.labels == -1).all()
    zero_max = postprocess_detections(scores, boxes, index, net, orig, 0.0, 0.5, 0)
    assert zero_max.boxes.shape == (1, 0, 4) and zero_max.counts.tolist() == [0]
    all_background = postprocess_detections(
        scores, boxes, index, net, orig, 0.0, 0.5, 5, first_label=3
    )
    assert all_background.counts.tolist() == [0]


def test_an_image_without_candidates_gets_no_detections(device):
    scores, boxes, index, _, _ = small_case(device)
    net = torch.tensor([[100, 100], [100, 100], [100, 100]], device=device)
    index = torch.tensor([0, 2, 0, 2, 0, 2], device=device)
    out = postprocess_detections(scores, boxes, index, net, net, 0.0, 0.5, 10)
    assert out.counts[1].item() == 0 and out.counts[0].item() > 0 and out.counts[2].item() > 0


def test_one_candidate_one_class(device):
    out = postprocess_detections(
        torch.tensor([[0.7]], device=device),
        torch.tensor([[10.0, 20.0, 30.0, 40.0]], device=device),
        torch.tensor([0], device=device),
        torch.tensor([[100, 100]], device=device),
        torch.tensor([[50, 200]], device=device),
        0.5,
        0.5,
        3,
    )
    assert (
        out.counts.tolist() == [1]
        and out.labels[0, 0].item() == 0
        and out.candidates[0, 0].item() == 0
    )
    assert out.boxes[0, 0].tolist() == [20.0, 10.0, 60.0, 20.0]


def test_nan_scores_never_pass_and_nan_boxes_never_suppress(device):
    nan = float("nan")
    scores = torch.tensor([[nan], [0.9], [0.8], [0.7]], device=device)
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 10.0],
            [nan, 0.0, 10.0, 10.0],
            [1.0, 1.0, 10.0, 10.0],
        ],
        device=device,
    )
    out = postprocess_detections(
        scores,
        boxes,
        torch.zeros(4, dtype=torch.long, device=device),
        torch.tensor([[100, 100]], device=device),
        torch.tensor([[100, 100]], device=device),
        0.1,
        0.5,
        10,
    )
    assert out.candidates[0, : int(out.counts[0])].tolist() == [
        1,
        2,
    ]  # 3 is suppressed by 1, NaN box 2 kept


def test_clip_and_min_size(device):
    scores = torch.tensor([[0.9], [0.8]], device=device)
    boxes = torch.tensor([[-20.0, -20.0, 50.0, 200.0], [99.999, 10.0, 150.0, 20.0]], device=device)
    args = (
        torch.zeros(2, dtype=torch.long, device=device),
        torch.tensor([[100, 100]], device=device),
        torch.tensor([[100, 100]], device=device),
        0.1,
        0.5,
        10,
    )
    clipped = postprocess_detections(scores, boxes, *args, min_size=0.01)
    # Box 1 becomes [99.999, 10, 100, 20]: narrower than 0.01 once clipped.
    assert clipped.counts.tolist() == [1] and clipped.boxes[0, 0].tolist() == [
        0.0,
        0.0,
        50.0,
        100.0,
    ]
    unclipped = postprocess_detections(scores, boxes, *args, min_size=0.01, clip=False)
    assert unclipped.counts.tolist() == [2] and unclipped.boxes[0, 0].tolist() == [
        -20.0,
        -20.0,
        50.0,
        200.0,
    ]


def test_topk_per_group_keeps_the_best_of_each_group(device):
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6]], device=device)
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [20.0, 0.0, 30.0, 10.0],
            [40.0, 0.0, 50.0, 10.0],
            [60.0, 0.0, 70.0, 10.0],
        ],
        device=device,
    )
    group = torch.tensor([0, 0, 1, 1], device=device)
    out = postprocess_detections(
        scores,
        boxes,
        torch.zeros(4, dtype=torch.long, device=device),
        torch.tensor([[100, 100]], device=device),
        torch.tensor([[100, 100]], device=device),
        0.1,
        0.5,
        10,
        topk=1,
        topk_group=group,
    )
    assert out.candidates[0, : int(out.counts[0])].tolist() == [0, 2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_are_accepted_and_kept(device, dtype):
    scores, boxes, index, net, orig = small_case(device, dtype=dtype)
    out = postprocess_detections(scores, boxes, index, net, orig, 0.1, 0.5, 10)
    ref = postprocess_detections(scores.float(), boxes.float(), index, net, orig, 0.1, 0.5, 10)
    assert out.boxes.dtype == dtype and out.scores.dtype == dtype
    assert torch.equal(out.counts, ref.counts)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(scores=torch.zeros(6)), r"scores must have shape \[N, C\]"),
        (dict(boxes=torch.zeros(6, 5)), r"boxes must have shape \[6, 4\]"),
        (
            dict(boxes=torch.zeros(6, 4, dtype=torch.float64)),
            "boxes and scores must have the same dtype",
        ),
        (dict(image_index=torch.zeros(5, dtype=torch.long)), r"image_index must have shape \[6\]"),
        (dict(image_index=torch.full((6,), 3)), "out of range for 1 images"),
        (
            dict(net_sizes=torch.tensor([[100, 100], [1, 1]])),
            "net_sizes and orig_sizes must describe the same images",
        ),
        (dict(net_sizes=torch.tensor([[0, 100]])), "image sizes must be positive"),
        (dict(max_detections=-1), "max_detections must be >= 0"),
        (dict(iou_thresh=float("nan")), "iou_thresh must be a number"),
    ],
)
def test_wrong_input_gets_a_clear_error(change, message):
    scores, boxes, index, net, orig = small_case("cpu")
    args = dict(
        scores=scores,
        boxes=boxes,
        image_index=index,
        net_sizes=net,
        orig_sizes=orig,
        score_thresh=0.1,
        iou_thresh=0.5,
        max_detections=10,
    )
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        postprocess_detections(**args)


def test_opcheck(device):
    scores, boxes, index, net, orig = small_case(device)
    samples = [
        (scores, boxes, index, net, orig, 0.1, 0.5, 4),
        (
            scores,
            boxes.unsqueeze(1).expand(-1, 3, -1).contiguous(),
            index,
            net,
            orig,
            0.0,
            0.3,
            10,
            1,
            0.01,
        ),
        (
            scores,
            boxes,
            index,
            net,
            orig,
            0.0,
            0.5,
            10,
            0,
            0.0,
            2,
            torch.tensor([0, 0, 1, 1, 2, 2], device=device),
            True,
        ),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.pyodlog.postprocess_detections.default, args)


def test_topk_among_tied_scores_keeps_the_lowest_candidates(device):
    # 20 far-apart boxes with one score: the top-3 are candidates 0, 1, 2 (the
    # CPU kernel prunes while scanning; ties must still resolve by index).
    n = 20
    scores = torch.full((n, 1), 0.5, device=device)
    x = torch.arange(n, dtype=torch.float32, device=device)[:, None] * 20
    boxes = torch.cat([x, torch.zeros_like(x), x + 10, torch.full_like(x, 10)], 1)
    out = postprocess_detections(
        scores,
        boxes,
        torch.zeros(n, dtype=torch.long, device=device),
        torch.tensor([[100, 1000]], device=device),
        torch.tensor([[100, 1000]], device=device),
        0.1,
        0.5,
        10,
        topk=3,
    )
    assert out.candidates[0, : int(out.counts[0])].tolist() == [0, 1, 2]


def test_topk_prunes_to_the_same_result_as_a_full_sort(device):
    g = torch.Generator().manual_seed(9)
    n, c = 3000, 7
    scores = torch.rand(n, c, generator=g)
    scores[::5] = 0.25  # many ties
    xy = torch.rand(n, 2, generator=g) * 500
    boxes = torch.cat([xy, xy + 30], 1)
    group = torch.randint(0, 4, (n,), generator=g)
    args = (
        torch.zeros(n, dtype=torch.long),
        torch.tensor([[600, 600]]),
        torch.tensor([[600, 600]]),
        0.2,
        0.5,
        1000,
    )
    out = postprocess_detections(
        scores.to(device),
        boxes.to(device),
        *(a.to(device) if torch.is_tensor(a) else a for a in args),
        topk=50,
        topk_group=group.to(device),
    )
    # Reference: the top-50 of each group by (score desc, flat index asc), then NMS per class.
    import torchvision

    flat_scores = scores.reshape(-1)
    flat = torch.arange(n * c)
    passing = flat[flat_scores > 0.2]
    chosen = []
    for gid in range(4):
        members = passing[group[passing // c] == gid]
        order = sorted(members.tolist(), key=lambda f: (-float(flat_scores[f]), f))
        chosen += order[:50]
    chosen = torch.tensor(chosen)
    keep = torchvision.ops.batched_nms(boxes[chosen // c], flat_scores[chosen], chosen % c, 0.5)
    ref = chosen[keep]
    got = (out.candidates[0, : int(out.counts[0])] * c + out.labels[0, : int(out.counts[0])]).cpu()
    assert sorted(got.tolist()) == sorted(ref.tolist())


@pytest.mark.parametrize("family", ["fasterrcnn_resnet50_fpn_v2"])
def test_one_image_alone_gives_the_same_detections(device, family):
    # One image per call with thousands of (candidate, class) pairs: the CPU kernel
    # then suppresses the classes in parallel (a batch runs them serially inside
    # its parallel loop over images); the detections must not change.
    c = cached_candidates(family, True)
    for b, expected in enumerate(c.expected):
        rows = torch.nonzero(c.image_index == b).squeeze(1)
        scores, boxes = c.scores[rows], c.boxes[rows]
        assert (
            int((scores[:, 1:] > c.kwargs["score_thresh"]).sum()) > 4096
        )  # the parallel path's size
        out = postprocess_detections(
            scores.to(device),
            boxes.to(device),
            torch.zeros(len(rows), dtype=torch.long, device=device),
            c.net_sizes[b : b + 1].to(device),
            c.orig_sizes[b : b + 1].to(device),
            **c.kwargs,
        )
        n = int(out.counts[0])
        assert n == len(expected["boxes"]) > 0
        assert torch.equal(out.scores[0, :n].cpu(), expected["scores"])
        assert torch.equal(out.labels[0, :n].cpu(), expected["labels"])
        assert torch.equal(out.boxes[0, :n].cpu(), expected["boxes"])
        picked = out.candidates[0, :n].cpu()  # rows of this call's input
        assert torch.equal(scores[picked, out.labels[0, :n].cpu()], expected["scores"])


@pytest.mark.parametrize("score_thresh", [0.05, 0.5, 0.97])
def test_block_scan_of_many_classes_with_nan_and_inf_scores(device, score_thresh):
    # 91 classes from label 1: the CPU compares scores 32 at a time (blocks 1-32, 33-64 and a
    # short 65-90); NaN never passes, +inf always does, wherever they fall in a block. The result
    # equals torchvision's batched NMS over the pairs above the threshold, and float64 input
    # (compared one score at a time) gives the same detections.
    from torchvision.ops import batched_nms

    g = torch.Generator().manual_seed(7)
    n, c = 120, 91
    scores = torch.rand(n, c, generator=g)
    flat = scores.view(-1)
    flat[torch.randint(0, n * c, (300,), generator=g)] = float("nan")
    flat[torch.randint(0, n * c, (5,), generator=g)] = float("inf")
    scores[:, 32] = float("nan")  # a block's first column
    scores[3, 64] = float("inf")  # and another's (one: tied infinities have no single order)
    xy = torch.rand(n, c, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + torch.rand(n, c, 2, generator=g) * 60 + 1], -1)
    size = torch.tensor([[300, 300]])
    kwargs = dict(score_thresh=score_thresh, iou_thresh=0.5, max_detections=50, first_label=1)
    index = torch.zeros(n, dtype=torch.long)
    out = postprocess_detections(
        scores.to(device),
        boxes.to(device),
        index.to(device),
        size.to(device),
        size.to(device),
        **kwargs,
    )
    wide = postprocess_detections(scores.double(), boxes.double(), index, size, size, **kwargs)
    pairs = (scores[:, 1:] > score_thresh).nonzero()
    rows, labels = pairs[:, 0], pairs[:, 1] + 1
    keep = batched_nms(boxes[rows, labels], scores[rows, labels], labels, 0.5)[:50]
    m = int(out.counts[0])
    assert m == len(keep) == int(wide.counts[0])
    got = sorted(zip(out.candidates[0, :m].tolist(), out.labels[0, :m].tolist()))
    assert got == sorted(zip(rows[keep].tolist(), labels[keep].tolist()))
    assert torch.equal(out.candidates[0, :m].cpu(), wide.candidates[0, :m])
    assert torch.equal(out.labels[0, :m].cpu(), wide.labels[0, :m])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("thresh", [0.3, 0.05, 0.7])
def test_narrow_scores_meet_the_threshold_as_torch_compares_them(device, dtype, thresh):
    # torchvision's heads keep `scores > score_thresh` with scores in the model's dtype: torch
    # rounds the Python float to float16/bfloat16 first (0.3 -> 0.30005 in float16). Scores at
    # that rounded value and its neighbours, one per class on disjoint boxes: exactly the pairs
    # torch passes are detections, for the plain and the near-miss operator, and the pairs at or
    # below it are below_score near-misses.
    at = torch.tensor(thresh, dtype=dtype)
    step = torch.finfo(dtype).eps * float(at)
    values = torch.tensor(
        [float(at) - 2 * step, float(at) - step, float(at), float(at) + step, float(at) + 2 * step]
    ).to(dtype)
    n = len(values)
    scores = torch.diag(values).to(dtype)  # row i holds value i in class i
    boxes = torch.tensor([[i * 20.0, 0.0, i * 20.0 + 10, 10.0] for i in range(n)]).to(dtype)
    index = torch.zeros(n, dtype=torch.long)
    size = torch.tensor([[200, 200]])
    passes = (values > thresh).nonzero().squeeze(1).tolist()  # torch's own comparison
    assert 0 < len(passes) < n
    args = [t.to(device) for t in (scores, boxes, index, size, size)]
    out = postprocess_detections(*args, thresh, 0.5, 10)
    m = int(out.counts[0])
    assert sorted(out.candidates[0, :m].tolist()) == passes
    det, nm = postprocess_detections_near_miss(
        *args, thresh, 0.5, 10, near_miss=8, near_miss_floor=thresh / 2
    )
    assert sorted(det.candidates[0, : int(det.counts[0])].tolist()) == passes
    below = nm.candidates[0, : int(nm.counts[0])].tolist()
    assert sorted(below) == [i for i in range(n) if i not in passes]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_narrow_logits_activated_in_the_operator_meet_the_threshold_as_torch_compares_them(
    device, dtype
):
    # RetinaNet in float16: `torch.sigmoid(logits) > score_thresh`, both in float16. Logits
    # whose sigmoid lands on the rounded threshold (above 0.3 itself) and next to it.
    thresh = 0.3
    grid = torch.linspace(-1.5, 0.5, 4001).to(dtype).unique()
    activated = torch.sigmoid(grid)
    at = torch.tensor(thresh, dtype=dtype)
    assert float(at) > thresh
    logits = grid[
        (activated >= at - 2 * torch.finfo(dtype).eps * float(at)) & (activated <= at * 1.01)
    ]
    n = len(logits)
    assert n >= 3 and bool((torch.sigmoid(logits) == at).any())
    scores = torch.full((n, n), -20.0, dtype=dtype)
    scores[torch.arange(n), torch.arange(n)] = logits
    boxes = torch.tensor([[i * 20.0, 0.0, i * 20.0 + 10, 10.0] for i in range(n)]).to(dtype)
    size = torch.tensor([[200, 20 * n + 20]])
    passes = (torch.sigmoid(logits) > thresh).nonzero().squeeze(1).tolist()
    args = [t.to(device) for t in (scores, boxes, torch.zeros(n, dtype=torch.long), size, size)]
    out = postprocess_detections(*args, thresh, 0.5, 100, activation="sigmoid")
    assert sorted(out.candidates[0, : int(out.counts[0])].tolist()) == passes
