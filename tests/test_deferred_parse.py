"""A logged call on the CPU is parsed on the store's writer thread (issue 17, developer deferall):
its rows -- detections, logits, uncertainty columns, embeddings, near-misses and their envelope --
are those of a parse on the call path, whatever the caller, the user or ``close()`` change after
the call returned (its output in place, the model's thresholds, the logger's near-miss settings)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import pyodlog
from pyodlog.models.torchvision_dense import FCOSLogger, RetinaNetLogger, SSDLogger
from pyodlog.models.torchvision_rcnn import TorchvisionRCNNLogger
from tests.helpers.outputs import distinct_init
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger
from tests.test_replay import FAMILIES, images, thresholds_of

LOGGERS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": TorchvisionRCNNLogger,
    "retinanet_resnet50_fpn": RetinaNetLogger,
    "fcos_resnet50_fpn": FCOSLogger,
    "ssdlite320_mobilenet_v3_large": SSDLogger,
}
CALLS = 2


def _gated(cls, defer_parse):
    """``cls`` noting the thread of each parse; a parse off the call path waits for ``gate``."""

    class Gated(cls):
        def _parse_model_output(self, model_output, img_sizes):
            on_call_path = threading.current_thread() is threading.main_thread()
            self.threads.append(on_call_path)
            if not on_call_path:
                assert self.gate.wait(120), "the test never opened the gate"
            return super()._parse_model_output(model_output, img_sizes)

    Gated.defer_parse = defer_parse
    return Gated


def _tables(data):
    out = {}
    for table in ("detections", "near_misses", "images"):
        for name, column in getattr(data, table).items():
            if table == "images" and name == "timestamp":
                continue
            out[f"{table}/{name}"] = np.asarray(column)
    return out


def _log(family, model, tmp_path, *, defer_parse, change_after_calls):
    cls = _gated(LOGGERS[family], defer_parse)
    logger = cls(
        model,
        "m",
        f"{family}-{defer_parse}",
        sink=pyodlog.HDF5Store(tmp_path / str(defer_parse)),
        metrics=False,
        auto_sync=False,
    )
    logger.threads, logger.gate = [], threading.Event()
    heads = thresholds_of(model)
    saved = {k: getattr(heads, k) for k in ("score_thresh", "nms_thresh", "detections_per_img")}
    try:
        with torch.inference_mode():
            for call in range(CALLS):
                out = logger(images(call), input_ids=[f"c{call}-a", f"c{call}-b"])
                assert sum(len(o["scores"]) for o in out) > 0
                if change_after_calls:  # the caller changes its output in place
                    for o in out:
                        o["boxes"].add_(17.0)
                        o["scores"].mul_(0.5)
                        o["labels"].fill_(1)
        if change_after_calls:
            # Before the writer parses: everything a parse reads that may change does change.
            heads.score_thresh, heads.nms_thresh, heads.detections_per_img = 0.9, 0.1, 1
            if hasattr(heads, "topk_candidates"):
                heads.topk_candidates = 3
            logger.near_miss, logger.near_miss_floor, logger.log_embeddings = 1, 0.5, False
        logger.gate.set()
        logger.wait_for_save()
        stats = logger.stats()
        directory = logger.sink.directory
        threads = list(logger.threads)
    finally:
        logger.gate.set()
        for k, v in saved.items():
            setattr(heads, k, v)
        logger.close()
    assert stats["logging_errors"] == 0 and stats["written"] == CALLS, stats
    return threads, _tables(pyodlog.open_result(directory))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_deferred_logged_call_logs_the_rows_of_a_parse_on_the_call_path(family, tmp_path):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    if family.startswith(("fcos", "ssd")):
        model = distinct_init(model)
    on_path_threads, on_path = _log(
        family, model, tmp_path, defer_parse=False, change_after_calls=False
    )
    threads, deferred = _log(family, model, tmp_path, defer_parse=True, change_after_calls=True)
    assert on_path_threads == [True] * CALLS  # defer_parse=False: parsed by the caller
    assert threads == [False] * CALLS  # parsed by the writer, after everything above changed
    assert deferred.keys() == on_path.keys()
    assert "near_misses/reason" in deferred and len(deferred["near_misses/reason"]) > 0
    assert "detections/entropy" in deferred
    if not family.startswith("ssd"):
        assert "detections/embeddings" in deferred and "near_misses/embeddings" in deferred
    for name, column in on_path.items():
        np.testing.assert_array_equal(deferred[name], column, err_msg=name)


def test_a_deferred_logged_parse_that_fails_is_counted_not_raised(tmp_path):
    class Failing(TinyDetectorLogger):
        def _parse_model_output(self, model_output, img_sizes):
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("parse failed on the writer")
            return super()._parse_model_output(model_output, img_sizes)

    torch.manual_seed(0)
    model = TinyDetector().eval()
    logger = Failing(
        model, "tiny", "failing", sink=pyodlog.HDF5Store(tmp_path), score_thresh=0.0, metrics=False
    )
    g = torch.Generator().manual_seed(1)
    frames = [torch.rand(3, 64, 64, generator=g) for _ in range(4)]
    with torch.inference_mode():
        for i, frame in enumerate(frames):
            out = logger([frame], input_ids=[f"f{i}"])
            with torch.no_grad():
                want = model([frame])
            assert torch.equal(out[0]["scores"], want[0]["scores"])  # the call returned its output
    logger.wait_for_save()
    stats = logger.stats()
    logger.close()
    assert stats["logging_errors"] == 4 and stats["quarantined"] == 4 and stats["written"] == 0
    assert "parse failed on the writer" in stats["last_logging_error"]


def test_the_budget_is_given_back_by_a_record_the_store_never_parsed():
    from pyodlog.monitoring.deferred import DeferredBudget, DeferredDetections

    budget = DeferredBudget(100)
    assert budget.take(80)
    deferred = DeferredDetections(lambda: None, [torch.zeros(20)], lambda: budget.give_back(80))
    assert budget.held == 80
    del deferred  # e.g. dropped by a full queue: never parsed
    assert budget.held == 0 and budget.take(100)
