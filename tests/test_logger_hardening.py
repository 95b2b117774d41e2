"""The logger under careless, hostile and unlucky use (issue 10, the logger's side).

Real torchvision detectors (random weights, small inputs); records read from an
in-memory sink (the HDF5 store has tests of its own).
"""

from __future__ import annotations

import copy
import logging
import os
import re

import pytest
import torch
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops

import pyodlog
from pyodlog import InMemorySink
from tests.helpers.detector_candidates import faster_rcnn as rcnn_candidates
from tests.helpers.detector_candidates import fcos as fcos_candidates
from tests.helpers.detector_candidates import retinanet as retinanet_candidates
from tests.helpers.detector_candidates import ssd as ssd_candidates
from tests.helpers.outputs import assert_outputs_equal, last_record
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

SMALL = dict(weights=None, weights_backbone=None, min_size=128, max_size=160)

# name: (builder, the modules whose outputs are the class logits (patched by the tie tests),
#        the function that recomputes the model's candidates step by step).
# SSD300 is the same torchvision SSD class and logger code as SSDlite, only slower to run here.
FAMILIES = {
    "fasterrcnn_mobilenet_v3": (
        lambda: detection.fasterrcnn_mobilenet_v3_large_320_fpn(box_score_thresh=0.0, **SMALL),
        lambda m: [m.roi_heads.box_predictor.cls_score],
        rcnn_candidates,
    ),
    "maskrcnn_resnet50_fpn": (
        lambda: detection.maskrcnn_resnet50_fpn(
            box_score_thresh=0.0, box_detections_per_img=20, **SMALL
        ),
        lambda m: [m.roi_heads.box_predictor.cls_score],
        rcnn_candidates,
    ),
    "keypointrcnn_resnet50_fpn": (
        lambda: detection.keypointrcnn_resnet50_fpn(
            box_score_thresh=0.0, box_detections_per_img=20, **SMALL
        ),
        lambda m: [m.roi_heads.box_predictor.cls_score],
        rcnn_candidates,
    ),
    "retinanet_resnet50_fpn": (
        lambda: detection.retinanet_resnet50_fpn(**SMALL),
        lambda m: [m.head.classification_head.cls_logits],
        retinanet_candidates,
    ),
    "fcos_resnet50_fpn": (
        lambda: detection.fcos_resnet50_fpn(**SMALL),
        lambda m: [m.head.classification_head.cls_logits, m.head.regression_head.bbox_ctrness],
        fcos_candidates,
    ),
    "ssdlite320_mobilenet_v3_large": (
        lambda: detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None),
        lambda m: [seq[-1] for seq in m.head.classification_head.module_list],
        ssd_candidates,
    ),
}
_MODELS: dict[str, nn.Module] = {}


def model_of(name: str) -> nn.Module:
    """A fresh copy of the family's model (tests patch weights and thresholds)."""
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = FAMILIES[name][0]().eval()
    return copy.deepcopy(_MODELS[name])


def images(seed=0, sizes=((120, 140), (100, 160))):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def logged_and_bare(model, imgs, **kwargs):
    """(what the logged call returned, what the bare call returned, the record)."""
    with torch.no_grad():
        want = model(imgs)
        with pyodlog.create_logger(model, "m", "v1", sink=InMemorySink(), **kwargs) as logger:
            got = logger(imgs)
            record = last_record(logger)
    return got, want, record


def assert_log_is_the_output(record, returned):
    per_image = record.detections.unbind()
    assert len(per_image) == len(returned)
    for d, w in zip(per_image, returned):
        assert torch.equal(d.boxes, w["boxes"]), "boxes"
        assert torch.equal(d.scores, w["scores"]), "scores"
        assert torch.equal(d.labels, w["labels"]), "labels"
    return per_image


# -- 1: strings the store can keep, and those it cannot ----------------------------------------


