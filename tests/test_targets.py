"""Ground truth (``targets=``) and class names: checked before the model runs, logged in their own
columns, read back from folders, open segments and exported ZIPs (issue 15)."""

from __future__ import annotations

import json
from typing import ClassVar

import h5py
import numpy as np
import pytest
import torch
import torchvision

import pyodlog
from pyodlog import HDF5Store
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger


class CountingDetector(TinyDetector):
    """The README's TinyDetector, counting its calls (to prove a refused call never ran it)."""

    calls = 0

    def forward(self, images):
        type(self).calls += 1
        return super().forward(images)


def _logger(tmp_path, **kwargs):
    torch.manual_seed(0)
    model = CountingDetector().eval()
    store = HDF5Store(tmp_path / "data")
    return TinyDetectorLogger(model, "tiny", "v1", sink=store, **kwargs)


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}


IMAGES = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
GOOD = [_target([[1, 2, 30, 40], [5, 5, 9, 9]], [1, 3]), _target(np.zeros((0, 4)), [])]


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}, "list of dicts"),
        ([_target([[0, 0, 1, 1]], [1])], "1 entries but the batch has 2 images"),
        ([{"boxes": torch.zeros(1, 4)}, GOOD[1]], r"'boxes' and 'labels'"),
        ([_target([[0, 0, 1]], [1]), GOOD[1]], r"shape \(1, 3\), expected \[N, 4\]"),
        ([_target([[0, 0, 1, 1]], [1, 2]), GOOD[1]], r"shape \(2,\) for 1 boxes"),
        ([{"boxes": torch.zeros(1, 4), "labels": torch.zeros(1)}, GOOD[1]], "class indices"),
        ([_target([[5, 0, 1, 1]], [1]), GOOD[1]], "not xyxy"),
        ([_target([[0, 0, float("nan"), 1]], [1]), GOOD[1]], "NaN or infinite"),
        ([_target([[0, 0, 1, 1]], [7]), GOOD[1]], r"outside the model's classes \[0, 5\)"),
        ([_target([[0, 0, 1, 1]], [-1]), GOOD[1]], "holds -1"),
    ],
)
def test_bad_targets_are_refused_before_the_model_runs(tmp_path, targets, message):
    logger = _logger(tmp_path)
    before = CountingDetector.calls
    with pytest.raises(ValueError, match=message), torch.no_grad():
        logger(IMAGES, targets=targets)
    assert CountingDetector.calls == before
    logger.close()


def test_targets_are_logged_in_their_own_columns_and_read_back(tmp_path):
    logger = _logger(tmp_path)
    with torch.no_grad():
        logger(IMAGES, input_ids=["a", "b"])  # no targets: same segment batch, gt_count 0
        logger(IMAGES, input_ids=["c", "d"], targets=GOOD)
        logger(IMAGES, input_ids=["e", "f"], targets=[GOOD[1], GOOD[0]])
    logger.wait_for_save()
    live = pyodlog.open_result(logger.sink.directory)  # the open segment
    logger.close()
    closed = pyodlog.open_result(logger.sink.directory)
    zipped = pyodlog.open_result(logger.export(tmp_path / "out.zip"))
    for data in (live, closed, zipped):
        assert data.images["input_id"] == ["a", "b", "c", "d", "e", "f"]
        assert data.images["gt_count"].tolist() == [0, 0, 2, 0, 0, 2]
        assert data.images["gt_logged"].tolist() == [0, 0, 1, 1, 1, 1]
        assert data.targets["labels"].tolist() == [1, 3, 1, 3]
        assert data.targets["boxes"].dtype == np.float32
        got = data.image_targets(2)
        assert torch.equal(got["boxes"], GOOD[0]["boxes"])
        assert got["labels"].tolist() == [1, 3]
        assert len(data.image_targets(0)["labels"]) == 0
        assert data.has_targets
        assert torch.equal(data.image_targets(5)["boxes"], GOOD[0]["boxes"])
    segment = next((logger.sink.directory).glob("*.h5"))
    with h5py.File(segment) as f:
        assert set(f["targets"]) == {"boxes", "labels"}
        assert f["targets/boxes"].shape == (4, 4)


