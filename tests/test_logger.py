"""The logger on real torchvision detectors: what it records equals what the model returns."""

from __future__ import annotations

import gc
import os

import psutil
import pytest
import torch
from torch import nn
from torchvision.models import detection

import pyodlog
from pyodlog import InMemorySink, LoggerClosedError, SchemaMismatchError, UnsupportedModelError
from tests.helpers.outputs import assert_outputs_equal, distinct_init, last_record

SMALL = dict(min_size=256, max_size=416)


def create_logger(*args, **kwargs):
    """These tests read records from memory; the HDF5 store has tests of its own."""
    kwargs.setdefault("sink", InMemorySink())
    return pyodlog.create_logger(*args, **kwargs)


BUILDERS = {
    "fasterrcnn_resnet50_fpn_v2": (
        lambda: detection.fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **SMALL),
        0.001,
    ),
    "retinanet_resnet50_fpn": (
        lambda: detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, **SMALL),
        0.0102,
    ),
    "fcos_resnet50_fpn": (
        lambda: detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, **SMALL),
        0.08,
    ),
    "ssdlite320_mobilenet_v3_large": (
        lambda: distinct_init(
            detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
        ),
        0.01,
    ),
}
EXPECTED_CLASS = {
    "fasterrcnn_resnet50_fpn_v2": pyodlog.TorchvisionRCNNLogger,
    "retinanet_resnet50_fpn": pyodlog.RetinaNetLogger,
    "fcos_resnet50_fpn": pyodlog.FCOSLogger,
    "ssdlite320_mobilenet_v3_large": pyodlog.SSDLogger,
}
_MODELS = {}


def model_of(name):
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = BUILDERS[name][0]().eval()
    return _MODELS[name]


def images(seed=0, sizes=((240, 320), (300, 260), (200, 410))):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_logged_detections_equal_what_the_model_returned(name):
    model = model_of(name)
    thresh = BUILDERS[name][1]
    with create_logger(model, "m", "v1", score_thresh=thresh) as logger:
        assert type(logger) is EXPECTED_CLASS[name]
        imgs = images()
        with torch.inference_mode():
            want = model(imgs)
            got = logger(imgs)
        assert_outputs_equal(got, want)  # the hooks change nothing
        record = last_record(logger)
        per_image = record.detections.unbind()
        assert sum(len(d) for d in per_image) > 50
        for d, w, img in zip(per_image, want, imgs):
            assert (
                torch.equal(d.boxes, w["boxes"])
                and torch.equal(d.scores, w["scores"])
                and torch.equal(d.labels, w["labels"])
            )
            assert d.image_size == tuple(img.shape[-2:])
            assert d.logits.shape == (len(d), logger.n_class)
            assert (d.candidate_index >= 0).all()
        # Each logit vector is the row that produced the score.
        d = per_image[0]
        if name.startswith("fasterrcnn") or name.startswith("ssd"):
            activated = d.logits.softmax(-1)
        elif name.startswith("retinanet"):
            activated = d.logits.sigmoid()
        else:
            activated = None  # FCOS multiplies in the centerness
        if activated is not None:
            torch.testing.assert_close(
                activated.gather(1, d.labels[:, None]).squeeze(1), d.scores, rtol=1e-6, atol=0
            )
        if name.startswith("ssd"):
            assert d.embeddings is None
        else:
            assert d.embeddings.shape[0] == len(d) and d.embeddings.dim() == 2


def test_faster_rcnn_embedding_is_the_box_head_feature_of_the_proposal():
    model = model_of("fasterrcnn_resnet50_fpn_v2")
    captured = {}
    handle = model.roi_heads.box_predictor.register_forward_hook(
        lambda m, i, o: captured.update(features=i[0])
    )
    try:
        with create_logger(model, "m", "v1", score_thresh=0.001) as logger, torch.inference_mode():
            imgs = images(sizes=((240, 320), (200, 300)))
            logger(imgs)
    finally:
        handle.remove()
    record = last_record(logger)
    first_rows = [
        0,
        len(captured["features"]) // 2,
    ]  # both images get the same number of proposals here
    for b, d in enumerate(record.detections.unbind()):
        assert torch.equal(d.embeddings, captured["features"][first_rows[b] + d.candidate_index])