def test_undecodable_file_names_are_accepted_and_lone_surrogates_refused_before_the_model_runs():
    torch.manual_seed(0)
    model = TinyDetector().eval()
    runs = []
    model.register_forward_pre_hook(lambda m, args: runs.append(1))
    fields = [{"name": "camera", "dtype": "str"}]
    imgs = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    raw = os.fsdecode(b"cam\xff.jpg")  # what os.listdir gives for a non-UTF-8 name
    assert raw.encode("utf-8", "surrogateescape") == b"cam\xff.jpg"
    with TinyDetectorLogger(
        model, "m", "v1", additional_fields=fields, sink=InMemorySink()
    ) as logger:
        with torch.no_grad():
            out = logger(
                imgs, input_ids=[raw, "b"], dataset_type=os.fsdecode(b"set\xfe"), camera=raw
            )
        assert len(out) == 2 and len(runs) == 1
        record = last_record(logger)
        assert record.input_ids == [raw, "b"] and record.fields["camera"] == [raw, raw]
        assert record.dataset_type.encode("utf-8", "surrogateescape") == b"set\xfe"
        for call, argument in [
            (dict(input_ids=["a", "x\ud800y"]), r"input_ids\[1\]="),
            (dict(dataset_type="val\udfff"), "dataset_type="),
            (dict(camera=["ok", "\ud83d"]), r"additional field 'camera': camera\[1\]="),
        ]:
            call.setdefault("camera", "c")
            with pytest.raises(ValueError, match=argument + ".*lone surrogate"):
                logger(imgs, **call)
        assert len(runs) == 1  # refused before the model ran
        assert len(logger.sink.records("m", "v1", logger.result_name)) == 1
    with pytest.raises(
        ValueError, match=r"additional field 'camera': its default=.*lone surrogate"
    ):
        TinyDetectorLogger(
            model,
            "m",
            "v1",
            additional_fields=[{"name": "camera", "dtype": "str", "default": "\udc00"}],
            sink=InMemorySink(),
        )


# -- 3: inputs the bare model handles ----------------------------------------------------------