def test_segments_with_and_without_targets_merge(tmp_path):
    logger = _logger(tmp_path)
    with torch.no_grad():
        logger(IMAGES, input_ids=["a", "b"])
    logger.sink.rotate()
    with torch.no_grad():
        logger(IMAGES, input_ids=["c", "d"], targets=GOOD)
    logger.close()
    data = pyodlog.open_result(logger.sink.directory)
    assert len(list(logger.sink.directory.glob("*.h5"))) == 2
    assert data.images["gt_count"].tolist() == [0, 0, 2, 0]
    assert data.images["gt_offset"].tolist() == [0, 0, 0, 2]
    assert data.images["gt_logged"].tolist() == [0, 0, 1, 1]
    assert data.image_targets(2)["labels"].tolist() == [1, 3]


def test_results_logged_without_targets_read_as_before(tmp_path):
    logger = _logger(tmp_path)
    with torch.no_grad():
        logger(IMAGES)
    logger.close()
    data = pyodlog.open_result(logger.sink.directory)
    assert "gt_offset" not in data.images and data.targets == {}
    assert not data.has_targets
    assert len(data.image_targets(0)["boxes"]) == 0
    with h5py.File(next(logger.sink.directory.glob("*.h5"))) as f:
        assert "targets" not in f


def test_targets_reach_the_log_for_a_torchvision_family(tmp_path):
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4
    ).eval()
    logger = pyodlog.create_logger(model, "ssd", "v1", sink=HDF5Store(tmp_path / "d"))
    with torch.no_grad():
        logger([torch.rand(3, 96, 96)], targets=[_target([[1, 1, 20, 20]], [2])])
        with pytest.raises(ValueError, match="outside the model's classes"):
            logger([torch.rand(3, 96, 96)], targets=[_target([[1, 1, 20, 20]], [4])])
    logger.close()
    data = pyodlog.open_result(logger.sink.directory)
    assert data.image_targets(0)["labels"].tolist() == [2]


# -- class names ---------------------------------------------------------------------------------


def test_class_names_are_stored_in_the_schema_and_the_export(tmp_path):
    names = ["background", "cat", "dog", "bird", "fish"]
    logger = _logger(tmp_path, class_names=names)
    assert logger.class_names == names
    with torch.no_grad():
        logger(IMAGES)
    zip_path = logger.export(tmp_path / "x.zip")
    logger.close()
    manifest = json.loads((logger.sink.directory / "result.json").read_text())
    assert manifest["schema"]["class_names"] == names
    assert pyodlog.open_result(logger.sink.directory).class_names == names
    exported = pyodlog.open_result(zip_path)
    assert exported.manifest["schema"]["class_names"] == names
    assert exported.class_names == names


def test_class_names_as_a_dict_fill_the_unnamed_labels(tmp_path):
    logger = _logger(tmp_path, class_names={1: "cat", 4: "fish"})
    assert logger.class_names == ["", "cat", "", "", "fish"]
    logger.close()


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["a", "b"], "has 2 names, the model's class head has 5 classes"),
        (["a", "b", "c", "d", 5], r"class_names\[4\] must be a string"),
        ({7: "x"}, "outside the model's classes"),
        ("cat", "list of strings"),
    ],
)
def test_bad_class_names_are_refused(tmp_path, names, message):
    with pytest.raises(ValueError, match=message):
        _logger(tmp_path, class_names=names)


def test_torchvision_weights_give_their_categories(tmp_path):
    weights = torchvision.models.detection.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None
    ).eval()
    logger = pyodlog.create_logger(
        model, "ssd", "v1", sink=HDF5Store(tmp_path / "d"), class_names=weights
    )
    assert logger.class_names == weights.meta["categories"]
    assert logger.class_names[1] == "person"
    logger.close()


def test_names_the_model_carries_are_read(tmp_path):
    from pyodlog.monitoring.detection_logger import resolve_class_names

    class Named(torch.nn.Module):
        names: ClassVar = {0: "person", 1: "car"}  # Ultralytics' model.names

    class Config:
        id2label: ClassVar = {0: "cat", 1: "dog"}  # transformers' config.id2label

    class WithConfig(torch.nn.Module):
        config = Config()

    assert resolve_class_names(None, Named(), 2) == ["person", "car"]
    assert resolve_class_names(None, WithConfig(), 3) == ["cat", "dog", ""]  # DETR: + no-object
    Config.id2label = {0: "LABEL_0", 1: "LABEL_1"}  # what an untrained config has: no names
    assert resolve_class_names(None, WithConfig(), 2) is None
    assert resolve_class_names(None, torch.nn.Linear(1, 1), 2) is None


# -- every family: the generic path, DETR's own __call__, YOLO's predict -----------------------------


def _records(logger):
    return logger.sink.records(logger.model_name, logger.version_name, logger.result_name)


