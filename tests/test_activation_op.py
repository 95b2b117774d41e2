"""The post-processing operators on raw logits (``activation=``) and ``pyodlog.ops.activated_rows``.

The scores the operators compute must be torch's own float activation, compared with the threshold
as the detection heads compare it: a pair whose sigmoid rounds to exactly the threshold fails.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torchvision.models import detection

import pyodlog
from pyodlog import InMemorySink
from pyodlog.ops import (
    activated_rows,
    postprocess_detections,
    postprocess_detections_near_miss,
)
from tests.helpers.detector_candidates import SMALL, images
from tests.helpers.outputs import assert_outputs_equal, distinct_init, last_record

THRESH = 0.05


def torch_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """torch.sigmoid's vectorised value of every element: each row padded past its end, and one
    thread (one contiguous run), so that none of its elements falls in the scalar tail of a run
    (torch computes the last < 2 vectors of a run another way, which differs in the last bit now
    and then)."""
    flat = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    pad = torch.zeros(flat.shape[0], 64, dtype=x.dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = torch.sigmoid(torch.cat([flat, pad], 1))
    finally:
        torch.set_num_threads(threads)
    return out[:, : flat.shape[1]].reshape(x.shape)


def activate(logits, activation, centerness=None):
    s = torch_sigmoid(logits)
    if activation == "sigmoid_centerness":
        s = torch.sqrt(s * torch_sigmoid(centerness.reshape(-1))[:, None])
    return s


def boundary_logits(thresh: float, dtype=torch.float32):
    """Logits just around logit(thresh): some whose sigmoid is exactly ``thresh`` (in ``dtype``),
    some one step below and above it."""
    centre = torch.logit(torch.tensor(thresh, dtype=torch.float64)).to(dtype)
    x = centre.repeat(4001)
    up = x.clone()
    # Walk float steps away from the centre (nextafter, repeated).
    for i in range(1, 2001):
        up[2000 + i] = torch.nextafter(
            up[2000 + i - 1 : 2000 + i], torch.tensor([1e9], dtype=dtype)
        )
        up[2000 - i] = torch.nextafter(
            up[2000 - i + 1 : 2000 - i + 2], torch.tensor([-1e9], dtype=dtype)
        )
    return up


def random_case(seed, n=200, c=5, n_images=2, dtype=torch.float32, shift=-2.5):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g) * 1.5 + shift).to(dtype)
    xy = torch.rand(n, 2, generator=g) * 80
    wh = torch.rand(n, 2, generator=g) * 40 + 1
    boxes = torch.cat([xy, xy + wh], 1).to(dtype)
    image_index = torch.randint(0, n_images, (n,), generator=g)
    centerness = (torch.randn(n, generator=g) * 2).to(dtype)
    return logits, boxes, image_index, centerness


def sizes(n_images):
    net = torch.tensor([[100, 100]] * n_images)
    return net, net * 2


def assert_same_results(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y) or (
            x.is_floating_point()
            and torch.equal(x.isnan(), y.isnan())
            and torch.equal(x.nan_to_num(0), y.nan_to_num(0))
        )


@pytest.mark.parametrize("activation", ["sigmoid", "sigmoid_centerness"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"topk": 7, "topk_per_class": True},
        {"first_label": 1, "min_size": 5.0},
    ],
)
def test_logits_in_give_what_activated_scores_give(activation, dtype, kw):
    for seed in range(3):
        logits, boxes, image_index, ctr = random_case(seed, dtype=dtype)
        net, orig = sizes(2)
        centerness = ctr if activation == "sigmoid_centerness" else None
        scores = activate(logits, activation, centerness)
        extra = dict(kw)
        if "topk" in extra:
            extra["topk_group"] = image_index * 3 + torch.arange(len(image_index)) % 3
        args = (boxes, image_index, net, orig, THRESH, 0.5, 9)
        want = postprocess_detections(scores, *args, **extra)
        got = postprocess_detections(
            logits, *args, **extra, activation=activation, centerness=centerness
        )
        assert int(want.counts.sum()) > 0
        assert_same_results(got, want)
        want_nm = postprocess_detections_near_miss(scores, *args[:-1], 9, 6, 0.01, **extra)
        got_nm = postprocess_detections_near_miss(
            logits, *args[:-1], 9, 6, 0.01, **extra, activation=activation, centerness=centerness
        )
        assert int(want_nm.near_misses.counts.sum()) > 0
        assert_same_results(got_nm.detections, want_nm.detections)
        assert_same_results(got_nm.near_misses, want_nm.near_misses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_a_sigmoid_equal_to_the_threshold_fails_one_above_passes(dtype):
    x = boundary_logits(THRESH, dtype)
    s = torch_sigmoid(x)
    thresh = float(torch.tensor(THRESH, dtype=dtype))
    if dtype == torch.float32:
        assert (s == thresh).any()  # float32 logits whose sigmoid is exactly 0.05
    else:
        thresh = float(s[len(s) // 2])  # a sigmoid value that some logits reach exactly
    at = s == thresh
    above = s > thresh
    assert at.any() and above.any() and (s < thresh).any()
    n = len(x)
    logits = x[:, None]
    boxes = torch.tensor([[i * 10.0, 0.0, i * 10.0 + 5, 5.0] for i in range(n)], dtype=dtype)
    image_index = torch.zeros(n, dtype=torch.long)
    net = torch.tensor([[10, 10 * n + 10]])
    out = postprocess_detections(
        logits, boxes, image_index, net, net, thresh, 0.5, n, activation="sigmoid"
    )
    kept = set(out.candidates[0, : int(out.counts[0])].tolist())
    assert kept == set(above.nonzero().flatten().tolist())  # as torchvision: scores > thresh
    assert torch.equal(out.scores[0, : len(kept)], s[above].sort(descending=True).values)
    # With near-misses the pairs at the threshold are below_score, never detections.
    nm = postprocess_detections_near_miss(
        logits, boxes, image_index, net, net, thresh, 0.5, n, n, 0.0, activation="sigmoid"
    )
    assert set(nm.detections.candidates[0, : int(nm.detections.counts[0])].tolist()) == kept
    below = set(nm.near_misses.candidates[0, : int(nm.near_misses.counts[0])].tolist())
    assert below == set((~above & (s > 0)).nonzero().flatten().tolist())
    rows, scores = activated_rows(logits, "sigmoid", thresh)
    assert set(above.nonzero().flatten().tolist()) <= set(rows.tolist())
    assert torch.equal(scores, s[rows][:, None].reshape(-1, 1))


def test_infinities_and_nan():
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[inf, -inf], [nan, 0.0], [-inf, -inf], [nan, nan], [0.0, inf]])
    boxes = torch.tensor([[i * 20.0, 0.0, i * 20.0 + 10, 10.0] for i in range(5)])
    image_index = torch.zeros(5, dtype=torch.long)
    net = torch.tensor([[100, 100]])
    for thresh in (0.5, 0.0, -1.0):
        args = (boxes, image_index, net, net, thresh, 0.5, 10)
        want = postprocess_detections(torch.sigmoid(logits), *args)
        got = postprocess_detections(logits, *args, activation="sigmoid")
        assert_same_results(got, want)
    rows, scores = activated_rows(logits, "sigmoid", 0.5)
    assert {0, 1, 3, 4} <= set(rows.tolist())  # +inf and NaN rows are never skipped
    assert torch.equal(scores.isnan(), torch.sigmoid(logits)[rows].isnan())
    rows, _ = activated_rows(logits, "sigmoid", -1.0)
    assert rows.tolist() == [0, 1, 2, 3, 4]  # every score passes a negative threshold
    # A NaN centerness leaves the row's scores NaN: never a detection.
    ctr = torch.tensor([nan, 0.0, 0.0, 0.0, 0.0])
    got = postprocess_detections(
        logits, *args[:4], 0.1, 0.5, 10, activation="sigmoid_centerness", centerness=ctr
    )
    assert 0 not in got.candidates[0, : int(got.counts[0])].tolist()


def test_rows_left_out_cannot_pass_and_scores_are_torchs():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5000, 7, generator=g) * 2 - 4
    ctr = torch.randn(5000, generator=g) * 3
    for activation, centerness in (("sigmoid", None), ("sigmoid_centerness", ctr)):
        for thresh in (0.01, 0.05, 0.3, 0.9, 1.0, 2.0):
            rows, scores = activated_rows(logits, activation, thresh, 1, centerness)
            full = activate(logits, activation, centerness)
            passing = (full[:, 1:] > thresh).any(1).nonzero().flatten()
            assert set(passing.tolist()) <= set(rows.tolist())
            assert torch.equal(rows, rows.sort().values)
            assert torch.equal(scores, full[rows])
            if thresh == 0.3:
                assert len(rows) < len(logits) / 2  # the bound does skip rows


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("inference", [False, True])
def test_large_inputs_are_activated_as_torch_does(inference, threads):
    # Several blocks (one per thread), each larger than torch's parallel grain: every element on
    # torch's vector path; the worker threads work in the caller's inference mode.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3001, 91, generator=g) * 3
    want = torch_sigmoid(logits)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(inference):
            every, scores = activated_rows(logits, "sigmoid", -1.0)
            rows, some = activated_rows(logits, "sigmoid", 0.9)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(every, torch.arange(len(logits))) and torch.equal(scores, want)
    assert torch.equal(some, want[rows])


def test_bad_arguments_say_what_to_do():
    logits, boxes, image_index, ctr = random_case(0)
    net, orig = sizes(2)
    args = (boxes, image_index, net, orig, 0.1, 0.5, 5)
    with pytest.raises(RuntimeError, match="activation must be"):
        postprocess_detections(logits, *args, activation="softmax")
    with pytest.raises(RuntimeError, match="needs centerness"):
        postprocess_detections(logits, *args, activation="sigmoid_centerness")
    with pytest.raises(RuntimeError, match="only used with activation"):
        postprocess_detections(logits, *args, activation="sigmoid", centerness=ctr)
    with pytest.raises(RuntimeError, match="centerness must have shape"):
        postprocess_detections(logits, *args, activation="sigmoid_centerness", centerness=ctr[:-1])
    with pytest.raises(RuntimeError, match="out of range"):
        postprocess_detections(
            logits, boxes, image_index + 5, net, orig, 0.1, 0.5, 5, activation="sigmoid"
        )


def test_opcheck():
    logits, boxes, image_index, ctr = random_case(0, n=40)
    net, orig = sizes(2)
    torch.library.opcheck(
        torch.ops.pyodlog.postprocess_detections.default,
        (logits, boxes, image_index, net, orig, 0.05, 0.5, 4),
        {"activation": "sigmoid"},
    )
    torch.library.opcheck(
        torch.ops.pyodlog.postprocess_detections.default,
        (logits, boxes, image_index, net, orig, 0.05, 0.5, 4),
        {"activation": "sigmoid_centerness", "centerness": ctr},
    )
    torch.library.opcheck(
        torch.ops.pyodlog.postprocess_detections_near_miss.default,
        (logits, boxes, image_index, net, orig, 0.05, 0.5, 4, 3, 0.01),
        {"activation": "sigmoid"},
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.pyodlog.activated_rows.default,
        (logits, "sigmoid", 0.05),
        test_utils=("test_schema", "test_autograd_registration"),
    )


# -- real heads: the operator on raw logits returns what torchvision returned ----------------------


@functools.cache
def dense_head(name):
    torch.manual_seed(0)
    if name == "retinanet":
        model = detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, **SMALL)
    else:
        model = detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, **SMALL)
    model.eval()
    imgs = images()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        t, _ = model.transform(imgs)
        features = list(model.backbone(t.tensors).values())
        head = model.head(features)
        head = {
            k: torch.randn(v.shape, generator=g) * (0.5 if k == "bbox_regression" else 1.0)
            + (-3.0 if k == "cls_logits" else 0.0)
            for k, v in head.items()
        }
        anchors = model.anchor_generator(t, features)
        hw = [x.size(2) * x.size(3) for x in features]
        per_location = head["cls_logits"].size(1) // sum(hw)
        per_level = [n * per_location for n in hw]
        split = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
        expected = model.postprocess_detections(
            split, [list(a.split(per_level)) for a in anchors], t.image_sizes
        )
        expected = model.transform.postprocess(
            expected, t.image_sizes, [tuple(i.shape[-2:]) for i in imgs]
        )
        n_images = head["cls_logits"].shape[0]
        level = torch.cat([torch.full((n,), lvl) for lvl, n in enumerate(per_level)])
        if name == "retinanet":
            decode = model.box_coder.decode_single
        else:
            decode = model.box_coder.decode
        boxes = torch.cat([decode(head["bbox_regression"][i], anchors[i]) for i in range(n_images)])
    return model, head, boxes, t, imgs, level, expected


@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_raw_logits_of_a_real_head_give_torchvisions_detections(name):
    model, head, boxes, t, imgs, level, expected = dense_head(name)
    n_images, _, n_classes = head["cls_logits"].shape
    net = torch.tensor(t.image_sizes)
    orig = torch.tensor([tuple(i.shape[-2:]) for i in imgs])
    n_levels = int(level.max()) + 1
    kw = dict(
        topk=model.topk_candidates,
        topk_group=(torch.arange(n_images)[:, None] * n_levels + level[None, :]).reshape(-1),
        activation="sigmoid" if name == "retinanet" else "sigmoid_centerness",
        centerness=None if name == "retinanet" else head["bbox_ctrness"].reshape(-1),
    )
    image_index = torch.arange(n_images).repeat_interleave(head["cls_logits"].shape[1])
    out = postprocess_detections_near_miss(
        head["cls_logits"].reshape(-1, n_classes),
        boxes,
        image_index,
        net,
        orig,
        model.score_thresh,
        model.nms_thresh,
        model.detections_per_img,
        32,
        model.score_thresh / 2,
        **kw,
    )
    det = out.detections
    total = 0
    for b, want in enumerate(expected):
        n = int(det.counts[b])
        total += n
        assert torch.equal(det.scores[b, :n], want["scores"])
        assert torch.equal(det.labels[b, :n], want["labels"])
        assert torch.equal(det.boxes[b, :n], want["boxes"])
    assert total > 20 and int(out.near_misses.counts.sum()) > 0


# -- the RetinaNet and FCOS loggers: raw logits to the operators, records unchanged ----------------


def _logged(logger_class, model, imgs):
    with logger_class(model, "m", "v1", sink=InMemorySink(), near_miss=16) as logger:
        with torch.inference_mode():
            out = logger(imgs)
        return out, last_record(logger)


@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_loggers_record_the_same_from_raw_logits(name):
    """The fused path (only the anchors that can pass are activated) records exactly what the
    old path (every anchor activated in PyTorch) records, in each of its three ways of feeding
    the near-miss operator: raw logits (few anchors live), the live anchors' scores with the
    others 0 (many live), all the scores (all live)."""
    # (class-logit weight scale, bias, score_thresh): few, many and all anchors live.
    if name == "retinanet":
        build, fused_class = detection.retinanet_resnet50_fpn, pyodlog.RetinaNetLogger
        settings = ((1e-3, -12.0, 0.2), (1e-3, -7.0, 0.2), (1e-3, -1.0, 0.2))
    else:
        build, fused_class = detection.fcos_resnet50_fpn, pyodlog.FCOSLogger
        settings = ((0.1, -5.5, 0.2), (0.1, -4.0, 0.2), (0.1, -3.0, 0.05))

    class OldPath(fused_class):
        activation = None

    ways = set()
    original = fused_class._match_fused

    def recording(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        _, scores, activation = result
        if activation != "none":
            ways.add("raw logits")
        else:
            ways.add("live scores, others 0" if (scores == 0).all(1).any() else "all scores")
        return result

    imgs = images(sizes=((200, 240), (180, 260)))
    for scale, bias, thresh in settings:
        torch.manual_seed(0)
        model = distinct_init(build(weights=None, weights_backbone=None, **SMALL)).eval()
        model.score_thresh = thresh
        with torch.no_grad():
            model.head.classification_head.cls_logits.weight *= scale
            model.head.classification_head.cls_logits.bias.fill_(bias)
        fused_class._match_fused = recording
        try:
            out_new, new = _logged(fused_class, model, imgs)
        finally:
            fused_class._match_fused = original
        out_old, old = _logged(OldPath, model, imgs)
        assert_outputs_equal(out_new, out_old)
        a_nm, b_nm = new.detections.near_misses, old.detections.near_misses
        for a, b in ((new.detections, old.detections), (a_nm, b_nm)):
            for field in ("boxes", "scores", "labels", "logits", "candidate_index", "counts"):
                x, y = getattr(a, field), getattr(b, field)
                assert torch.equal(x, y), field
        assert torch.equal(a_nm.reason, b_nm.reason)
        assert torch.equal(a_nm.suppressed_by, b_nm.suppressed_by)
    assert ways == {"raw logits", "live scores, others 0", "all scores"}, ways