def test_img_sizes_log_boxes_in_those_coordinates():
    model = model_of("retinanet_resnet50_fpn")
    imgs = images(sizes=((240, 320), (300, 260)))
    originals = [(480, 640), (150, 130)]
    with create_logger(model, "m", "v1", score_thresh=0.0102) as logger, torch.inference_mode():
        want = model(imgs)
        logger(imgs, img_sizes=originals)
    for d, w, img, orig in zip(last_record(logger).detections.unbind(), want, imgs, originals):
        assert d.image_size == orig
        ratio = torch.tensor([orig[1] / img.shape[-1], orig[0] / img.shape[-2]] * 2)
        torch.testing.assert_close(d.boxes, w["boxes"] * ratio, rtol=1e-5, atol=1e-3)
        assert torch.equal(d.scores, w["scores"])


def test_thresholds_are_applied_to_the_model_so_output_and_log_agree():
    model = model_of("fcos_resnet50_fpn")
    saved = (model.score_thresh, model.nms_thresh, model.detections_per_img)
    try:
        with create_logger(
            model, "m", "v1", score_thresh=0.1, iou_thresh=0.3, max_detections_per_image=7
        ) as logger:
            assert (model.score_thresh, model.nms_thresh, model.detections_per_img) == (0.1, 0.3, 7)
            with torch.inference_mode():
                out = logger(images())
            assert all(len(o["boxes"]) <= 7 and (o["scores"] > 0.1).all() for o in out)
            assert [len(d) for d in last_record(logger).detections.unbind()] == [
                len(o["boxes"]) for o in out
            ]
            with create_logger(model, "m", "v2"):  # None keeps the model's values
                assert (model.score_thresh, model.nms_thresh, model.detections_per_img) == (
                    0.1,
                    0.3,
                    7,
                )
        # close() gives the model its own thresholds back.
        assert (model.score_thresh, model.nms_thresh, model.detections_per_img) == saved
    finally:
        model.score_thresh, model.nms_thresh, model.detections_per_img = saved


def test_faster_rcnn_thresholds_go_to_the_roi_heads():
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None
    ).eval()
    with create_logger(
        model, "m", "v1", score_thresh=0.2, iou_thresh=0.4, max_detections_per_image=11
    ):
        assert (
            model.roi_heads.score_thresh,
            model.roi_heads.nms_thresh,
            model.roi_heads.detections_per_img,
        ) == (0.2, 0.4, 11)


@pytest.mark.parametrize(
    "builder", [detection.maskrcnn_resnet50_fpn, detection.keypointrcnn_resnet50_fpn]
)
def test_mask_and_keypoint_rcnn(builder):
    torch.manual_seed(0)
    model = builder(
        weights=None, weights_backbone=None, min_size=200, max_size=300, box_score_thresh=0.0
    ).eval()
    with create_logger(model, "m", "v1") as logger, torch.inference_mode():
        imgs = images(sizes=((200, 260),))
        want = model(imgs)
        got = logger(imgs)
    assert type(logger) is pyodlog.TorchvisionRCNNLogger
    assert_outputs_equal(got, want)
    d = last_record(logger).detections.unbind()[0]
    assert (
        len(d) > 0
        and torch.equal(d.boxes, want[0]["boxes"])
        and torch.equal(d.scores, want[0]["scores"])
    )


def test_works_under_no_grad_and_inference_mode_and_refuses_training_mode():
    model = model_of("ssdlite320_mobilenet_v3_large")
    with create_logger(model, "m", "v1") as logger:
        with torch.no_grad():
            a = logger(images())
        with torch.inference_mode():
            b = logger(images())
        assert_outputs_equal(a, b)
        model.train()
        try:
            with pytest.raises(RuntimeError, match=r"training mode.*model.eval\(\)"):
                logger(images())
        finally:
            model.eval()