def test_detr_logs_targets_and_reads_its_id2label():
    from tests.helpers.detr_models import small_detr

    torch.manual_seed(0)
    model = small_detr().eval()
    model.config.id2label = {i: f"thing{i}" for i in range(6)}
    logger = pyodlog.create_logger(model, "detr", "v1", sink=pyodlog.InMemorySink())
    assert logger.class_names == [f"thing{i}" for i in range(6)] + [""]  # + "no object"
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logger(pixels, targets=[_target([[1, 1, 9, 9]], [5]), _target(np.zeros((0, 4)), [])])
        with pytest.raises(ValueError, match="targets has 1 entries but the batch has 2"):
            logger(pixels, targets=[_target([[1, 1, 9, 9]], [5])])
    record = _records(logger)[-1]
    assert record.targets["counts"] == [1, 0]
    assert record.targets["labels"].tolist() == [5]
    logger.close()


def test_yolo_logs_targets_without_passing_them_to_predict_and_reads_its_names():
    from tests.test_family_yolo import build_yolo, np_images

    yolo = build_yolo()
    yolo.model.names = {i: f"c{i}" for i in range(80)}
    logger = pyodlog.create_logger(yolo, "yolo", "v1", sink=pyodlog.InMemorySink())
    assert logger.class_names[:2] == ["c0", "c1"] and len(logger.class_names) == 80
    images = np_images()
    gts = [_target([[1, 1, 20, 20]], [3]), _target(np.zeros((0, 4)), []), GOOD[0]]
    logger(images, imgsz=160, targets=gts)
    record = _records(logger)[-1]
    assert record.targets["counts"] == [1, 0, 2]
    with pytest.raises(ValueError, match="outside the model's classes"):
        logger(images, imgsz=160, targets=[_target([[1, 1, 2, 2]], [80]), GOOD[1], GOOD[1]])
    assert len(_records(logger)) == 1  # refused before predict ran
    logger.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU present")
def test_targets_on_the_gpu_are_checked_by_shape_and_stored(tmp_path):
    from pyodlog.monitoring.validation import check_targets

    on_gpu = [{k: v.cuda() for k, v in t.items()} for t in GOOD]
    checked = check_targets(on_gpu, 2, 5)
    assert checked["boxes"].is_cuda and checked["counts"] == [2, 0]
    with pytest.raises(ValueError, match="expected \\[N, 4\\]"):
        check_targets([{"boxes": torch.zeros(2, 3).cuda(), "labels": torch.zeros(2).long()}], 1)
    torch.manual_seed(0)
    model = TinyDetector().eval().cuda()
    logger = TinyDetectorLogger(model, "tiny", "gpu", sink=HDF5Store(tmp_path / "data"))
    with torch.no_grad():
        logger([image.cuda() for image in IMAGES], targets=on_gpu)
    logger.close()
    data = pyodlog.open_result(logger.sink.directory)
    assert torch.equal(data.image_targets(0)["boxes"], GOOD[0]["boxes"])


def test_the_collector_accepts_a_segment_with_targets_and_refuses_a_broken_one(tmp_path):
    from pyodlog_collector.segment_check import InvalidSegment, check_segment

    logger = _logger(tmp_path)
    with torch.no_grad():
        logger(IMAGES, targets=GOOD)
    logger.close()
    segment = next(logger.sink.directory.glob("*.h5"))
    check_segment(segment)  # what pyodlog writes is what the collector takes
    with h5py.File(segment, "r+") as f:
        f["images/gt_count"][0] = 9  # points past the targets table
    with pytest.raises(InvalidSegment, match="images/gt_offset points outside its table"):
        check_segment(segment)


def test_a_result_logged_before_class_names_were_stored_stays_usable(tmp_path, caplog):
    first = _logger(tmp_path)  # no names: what every result before this change was
    with torch.no_grad():
        first(IMAGES)
    first.close()
    name = first.result_name
    names = ["background", "cat", "dog", "bird", "fish"]
    with caplog.at_level("WARNING", logger="pyodlog"):
        second = _logger(tmp_path, class_names=names, result_name=name)
    assert "created by an earlier pyodlog without class_names" in caplog.text
    with torch.no_grad():
        second(IMAGES)
    second.close()
    data = pyodlog.open_result(second.sink.directory)
    assert len(data) == 4 and data.class_names is None
    named = _logger(tmp_path / "other", class_names=names)
    named.close()
    with pytest.raises(pyodlog.SchemaMismatchError):  # names that differ from the stored ones
        _logger(tmp_path / "other", class_names=["x"] * 5, result_name=named.result_name)
