"""Ultralytics YOLO (the YOLO wrapper and its DetectionModel): output unchanged, log equal to it.

Models are built from yolov8n.yaml with random weights (no download), scaled so
that they give detections (see build_yolo); inputs are 320 px.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import roi_align
from ultralytics import YOLO  # the [yolo] extra is pinned and installed by make test
from ultralytics.utils.nms import non_max_suppression
from ultralytics.utils.ops import scale_boxes

import pyodlog
from pyodlog import InMemorySink, open_result
from pyodlog.models import UltralyticsYOLOLogger

IMGSZ = 320


def build_yolo(seed: int = 0, class_bias: float = -7.0, cfg: str = "yolov8n.yaml") -> YOLO:
    """YOLOv8n (or ``cfg``) with He-normal weights whose class logits have std 2 and bias ``class_bias``.

    Ultralytics' own initialisation shrinks the activations layer after layer
    (class logits of std 1e-7, every score 0.5) and its class prior leaves no
    detection; this gives distinct scores and about a hundred detections at
    conf 0.3 on a noise image. The DFL convolution keeps its fixed weights.
    """
    torch.manual_seed(seed)
    yolo = YOLO(cfg)
    head = yolo.model.model[-1]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in yolo.model.named_modules():
            if isinstance(m, nn.Conv2d) and "dfl" not in name:
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        for branch in head.cv3:
            branch[-1].bias.zero_()
        raw = yolo.model.eval()(torch.rand(1, 3, IMGSZ, IMGSZ, generator=g))[1]
        logits = raw.get("one2many", raw)["scores"]
        for branch in head.cv3:
            branch[-1].weight.mul_(2 / logits.std())
            branch[-1].bias.fill_(class_bias)
    return yolo


@pytest.fixture(scope="module")
def yolo():
    return build_yolo()


def np_images(seed=0, sizes=((240, 320), (300, 200), (180, 330))):
    rng = np.random.default_rng(seed)
    return [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in sizes]


def create_logger(*args, **kwargs):
    kwargs.setdefault("sink", InMemorySink())
    return pyodlog.create_logger(*args, **kwargs)


def last_record(logger):
    return logger.sink.records(logger.model_name, logger.version_name, logger.result_name)[-1]


def assert_same_results(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert type(g) is type(w) and g.orig_shape == w.orig_shape
        assert torch.equal(g.boxes.data, w.boxes.data)


def assert_logged_equal_results(detections, results):
    for d, r in zip(detections, results):
        assert d.image_size == tuple(r.orig_shape)
        assert torch.equal(d.boxes, r.boxes.xyxy)
        assert torch.equal(d.scores, r.boxes.conf)
        assert torch.equal(d.labels, r.boxes.cls.long())


@pytest.mark.parametrize("agnostic", [False, True], ids=["class-aware", "agnostic"])
def test_yolo_output_unchanged_and_logged_detections_equal_it(yolo, agnostic):
    imgs = np_images()
    kwargs = dict(imgsz=IMGSZ, conf=0.3, iou=0.5, agnostic_nms=agnostic, verbose=False)
    want = yolo.predict(imgs, batch=2, **kwargs)
    with create_logger(yolo, "m", "v1") as logger:
        assert type(logger) is UltralyticsYOLOLogger and logger.n_class == 80
        # batch=2 over 3 images: the predictor runs the model twice in one call.
        got = logger(imgs, input_ids=["a", "b", "c"], batch=2, **kwargs)
        assert_same_results(got, want)
        record = last_record(logger)
        assert record.input_ids == ["a", "b", "c"]
        dets = record.detections.unbind()
        assert 20 < sum(len(d) for d in dets) < 3 * 300  # NMS did work, max_det did not cut
        assert_logged_equal_results(dets, want)
        # Each logged logit vector is the pre-sigmoid row of the anchor that won.
        for d in dets:
            assert d.logits.shape == (len(d), 80) and d.candidate_index.max() < 2100
            torch.testing.assert_close(
                d.logits.sigmoid().gather(1, d.labels[:, None]).squeeze(1),
                d.scores,
                rtol=1e-6,
                atol=0,
            )
            assert torch.equal(d.logits.argmax(1), d.labels)
            assert d.embeddings.shape == (len(d), 64 + 128 + 256)
            assert d.embeddings.abs().sum(1).gt(0).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU present")
def test_yolo_on_cuda_logs_what_it_returns():
    """On a GPU the predictor warms the model up first (a forward the log must skip), and
    the fused operator and Ultralytics' box arithmetic run on the device."""
    yolo = build_yolo(5)
    imgs = np_images(5)
    kwargs = dict(imgsz=IMGSZ, conf=0.3, iou=0.5, device=0, batch=2, verbose=False)
    with create_logger(yolo, "m", "v1", target_layers={"neck": "model.15"}) as logger:
        got = logger(imgs, **kwargs)
        want = yolo.predict(imgs, **kwargs)
        assert_same_results(got, want)
        dets = [d.to("cpu") for d in last_record(logger).detections.unbind()]
        assert sum(len(d) for d in dets) > 20
        assert_logged_equal_results(dets, [r.cpu() for r in want])
        # One neck capture per image: the warm-up run is left out, the two batches joined.
        assert last_record(logger).features["neck"].original_shape == (3, 64, 40, 40)