def test_target_layers_are_compressed_at_hook_time_and_returned_by_get_hooked_features():
    model = model_of("retinanet_resnet50_fpn")
    layers = {
        "fpn": "backbone.fpn",
        "cls": {"path": "head.classification_head.cls_logits", "compression": "float16"},
        "body": {"path": "backbone.body.layer2", "compression": "uint8", "pool_to": [4, 4]},
    }
    with create_logger(model, "m", "v1", target_layers=layers) as logger:
        with pytest.raises(
            KeyError, match=r"no call has captured it yet.*\['fpn', 'cls', 'body'\]"
        ):
            logger.get_hooked_features("fpn")
        with torch.inference_mode():
            logger(images())
        features = last_record(logger).features
        fpn = logger.get_hooked_features("fpn")
        assert isinstance(fpn, dict) and set(f"fpn/{k}" for k in fpn) <= set(features)
        restored = features["fpn/0"].decompress()
        assert restored.shape == fpn["0"].shape
        assert (
            (restored - fpn["0"]).abs().amax((2, 3))
            <= features["fpn/0"].scale.reshape(fpn["0"].shape[:2]) / 2 * 1.001 + 1e-6
        ).all()
        # The class head's last conv runs once per FPN level: every run is kept.
        cls = logger.get_hooked_features("cls")
        assert isinstance(cls, list) and len(cls) == 5 and "cls/4" in features
        assert features["cls/0"].payload.dtype == torch.float16
        assert features["body"].payload.shape[-2:] == (4, 4)
        with pytest.raises(KeyError, match="not a target_layers alias"):
            logger.get_hooked_features("nope")