NAN = float("nan")
INF = float("inf")
INPUTS = {
    "all-nan batch": lambda: [torch.full((3, 90, 120), NAN), torch.full((3, 100, 80), NAN)],
    "inf image": lambda: [torch.full((3, 90, 120), INF)],
    "empty proposals beside a normal image": lambda: [
        torch.full((3, 90, 120), NAN),
        images(sizes=((100, 130),))[0],
    ],
    "one tiny image": lambda: [torch.rand(3, 1, 1)],
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_inputs_the_bare_model_handles_are_logged_and_returned_unchanged(name):
    model = model_of(name)
    for case, make in INPUTS.items():
        torch.manual_seed(1)
        imgs = make()
        got, want, record = logged_and_bare(model, imgs)
        assert_outputs_equal(got, want)
        per_image = assert_log_is_the_output(record, want)
        assert record.input_ids and len(per_image) == len(imgs), case
        for d in per_image:
            assert (d.candidate_index >= 0).all(), case
        if "nan" in case or "inf" in case:
            assert len(per_image[0]) == 0, case


# -- 4: the log is the output, tied scores included -----------------------------------------------


def _constant_class_head(model, name):
    for module in FAMILIES[name][1](model):
        with torch.no_grad():
            module.weight.zero_()
            module.bias.fill_(2.0 if name.startswith(("retina", "fcos")) else 0.0)


def _binarised_class_logits(model, name):
    # Saturated logits: every class score takes one of a few values.
    for module in FAMILIES[name][1](model):
        module.register_forward_hook(lambda m, i, out: torch.where(out > out.mean(), 3.0, -3.0))


def _candidate_boxes_as_returned(cand, image, rows):
    """The model's candidate boxes of one image, clipped and resized by torchvision's own functions."""
    net = tuple(int(v) for v in cand.net_sizes[image])
    orig = tuple(int(v) for v in cand.orig_sizes[image])
    boxes = box_ops.clip_boxes_to_image(cand.boxes[rows], net)
    return resize_boxes(boxes.reshape(-1, 4), net, orig).reshape(boxes.shape)


@pytest.mark.parametrize("ties", ["constant class head", "binarised class logits"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_logged_detections_are_the_returned_ones_under_tied_scores(name, ties):
    model = model_of(name)
    (_constant_class_head if ties.startswith("constant") else _binarised_class_logits)(model, name)
    imgs = images()
    got, want, record = logged_and_bare(model, imgs)
    assert_outputs_equal(got, want)
    per_image = assert_log_is_the_output(record, want)
    assert sum(len(d) for d in per_image) >= 20
    scores = torch.cat([w["scores"] for w in want])
    assert len(scores.unique()) < len(scores) // 2  # the scores do tie
    # Each detection's candidate is one that reproduces it, bit for bit: the model's own
    # candidates (recomputed step by step), boxes clipped and resized by torchvision.
    cand = FAMILIES[name][2](model, imgs)
    per_class = cand.boxes.dim() == 3
    first = 0
    for b, d in enumerate(per_image):
        rows = torch.nonzero(cand.image_index == b).squeeze(1)
        assert (d.candidate_index >= 0).all()
        boxes = _candidate_boxes_as_returned(cand, b, rows)[d.candidate_index]
        if per_class:
            boxes = boxes[torch.arange(len(d)), d.labels]
        assert torch.equal(boxes, d.boxes)
        row_scores = cand.scores[rows][d.candidate_index]
        assert torch.equal(row_scores.gather(1, d.labels[:, None]).squeeze(1), d.scores)
        first += len(rows)


# -- 11: the subclass contract ------------------------------------------------------------------


class ReturnsDicts(TinyDetectorLogger):
    def _parse_model_output(self, model_output, img_sizes):
        return model_output  # not what the contract asks


def test_a_parse_result_of_another_type_is_reported_naming_the_method_and_the_output_returned(
    caplog,
):
    torch.manual_seed(0)
    model = TinyDetector().eval()
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        want = model(images)
    with ReturnsDicts(model, "m", "v1", sink=InMemorySink()) as logger:
        with torch.no_grad(), caplog.at_level(logging.ERROR, logger="pyodlog"):
            got = logger(images)
            again = logger(images)
        # The call answers as the bare model does; the broken contract is counted and reported.
        for out in (got, again):
            assert_outputs_equal(out, want)
        stats = logger.stats()
        assert stats["logging_errors"] == 2
        assert re.search(
            r"ReturnsDicts\._parse_model_output must return a list", stats["last_logging_error"]
        )
        assert logger.sink.records("m", "v1", logger.result_name) == []
    assert "ReturnsDicts._parse_model_output must return a list" in caplog.text


# -- 12: what a logger changes on the model does not outlive it ---------------------------------


def test_close_restores_the_thresholds_and_a_bare_call_returns_what_it_did_before():
    model = model_of("ssdlite320_mobilenet_v3_large")
    imgs = images()
    before = (model.score_thresh, model.nms_thresh, model.detections_per_img)
    with torch.no_grad():
        want = model(imgs)
        assert max(len(w["boxes"]) for w in want) > 3
        with pyodlog.create_logger(
            model, "m", "v1", sink=InMemorySink(), max_detections_per_image=3, iou_thresh=0.2
        ) as logger:
            assert max(len(o["boxes"]) for o in logger(imgs)) == 3
        assert (model.score_thresh, model.nms_thresh, model.detections_per_img) == before
        assert_outputs_equal(model(imgs), want)


def test_rcnn_thresholds_on_the_roi_heads_are_restored():
    model = model_of("fasterrcnn_mobilenet_v3")
    heads = model.roi_heads
    before = (heads.score_thresh, heads.nms_thresh, heads.detections_per_img)
    logger = pyodlog.create_logger(model, "m", "v1", sink=InMemorySink(), score_thresh=0.3)
    assert heads.score_thresh == 0.3
    logger.close()
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == before


def test_a_second_live_logger_may_not_change_the_thresholds_of_the_first():
    model = model_of("fcos_resnet50_fpn")
    original = model.score_thresh
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    first = pyodlog.create_logger(model, "m", "v1", sink=InMemorySink(), score_thresh=0.3)
    with_first = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(
        ValueError,
        match=r"score_thresh=0\.2 would change FCOS\.score_thresh.*"
        r"another live logger.*m/v1.*close that logger first",
    ):
        pyodlog.create_logger(model, "m", "v2", sink=InMemorySink(), score_thresh=0.2)
    # The refused logger left nothing: no hook, no threshold.
    assert model.score_thresh == 0.3
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == (
        with_first
    )
    # The same values, or None (the model's), are fine; the last logger to close restores them.
    second = pyodlog.create_logger(model, "m", "v2", sink=InMemorySink(), score_thresh=0.3)
    third = pyodlog.create_logger(model, "m", "v3", sink=InMemorySink())
    first.close()
    assert model.score_thresh == 0.3  # the others still use the model
    second.close()
    third.close()
    assert model.score_thresh == original
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    # Once all are closed, a new logger may set other thresholds.
    with pyodlog.create_logger(model, "m", "v4", sink=InMemorySink(), score_thresh=0.2):
        assert model.score_thresh == 0.2
    assert model.score_thresh == original


def test_a_threshold_changed_by_hand_while_logging_is_kept_at_close():
    model = model_of("fcos_resnet50_fpn")
    with pyodlog.create_logger(model, "m", "v1", sink=InMemorySink(), score_thresh=0.3):
        model.score_thresh = 0.25
    assert model.score_thresh == 0.25


# -- 13: the smaller ones -------------------------------------------------------------------


@pytest.mark.parametrize("not_a_model", ["model", "fasterrcnn_resnet50_fpn", None, {"a": 1}])
def test_create_logger_with_something_else_than_a_module_is_a_type_error(not_a_model):
    with pytest.raises(TypeError, match=r"(?s)expects a torch\.nn\.Module detector.*Faster R-CNN"):
        pyodlog.create_logger(not_a_model, "m", "v1", sink=InMemorySink())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(model_name=".hidden"),
        dict(version_name=".v1"),
        dict(result_name=".run"),
        dict(target_layers={".fpn": "backbone.fpn"}),
    ],
)
def test_names_starting_with_a_dot_are_refused(kwargs, isolated_data_root):
    args = dict(model_name="m", version_name="v1")
    args.update(kwargs)
    with pytest.raises(ValueError, match="no '.' first: that would be a hidden folder"):
        pyodlog.create_logger(model_of("fcos_resnet50_fpn"), **args)
    assert not isolated_data_root.exists() or not any(
        p.name.startswith(".") for p in isolated_data_root.rglob("*")
    )


# -- the matching itself, on every device --------------------------------------------------------


def _synthetic_candidates(per_class: bool):
    """Two images of 25 candidates, 4 classes, scores on a coarse grid (many ties); rows 10 and
    11 identical in every way (indistinguishable: the lower is reported)."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(1, 4, (50, 4), generator=g).float() / 4
    boxes = torch.rand(50, 4, 4, generator=g) * 100 if per_class else torch.rand(50, 4, generator=g)
    boxes[11], scores[11] = boxes[10], scores[10]
    picks = [[(3, 1), (11, 2), (7, 0), (3, 2), (20, 3)], [(30, 1), (49, 0)]]
    output = []
    for pairs in picks:
        rows = torch.tensor([r for r, _ in pairs])
        cls = torch.tensor([c for _, c in pairs])
        output.append(
            {
                "boxes": boxes[rows, cls] if per_class else boxes[rows],
                "scores": scores[rows, cls],
                "labels": cls,
            }
        )
    output[1]["boxes"][1, 0] += 1e-3  # a detection no candidate reproduces
    return scores, boxes, output, [[3, 10, 7, 3, 20], [30, -1]]


@pytest.mark.parametrize("per_class", [False, True], ids=["class-agnostic", "per-class boxes"])
def test_match_detections_finds_the_candidate_by_box_score_and_label(device, per_class):
    from pyodlog.models.common import match_detections, returned_detections

    scores, boxes, output, expected = _synthetic_candidates(per_class)
    scores, boxes = scores.to(device), boxes.to(device)
    output = [{k: v.to(device) for k, v in o.items()} for o in output]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # the inference path never waits for the device
    try:
        returned = returned_detections(output, 2, "test")
        found = match_detections(returned, scores, boxes, [25, 25])
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert returned.lengths == [5, 2] and returned.labels[1, 2:].eq(-1).all()
    assert found.cpu().tolist() == [expected[0], expected[1] + [-1] * 3]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU present")
@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3", "retinanet_resnet50_fpn"])
def test_on_cuda_the_log_is_the_output_under_ties(name):
    model = model_of(name).cuda()
    _constant_class_head(model, name)
    imgs = [img.cuda() for img in images()]
    got, want, record = logged_and_bare(model, imgs)
    assert_outputs_equal(got, want)
    per_image = assert_log_is_the_output(record, want)
    assert sum(len(d) for d in per_image) >= 20
    assert all((d.candidate_index >= 0).all() for d in per_image)


def test_a_failing_hook_never_reaches_the_model_and_the_call_returns_its_output(monkeypatch):
    import pyodlog.monitoring.tracer as tracer

    def broken(*args, **kwargs):
        raise RuntimeError("compression failed in a hook")

    torch.manual_seed(0)
    model = TinyDetector().eval()
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        want = model(images)
    with TinyDetectorLogger(
        model,
        "m",
        "v1",
        sink=InMemorySink(),
        target_layers={"b": {"path": "backbone.0", "compression": "uint8"}},
    ) as logger:
        monkeypatch.setattr(tracer, "compress_features", broken)
        with torch.no_grad():
            got = logger(images, input_ids=["x"])
        assert_outputs_equal(got, want)
        stats = logger.stats()
        assert stats["logging_errors"] == 1
        assert "compression failed in a hook" in stats["last_logging_error"]
        assert logger.sink.records("m", "v1", logger.result_name) == []
        monkeypatch.undo()  # the next call is logged again
        with torch.no_grad():
            logger(images, input_ids=["y"])
        records = logger.sink.records("m", "v1", logger.result_name)
        assert [r.input_ids for r in records] == [["y"]]