@pytest.mark.parametrize("cfg", ["yolo11n.yaml", "yolo26n.yaml"])
def test_yolo11_and_yolo26_nms_head_are_logged_too(cfg):
    yolo = build_yolo(6, cfg=cfg)
    imgs = np_images(6)
    kwargs = dict(imgsz=IMGSZ, conf=0.3, iou=0.5, verbose=False)
    want = yolo.predict(imgs, batch=3, **kwargs)
    with create_logger(yolo, "m", "v1") as logger:
        got = logger(imgs, batch=3, **kwargs)
        assert_same_results(got, want)
        dets = last_record(logger).detections.unbind()
        assert sum(len(d) for d in dets) > 20
        assert_logged_equal_results(dets, want)
        if cfg.startswith("yolo26"):  # its NMS-free head is refused before the model runs
            with pytest.raises(ValueError, match="end-to-end"):
                logger(imgs, nms=False, **kwargs)


def test_embeddings_are_roi_align_of_the_box_on_every_neck_level(yolo):
    """YOLO's CPU predictor runs channels-last, where the logger samples the maps itself:
    the result is torchvision's roi_align (1x1, 2x2 samples, aligned) on each level."""
    levels = {
        f"p{i}": {"path": f"model.{j}", "compression": "none"} for i, j in enumerate((15, 18, 21))
    }
    assert yolo.model.model[-1].f == [15, 18, 21]  # the Detect head's inputs
    imgs = np_images(8, sizes=((320, 320),) * 2)  # no letterbox: boxes in network coordinates
    with create_logger(yolo, "m", "v1", target_layers=levels) as logger:
        logger(imgs, imgsz=IMGSZ, conf=0.3, batch=2, verbose=False)
        maps = [logger.get_hooked_features(alias) for alias in levels]
        assert maps[0].is_contiguous(memory_format=torch.channels_last)
        dets = last_record(logger).detections.unbind()
    for i, d in enumerate(dets):
        assert len(d) > 10
        rois = torch.cat((torch.zeros(len(d), 1), d.boxes), dim=1)
        want = torch.cat(
            [
                roi_align(m[i : i + 1].contiguous(), rois, 1, m.shape[-1] / IMGSZ, 2, True).flatten(
                    1
                )
                for m in maps
            ],
            dim=1,
        )
        torch.testing.assert_close(d.embeddings, want, rtol=1e-5, atol=1e-5)