class InplaceNet(nn.Module):
    """A tiny detector whose hooked layer is followed by an in-place ReLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, images):
        x = self.relu(self.conv(torch.stack(images)))
        return [
            {
                "boxes": torch.zeros(0, 4),
                "scores": torch.zeros(0),
                "labels": torch.zeros(0, dtype=torch.long),
            }
            for _ in x
        ]


@pyodlog.register_logger
class InplaceNetLogger(pyodlog.ObjectDetectionTorchLogger):
    family = "InplaceNet (a test model)"

    @staticmethod
    def detect(model):
        return isinstance(model, InplaceNet)

    def _get_n_class(self, model):
        return 1

    def _register_model_hooks(self, model):
        pass

    def _parse_model_output(self, model_output, img_sizes):
        b = len(model_output)
        return pyodlog.DetectionBatch(
            torch.zeros(b, 0, 4),
            torch.zeros(b, 0),
            torch.zeros(b, 0, dtype=torch.long),
            torch.zeros(b, 0, 1),
            torch.zeros(b, 0, dtype=torch.long),
            torch.zeros(b, dtype=torch.long),
            img_sizes,
        )


def test_an_in_place_op_after_the_hooked_layer_does_not_change_what_is_recorded():
    torch.manual_seed(0)
    model = InplaceNet().eval()
    with create_logger(
        model, "m", "v1", target_layers={"conv": {"path": "conv", "compression": "none"}}
    ) as logger:
        imgs = [torch.randn(3, 8, 8)]
        with torch.no_grad():
            logger(imgs)
            before_relu = model.conv(torch.stack(imgs))
        stored = last_record(logger).features["conv"].payload
        assert (before_relu < 0).any()
        assert torch.equal(stored, before_relu)  # the ReLU ran in place on the output afterwards


def test_hooks_are_removed_on_close_and_calls_after_close_fail():
    model = model_of("ssdlite320_mobilenet_v3_large")
    counts_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    logger = create_logger(model, "m", "v1", target_layers={"b": "backbone"})
    assert (
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        > counts_before
    )
    logger.close()
    logger.close()  # idempotent
    assert (
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        == counts_before
    )
    with pytest.raises(LoggerClosedError):
        logger(images())
    with create_logger(model, "m", "v1") as ctx:
        pass
    assert (
        ctx._closed
        and sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        == counts_before
    )


def test_hooks_do_nothing_when_the_model_is_called_directly():
    model = model_of("ssdlite320_mobilenet_v3_large")
    with (
        create_logger(model, "m", "v1", target_layers={"b": "backbone"}) as logger,
        torch.inference_mode(),
    ):
        model(images())
        with pytest.raises(KeyError):
            logger.get_hooked_features("b")
        assert logger._state == {}


def test_wrapped_models_are_detected():
    model = model_of("ssdlite320_mobilenet_v3_large")
    with create_logger(nn.DataParallel(model), "m", "v1") as logger, torch.inference_mode():
        assert type(logger) is pyodlog.SSDLogger
        assert_outputs_equal(logger(images()), model(images()))
    compiled = torch.compile(model)
    with create_logger(compiled, "m", "v1") as logger:
        assert type(logger) is pyodlog.SSDLogger and logger.model is compiled


def test_distributed_data_parallel_is_detected(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        model = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
        ddp = nn.parallel.DistributedDataParallel(model)
        with create_logger(ddp, "m", "v1") as logger:
            assert type(logger) is pyodlog.SSDLogger
    finally:
        dist.destroy_process_group()


def test_an_unsupported_model_gets_the_list_of_families():
    with pytest.raises(
        UnsupportedModelError, match=r"(?s)no pyodlog logger handles Linear.*RetinaNet.*SSD.*README"
    ):
        create_logger(nn.Linear(2, 2), "m", "v1")


def test_memory_is_flat_over_1000_calls():
    torch.manual_seed(0)
    from tests.helpers.readme_blocks import block_starting_with

    # The README's TinyDetector and its logger class (not registered again).
    namespace: dict = {}
    source = block_starting_with("# subclass-guide").split("\nlogger = pyodlog.create_logger")[0]
    exec(compile(source.replace("@pyodlog.register_logger\n", ""), "README.md", "exec"), namespace)
    model = namespace["TinyDetector"]().eval()
    sink = InMemorySink(max_records=10)
    logger = namespace["TinyDetectorLogger"](
        model, "tiny", "leak", target_layers={"b": "backbone"}, sink=sink
    )
    imgs = [torch.rand(3, 64, 64) for _ in range(2)]
    process = psutil.Process(os.getpid())
    with torch.no_grad():
        for _ in range(200):
            logger(imgs, dataset_type="test")
        gc.collect()
        start = process.memory_info().rss
        for _ in range(1000):
            logger(imgs, dataset_type="test")
        gc.collect()
        growth = process.memory_info().rss - start
    logger.close()
    assert sink.dropped == 1190
    assert growth < 8 * 2**20, f"memory grew by {growth / 2**20:.1f} MiB over 1,000 calls"


def test_records_carry_ids_fields_epoch_and_dataset_type():
    model = model_of("ssdlite320_mobilenet_v3_large")
    fields = [
        {"name": "camera", "dtype": "str"},
        {"name": "exposure", "dtype": "float32", "default": 1.0},
        {"name": "frame", "dtype": "int64", "default": 0},
        {"name": "flagged", "dtype": "bool", "default": False},
    ]
    with (
        create_logger(model, "m", "v1", additional_fields=fields, n_epoch=3) as logger,
        torch.inference_mode(),
    ):
        logger(
            images(),
            input_ids=["x", "y", "z"],
            dataset_type="val",
            camera="c1",
            frame=torch.tensor([1, 2, 3]),
        )
        record = last_record(logger)
    assert (
        record.input_ids == ["x", "y", "z"] and record.dataset_type == "val" and record.n_epoch == 3
    )
    assert record.fields == {
        "camera": ["c1"] * 3,
        "exposure": [1.0] * 3,
        "frame": [1, 2, 3],
        "flagged": [False] * 3,
    }
    assert record.image_sizes == [(240, 320), (300, 260), (200, 410)]


def test_generated_input_ids_are_unique():
    model = model_of("ssdlite320_mobilenet_v3_large")
    with create_logger(model, "m", "v1") as logger, torch.inference_mode():
        logger(images())
        logger(images())
        ids = [i for r in logger.sink.records("m", "v1", logger.result_name) for i in r.input_ids]
    assert len(set(ids)) == len(ids) == 6


def test_result_and_epoch_resolution_and_schema_checks():
    model = model_of("ssdlite320_mobilenet_v3_large")
    sink = InMemorySink()
    with create_logger(model, "m", "v1", sink=sink) as first:
        assert first.n_epoch == 0 and first.result_name
    with create_logger(model, "m", "v1", n_epoch=4, sink=sink) as second, torch.inference_mode():
        assert second.result_name == first.result_name  # None: the most recent result
        second(images())
    with create_logger(model, "m", "v1", sink=sink) as third:
        assert third.n_epoch == 4  # 'latest': the highest epoch recorded
    with create_logger(model, "m", "v1", n_epoch=None, sink=sink) as untagged:
        assert untagged.n_epoch is None
    fields = [{"name": "camera", "dtype": "str", "default": ""}]
    with pytest.raises(SchemaMismatchError, match="force_table_recreate=True"):
        create_logger(model, "m", "v1", additional_fields=fields, sink=sink)
    with create_logger(
        model, "m", "v1", additional_fields=fields, force_table_recreate=True, sink=sink
    ) as fresh:
        assert fresh.n_epoch == 0 and sink.records("m", "v1", fresh.result_name) == []
    with create_logger(model, "m", "v1", result_name="run-2", sink=sink) as named:
        assert named.result_name == "run-2"


def test_the_api_key_never_shows(monkeypatch):
    model = model_of("ssdlite320_mobilenet_v3_large")
    monkeypatch.setenv("PYODLOG_API_KEY", "s3cr3t-key-value")
    with create_logger(model, "m", "v1", api_endpoint="http://127.0.0.1:9") as logger:
        assert logger.has_api_key
        assert "s3cr3t" not in repr(logger) + str(logger) + repr(vars(logger))
        with pytest.raises(TypeError, match="cannot be pickled"):
            import pickle

            pickle.dumps(logger._api_key)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(model_name="a/b"), r"model_name='a/b' is not a valid name"),
        (dict(version_name=".."), r"version_name='\.\.' is not a valid name"),
        (dict(result_name="x y"), "result_name='x y' is not a valid name"),
        (
            dict(target_layers={"f": "backbone.fpm"}),
            r"not a module of the model\. Did you mean 'backbone\.fpn'",
        ),
        (
            dict(target_layers={"f": {"path": "backbone", "compression": "jpeg"}}),
            "compression'\\] must be one of",
        ),
        (dict(additional_fields=[{"name": "cam"}]), "must be a dict with 'name' and 'dtype'"),
        (
            dict(additional_fields=[{"name": "cam", "dtype": "complex64"}]),
            "dtype'\\] must be one of",
        ),
        (dict(additional_fields=[{"name": "input_id", "dtype": "str"}]), "reserved"),
        (
            dict(additional_fields=[{"name": "n", "dtype": "int64", "default": "x"}]),
            "declared as int64",
        ),
        (dict(score_thresh=1.5), r"score_thresh must be a number in \[0, 1\]"),
        (dict(iou_thresh=-0.1), r"iou_thresh must be a number in \[0, 1\]"),
        (dict(max_detections_per_image=0), "max_detections_per_image must be an int >= 1"),
        (dict(n_class=3), "n_class=3 but the model's class head produces 91 classes"),
        (dict(n_epoch=-1), "n_epoch must be 'latest', an int >= 0 or None"),
        (dict(api_endpoint="ftp://x"), "api_endpoint must be an http:// or https:// URL"),
    ],
)
def test_constructor_validation(kwargs, message):
    model = (
        detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None)
        if "target_layers" in kwargs
        else model_of("retinanet_resnet50_fpn")
    )
    args = dict(model_name="m", version_name="v1")
    args.update(kwargs)
    before = sum(len(m._forward_hooks) for m in model.modules())
    with pytest.raises(ValueError, match=message):
        create_logger(model, **args)
    assert sum(len(m._forward_hooks) for m in model.modules()) == before  # nothing left behind


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(input_ids=["a"]), "input_ids has 1 entries but the batch has 3 images"),
        (dict(input_ids=["a", "b", 3]), r"input_ids\[2\] must be a non-empty string"),
        (dict(dataset_type=""), "dataset_type must be a non-empty string"),
        (dict(img_sizes=[(1, 1)]), "img_sizes must give one"),
        (
            dict(img_sizes=[(1, 1), (2, 2), (0, 3)]),
            r"img_sizes\[2\] must be \(height, width\) with positive integers",
        ),
        (dict(colour="red"), r"unknown keyword argument\(s\) \['colour'\]"),
        (dict(camera=["a", "b"]), "camera has 2 values for 3 images"),
        (dict(camera=3), "declared as str"),
        (dict(), "additional field 'camera' has no default"),
    ],
)
def test_call_validation(call, message):
    model = model_of("ssdlite320_mobilenet_v3_large")
    with create_logger(
        model, "m", "v1", additional_fields=[{"name": "camera", "dtype": "str"}]
    ) as logger:
        with pytest.raises(ValueError, match=message), torch.inference_mode():
            logger(images(), **call)
        assert logger.sink.records("m", "v1", logger.result_name) == []


def test_wrong_model_input_is_a_clear_error():
    model = model_of("ssdlite320_mobilenet_v3_large")
    with (
        create_logger(model, "m", "v1") as logger,
        pytest.raises(
            ValueError, match=r"model_input must be a non-empty list of \[C, H, W\] image tensors"
        ),
    ):
        logger("not images")


def test_export_and_upload_say_what_is_missing():
    model = model_of("ssdlite320_mobilenet_v3_large")
    with create_logger(model, "m", "v1") as logger:
        with pytest.raises(NotImplementedError, match="keeps them in memory"):
            logger.export()
        with pytest.raises(RuntimeError, match="upload\\(\\) needs an endpoint"):
            logger.upload()
        logger.wait_for_save()
