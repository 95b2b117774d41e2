"""The README's 'Writing a logger for your own model' guide, executed as written."""

from __future__ import annotations

import pytest
import torch

import pyodlog
from readme_blocks import block_starting_with, python_blocks


@pytest.fixture(scope="module")
def guide():
    namespace: dict = {}
    exec(compile(block_starting_with("# subclass-guide"), "README.md:subclass-guide", "exec"), namespace)
    yield namespace
    namespace["logger"].close()


def test_the_guide_runs_and_its_logger_is_picked_by_the_factory(guide):
    assert type(guide["logger"]).__name__ == "TinyDetectorLogger"
    assert guide["TinyDetectorLogger"] in pyodlog.registered_loggers()


def test_the_custom_logger_records_what_the_model_returned(guide):
    logger, model = guide["logger"], guide["logger"].model
    torch.manual_seed(1)
    images = [torch.rand(3, 96, 160) for _ in range(3)]
    with torch.no_grad():
        want = model(images)
        got = logger(images, input_ids=["a", "b", "c"])
    record = logger.sink.records("tiny", "v1", logger.result_name)[-1]
    per_image = record.detections.unbind()
    assert sum(len(d) for d in per_image) > 10
    for g, w, d in zip(got, want, per_image):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(g[key], w[key])
        assert torch.equal(d.boxes, w["boxes"]) and torch.equal(d.scores, w["scores"]) and torch.equal(d.labels, w["labels"])
        # The logit row is the one that produced the score.
        assert torch.equal(d.logits.sigmoid().gather(1, d.labels[:, None]).squeeze(1), d.scores)
    assert record.input_ids == ["a", "b", "c"]


def test_registering_the_same_logger_twice_is_an_error(guide):
    with pytest.raises(ValueError, match="registered already"):
        pyodlog.register_logger(guide["TinyDetectorLogger"])


def test_the_quick_start_runs():
    namespace: dict = {}
    exec(compile(python_blocks()[0], "README.md:quick-start", "exec"), namespace)
    assert namespace["detections"] is not None