def test_yolo_thresholds_map_to_conf_iou_max_det_and_classes_filter(yolo):
    imgs = np_images(1, sizes=((256, 256),))
    seen = yolo.predict(imgs, imgsz=IMGSZ, conf=0.05, verbose=False)[0].boxes.cls.long()
    classes = seen.unique()[:2].tolist()  # two classes this image has detections of
    want = yolo.predict(
        imgs, imgsz=IMGSZ, conf=0.05, iou=0.6, max_det=7, classes=classes, verbose=False
    )
    with create_logger(
        yolo, "m", "v1", score_thresh=0.05, iou_thresh=0.6, max_detections_per_image=7
    ) as logger:
        got = logger(imgs[0], imgsz=IMGSZ, classes=classes, verbose=False)
        assert_same_results(got, want)
        (d,) = last_record(logger).detections.unbind()
        assert 0 < len(d) <= 7 and set(d.labels.tolist()) <= set(classes)
        assert_logged_equal_results([d], want)
        # A per-call value wins over the logger's, for the output and the log alike.
        got = logger(imgs[0], imgsz=IMGSZ, max_det=3, verbose=False)
        (d,) = last_record(logger).detections.unbind()
        assert len(d) == len(got[0]) == 3
        assert_logged_equal_results([d], got)


