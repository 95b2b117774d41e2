"""ResultData.replay and .sweep against the model itself re-run with other thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models import detection

import pyodlog
from pyodlog.io.replay import envelope
from tests.helpers.golden import expected, unpack_golden
from tests.helpers.outputs import distinct_init

SMALL = dict(min_size=256, max_size=416)


# Random weights, configured so that the models detect something with distinct scores (exact
# comparisons need one right answer); the logger keeps the models' thresholds. He-normal weights
# (distinct_init) where torchvision's initialisation ties many scores exactly (for Faster R-CNN
# with small box deltas and class logits, which He-normal weights otherwise blow up); torchvision's
# own for RetinaNet (scores near its class prior, distinct).
def _faster_rcnn():
    model = distinct_init(
        detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
    )
    with torch.no_grad():
        model.rpn.head.bbox_pred.weight.mul_(0.01)
        model.roi_heads.box_predictor.bbox_pred.weight.mul_(0.01)
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.02)
    return model


FAMILIES = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": _faster_rcnn,
    "retinanet_resnet50_fpn": lambda: detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, score_thresh=0.0102, **SMALL
    ),
    "fcos_resnet50_fpn": lambda: detection.fcos_resnet50_fpn(
        weights=None, weights_backbone=None, **SMALL
    ),
    "ssdlite320_mobilenet_v3_large": lambda: detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None
    ),
}


def thresholds_of(model):
    return model.roi_heads if hasattr(model, "roi_heads") else model


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 200, 240, generator=g), torch.rand(3, 180, 260, generator=g)]


def rerun(model, imgs, score, iou, cap):
    heads = thresholds_of(model)
    saved = (heads.score_thresh, heads.nms_thresh, heads.detections_per_img)
    heads.score_thresh, heads.nms_thresh, heads.detections_per_img = score, iou, cap
    try:
        with torch.no_grad():
            return model(imgs)
    finally:
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img = saved


def logged(family, tmp_path, near_miss):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    if family.startswith(("fcos", "ssd")):
        model = distinct_init(model)
    imgs = images()
    logger = pyodlog.create_logger(model, "m", family, auto_sync=False, near_miss=near_miss)
    logger(imgs)
    data = pyodlog.open_result(logger.export(tmp_path))
    logger.close()
    return model, imgs, data


def _within_ties(scores: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor):
    """Rows in a canonical order inside each run of equal scores: the model's own order among
    exactly tied scores is not defined (torchvision's topk and sort may give either, run to run,
    with the threads they use), so only that order is left out of the comparison."""
    key = torch.cat([scores[:, None].double(), labels[:, None].double(), boxes.double()], 1)
    order = sorted(range(len(scores)), key=lambda r: (-key[r, 0].item(), *key[r, 1:].tolist()))
    index = torch.tensor(order, dtype=torch.long)
    return labels[index], boxes[index]


def assert_same(replayed, output):
    assert len(replayed) == len(output)
    for i, want in enumerate(output):
        got = replayed[i]
        assert torch.equal(got.scores, want["scores"]), f"image {i}: scores"
        if torch.equal(got.labels, want["labels"]) and torch.equal(got.boxes, want["boxes"]):
            continue
        # Same scores in the same order: what may differ is the order inside ties only.
        assert len(torch.unique(got.scores)) < len(got.scores), f"image {i}: labels/boxes"
        got_l, got_b = _within_ties(got.scores, got.labels, got.boxes)
        want_l, want_b = _within_ties(want["scores"], want["labels"], want["boxes"])
        assert torch.equal(got_l, want_l), f"image {i}: labels"
        assert torch.equal(got_b, want_b), f"image {i}: boxes"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_replay_equals_the_model_rerun_inside_the_envelope(family, tmp_path):
    model, imgs, data = logged(family, tmp_path, near_miss=4000)
    heads = thresholds_of(model)
    default = (heads.score_thresh, heads.nms_thresh, heads.detections_per_img)
    env = envelope(data)
    low = float(env.floor.max())
    assert np.isfinite(low) and low < 0.9
    assert len(data.near_misses["scores"]) > 0
    # The logged thresholds replay to the logged detections, and so to the model's own output.
    assert_same(data.replay(), rerun(model, imgs, *default))
    top = float(np.quantile(data.near_misses["scores"], 0.99))
    grid = [
        (max(low, default[0]), 0.5, default[2]),
        (low + (top - low) * 0.1, default[1], default[2]),
        (low + (top - low) * 0.3, 0.3, default[2]),
        (low + (top - low) * 0.5, 0.7, default[2]),
        (low + (top - low) * 0.05, 0.6, 7),
        (low, 0.45, default[2] * 2),
    ]
    if low < default[0]:
        grid.append(((low + default[0]) / 2, default[1], default[2]))  # below the logged threshold
    n_from_near_misses = 0
    for score, iou, cap in grid:
        replayed = data.replay(score, iou, cap)
        assert replayed.exact.all()
        assert_same(replayed, rerun(model, imgs, score, iou, cap))
        n_from_near_misses += int((replayed.source == 1).sum())
    assert n_from_near_misses > 0  # the near-misses made a difference


def test_outside_the_envelope_raises_or_flags(tmp_path):
    _model, _imgs, data = logged("fasterrcnn_mobilenet_v3_large_320_fpn", tmp_path, near_miss=5)
    env = envelope(data)
    assert env.exhausted.all() and (env.floor > 0.05).all()  # 5 near-misses: all above 0.05
    below = 0.03  # above the near-miss floor (0.025), below the exhausted images' floors
    with pytest.raises(ValueError, match="outside the logged envelope") as error:
        data.replay(score_thresh=below)
    assert "near_miss" in str(error.value) and "strict=False" in str(error.value)
    best = data.replay(score_thresh=below, strict=False)
    assert not best.exact.all()
    # Above the floor everything is exact again.
    inside = data.replay(score_thresh=float(env.floor.max()) + 1e-3, iou_thresh=0.4)
    assert inside.exact.all()


def test_without_near_misses_only_subsets_of_the_detections_replay(tmp_path):
    model, imgs, data = logged("fasterrcnn_mobilenet_v3_large_320_fpn", tmp_path, near_miss=0)
    assert "nm_offset" not in data.images
    with pytest.raises(ValueError, match="logged without their thresholds"):
        data.replay(score_thresh=0.5)
    # The logged detections themselves.
    assert_same(data.replay(), rerun(model, imgs, 0.05, 0.5, 100))


def test_sweep_counts_what_replay_returns(tmp_path):
    _model, _imgs, data = logged("fasterrcnn_mobilenet_v3_large_320_fpn", tmp_path, near_miss=4000)
    low = float(envelope(data).floor.max())
    scores = [low, low * 1.5, 0.05, 0.1, 0.3]
    ious = [0.3, 0.5, 0.7]
    table = data.sweep(score_thresh=scores, iou_thresh=ious)
    assert set(table.columns) >= {"score_thresh", "iou_thresh", "label", "detections", "images"}
    assert len(table) == len(scores) * len(ious) * int(table["label"].max() + 1)
    for s in scores:
        for v in ious:
            rep = data.replay(s, v)
            got = table[(table.score_thresh == s) & (table.iou_thresh == v)]
            counts = np.bincount(rep.detections["labels"], minlength=len(got))
            assert got["detections"].tolist() == counts[: len(got)].tolist()
            assert int(got["detections"].sum()) == int(rep.counts.sum())


def test_a_bfloat16_head_replays_its_thresholds_rounded_to_bfloat16(tmp_path):
    """Under bfloat16 autocast RetinaNet compares bfloat16 scores with the threshold rounded to
    bfloat16 (segment format 5 records the dtype per image): a threshold just below a logged
    score rounds up to it, so that score is not above it, as in the model."""
    torch.manual_seed(0)
    model = FAMILIES["retinanet_resnet50_fpn"]().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logger = pyodlog.create_logger(model, "m", "bf16", auto_sync=False, near_miss=4000)
        with torch.no_grad():
            out = logger(images())
        data = pyodlog.open_result(logger.export(tmp_path))
        logger.close()
    assert out[0]["scores"].dtype == torch.bfloat16
    assert data.images["nm_score_dtype"].tolist() == [2, 2]
    scores = np.asarray(data.detections["scores"])
    s = float(np.median(scores))  # a bfloat16 value, logged exactly in float32
    just_below = float(np.nextafter(np.float32(s), np.float32(0)))
    assert float(torch.tensor(just_below).to(torch.bfloat16)) == s  # (what the model compares with)
    at, below = data.replay(score_thresh=s), data.replay(score_thresh=just_below)
    assert below.exact.all()
    for i in range(len(data)):
        assert torch.equal(at[i].scores, below[i].scores)
        assert not bool((below[i].scores == s).any())
    # What a float32 comparison keeps (the dtype not recorded, as in a segment of format 4).
    data.images["nm_score_dtype"][:] = 0
    as_float32 = data.replay(score_thresh=just_below)
    assert sum(int((as_float32[i].scores == s).sum()) for i in range(len(data))) > 0


def test_the_golden_segment_of_format_4_still_reads_and_replays(tmp_path):
    """A segment of format 4 (near-misses, no nm_score_dtype: compared in float32) reads and
    replays as it did when it was written (tests/golden/make_segment_format4.py)."""
    want = expected("segment-format4.json")
    folder = tmp_path / "golden4"
    unpack_golden("segment-format4.h5.gz", folder, want["segment"], checksum=True)
    res = pyodlog.open_result(folder, strict=True)
    assert res.images["input_id"] == want["input_id"]
    assert res.images["det_count"].tolist() == want["det_count"]
    assert res.images["nm_count"].tolist() == want["nm_count"]
    assert "nm_score_dtype" not in res.images  # format 5 added it: replay compares in float32
    np.testing.assert_array_equal(res.detections["scores"], np.asarray(want["scores"], np.float32))
    np.testing.assert_array_equal(
        res.near_misses["scores"], np.asarray(want["nm_scores"], np.float32)
    )
    assert res.near_misses["reason"].tolist() == want["nm_reason"]
    replayed = res.replay(score_thresh=want["replay_score_thresh"])
    assert [replayed[i].scores.tolist() for i in range(len(replayed))] == want["replay_scores"]