def synthetic_head(seed, n_images=2, n_anchors=600, n_class=5):
    """Head outputs with many exact ties: scores on a 1/16 grid, boxes on a coarse grid."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, 12, (n_images, 2, n_anchors), generator=g).float() * 16 + 8
    wh = torch.randint(2, 6, (n_images, 2, n_anchors), generator=g).float() * 16
    scores = torch.randint(0, 17, (n_images, n_class, n_anchors), generator=g).float() / 16
    scores = scores.clamp(1e-3, 1 - 1e-3)
    decoded = torch.cat((xy, wh, scores), dim=1)
    return decoded, torch.logit(scores)


@pytest.mark.parametrize("agnostic", [False, True], ids=["class-aware", "agnostic"])
@pytest.mark.parametrize("classes", [None, [1, 3]])
def test_fused_nms_keeps_exactly_what_ultralytics_non_max_suppression_keeps(
    yolo, agnostic, classes
):
    """Ties of scores and of IoU included: same rows, same order, same anchors."""
    with create_logger(yolo.model, "m", "v1") as logger:
        for seed in range(4):
            decoded, logits = synthetic_head(seed)
            feats = [
                torch.randn(2, c, 200 // s, 200 // s) for c, s in ((64, 8), (128, 16), (256, 32))
            ]
            for conf, iou, max_det in ((0.25, 0.5, 300), (0.0, 0.45, 20), (0.5, 0.0, 300)):
                want, keep = non_max_suppression(
                    decoded.clone(), conf, iou, classes, agnostic, max_det=max_det, return_idxs=True
                )
                boxes, scores, labels, anchor_logits, anchors, counts, _ = logger._detections(
                    ((192, 192), decoded, logits, feats),
                    [(192, 192)] * 2,
                    (conf, iou, max_det, classes, agnostic),
                )
                for b in range(2):
                    n = int(counts[b])
                    assert n == len(want[b]) > 0
                    assert torch.equal(anchors[b, :n], keep[b])
                    assert torch.equal(scores[b, :n], want[b][:, 4])
                    assert torch.equal(labels[b, :n], want[b][:, 5].long())
                    assert torch.equal(boxes[b, :n], want[b][:, :4].clamp(0, 192))
                    assert torch.equal(anchor_logits[b, :n], logits[b][:, keep[b]].T)


def test_detection_model_output_unchanged_and_log_equals_ultralytics_postprocessing(yolo):
    model = yolo.model.eval()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 256, IMGSZ, generator=g)
    orig = [(480, 640), (500, 600)]
    with torch.inference_mode():
        want = model(x)
    with create_logger(model, "m", "v1", score_thresh=0.3, iou_thresh=0.5) as logger:
        with torch.inference_mode():
            got = logger(x, img_sizes=orig)
        assert torch.equal(got[0], want[0])
        for key in ("boxes", "scores"):
            assert torch.equal(got[1][key], want[1][key])
        dets = last_record(logger).detections.unbind()
        nms = non_max_suppression(want[0].clone(), 0.3, 0.5, max_det=300)
        assert sum(len(d) for d in dets) > 20
        for d, p, size in zip(dets, nms, orig):
            assert torch.equal(d.boxes, scale_boxes(x.shape[2:], p[:, :4].clone(), size))
            assert torch.equal(d.scores, p[:, 4]) and torch.equal(d.labels, p[:, 5].long())
        # Per-call NMS arguments shape the log of a raw model (its output has no NMS).
        with torch.inference_mode():
            logger(x, agnostic_nms=True, max_det=5)
        dets = last_record(logger).detections.unbind()
        nms = non_max_suppression(want[0].clone(), 0.3, 0.5, agnostic=True, max_det=5)
        for d, p in zip(dets, nms):
            assert torch.equal(d.scores, p[:, 4]) and len(d) == 5
        n_records = len(logger.sink.records("m", "v1", logger.result_name))
        for kwargs, message in (
            ({"conf": 1.5}, "conf must be a number in"),
            ({"max_det": 0}, "max_det must be an int"),
            ({"classes": ["person"]}, "classes must be class indices"),
        ):
            with pytest.raises(ValueError, match=message), torch.inference_mode():
                logger(x, **kwargs)
        assert len(logger.sink.records("m", "v1", logger.result_name)) == n_records


def test_target_layers_are_paths_into_yolo_model(yolo):
    imgs = np_images(2, sizes=((320, 320),) * 3)
    with create_logger(yolo, "m", "v1", target_layers={"neck": "model.15"}) as logger:
        logger(imgs[:1], imgsz=IMGSZ, verbose=False)
        assert logger.get_hooked_features("neck").shape == (1, 64, 40, 40)
        assert set(last_record(logger).features) == {"neck"}
        # Three images in batches of 2: one capture per image, the batches' runs concatenated.
        logger(imgs, imgsz=IMGSZ, batch=2, verbose=False)
        assert logger.get_hooked_features("neck").shape == (3, 64, 40, 40)
        (feature,) = last_record(logger).features.values()
        assert feature.original_shape == (3, 64, 40, 40) and feature.payload.shape[0] == 3
    model = build_yolo(1).model.eval()
    with create_logger(model, "m", "v1", target_layers={"neck": "model.15"}) as logger:
        with torch.inference_mode():
            logger(torch.rand(1, 3, IMGSZ, IMGSZ))
        assert logger.get_hooked_features("neck").shape == (1, 64, 40, 40)
    with pytest.raises(ValueError, match="model.99"):
        create_logger(yolo, "m", "v1", target_layers={"x": "model.99"})


def n_hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_hooks_and_callbacks_are_removed_on_close():
    yolo = build_yolo(2)
    logger = create_logger(yolo, "m", "v1", target_layers={"neck": "model.15"})

    def n_callbacks():
        return sum(
            getattr(f, "__self__", None) is logger for v in yolo.callbacks.values() for f in v
        )

    assert n_callbacks() == 2
    logger(np_images(0, sizes=((200, 200),)), imgsz=IMGSZ, verbose=False)
    yolo.predict(np_images(1, sizes=((200, 200),)), imgsz=IMGSZ, verbose=False)  # not logged
    assert len(logger.sink.records("m", "v1", logger.result_name)) == 1
    running = yolo.predictor.model.backend.model  # the fused copy predict runs has the hooks
    assert n_hooks(running) > 0 and n_hooks(yolo.model) == 0
    logger.close()
    assert n_hooks(running) == 0 and n_hooks(yolo.model) == 0
    assert n_callbacks() == 0
    model = build_yolo(3).model.eval()
    with create_logger(model, "m", "v1", target_layers={"neck": "model.15"}):
        assert n_hooks(model) > 0
    assert n_hooks(model) == 0


def test_read_back_from_the_hdf5_store(yolo):
    imgs = np_images(4)
    logger = pyodlog.create_logger(yolo, "m", "v1")
    got = logger(imgs, input_ids=["x", "y", "z"], imgsz=IMGSZ, conf=0.3, verbose=False)
    logger.close()
    result = open_result(logger.sink.directory)
    assert list(result.images["input_id"]) == ["x", "y", "z"]
    for row, r in enumerate(got):
        d = result.image_detections(row)
        assert len(d) == len(r) > 0
        assert_logged_equal_results([d], [r])
        # The default storage projects the 448-wide embeddings to 128 dimensions (RecordStorage).
        assert d.logits.shape == (len(d), 80) and d.embeddings.shape == (len(d), 128)


def test_refused_arguments_say_why(yolo):
    with create_logger(yolo, "m", "v1") as logger:
        for kwargs, message in (
            ({"stream": True}, "generator"),
            ({"augment": True}, "augmentation"),
            ({"img_sizes": [(10, 10)]}, "img_sizes"),
        ):
            with pytest.raises(ValueError, match=message):
                logger(np_images()[0], **kwargs)
        with pytest.raises(ValueError, match="input_ids has 1 entries"):
            logger(np_images()[:2], input_ids=["only-one"], imgsz=IMGSZ, verbose=False)


def test_detect_does_not_import_ultralytics():
    code = (
        "import sys, pyodlog, torchvision\n"
        "from pyodlog.models import UltralyticsYOLOLogger\n"
        "m = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)\n"
        "assert not UltralyticsYOLOLogger.detect(m)\n"
        "assert type(pyodlog.create_logger(m, 'm', 'v', sink=pyodlog.InMemorySink())).__name__ == 'SSDLogger'\n"
        "assert 'ultralytics' not in sys.modules, 'ultralytics was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_sampling_draws_before_predict_and_output_aggregates_count_every_call(yolo, tmp_path):
    """Sampling with the YOLO wrapper: the draw is made before predict runs (the source's image
    count is known), so a sampled-out call is not parsed with ``sampled_out_aggregates="output"``
    and its aggregates are the Results' own: the same exact counts as a parsed call's."""
    kwargs = dict(imgsz=IMGSZ, conf=0.3, iou=0.5, verbose=False)
    totals = {}
    for mode in ("all", "output"):
        logger = pyodlog.create_logger(
            yolo,
            "m",
            mode,
            sink=pyodlog.HDF5Store(tmp_path / mode),
            sampling=pyodlog.Sampling(0.4, sampled_out_aggregates=mode),
            metrics=False,
        )
        parsed = []  # the detections computed from the head (one predictor batch each)
        original = logger._detections
        logger._detections = lambda *a, _p=parsed, _o=original, **k: _p.append(1) or _o(*a, **k)
        for seed in range(4):
            imgs = np_images(seed)
            logger(imgs, input_ids=[f"{seed}-{i}" for i in range(len(imgs))], batch=2, **kwargs)
        logger.wait_for_save()
        stats = logger.stats()
        directory = logger.sink.directory
        logger.close()
        result = open_result(directory)
        totals[mode] = (stats, result.aggregates(), len(result.detections["scores"]), len(parsed))
    (a_stats, a, a_rows, a_parsed), (o_stats, o, o_rows, o_parsed) = totals["all"], totals["output"]
    assert a_stats["calls_sampled_out"] == o_stats["calls_sampled_out"] > 0
    assert a_stats["logging_errors"] == o_stats["logging_errors"] == 0
    # The head's detections are computed for every call with "all", for no sampled-out call with
    # "output".
    per_call = a_parsed // 4
    assert per_call >= 1 and a_parsed == 4 * per_call
    assert o_parsed == per_call * (4 - o_stats["calls_sampled_out"])
    assert a_rows == o_rows > 0
    for label in (None, 0, 1):
        ta, to = a.totals(label=label), o.totals(label=label)
        for key in ("calls", "images", "detections", "sampled_calls", "score", "box_size"):
            assert ta[key] == to[key], (label, key)
    assert sum(o.totals()["entropy"]) == o_rows < sum(a.totals()["entropy"])
