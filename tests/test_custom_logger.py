"""The README's 'Writing a logger for your own model' guide, executed as written."""

from __future__ import annotations

import os
import re

import pytest
import torch

import pyodlog
from tests.helpers.readme_blocks import block_starting_with, python_blocks
from tests.helpers.tiny_models import TinyDetector


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    # Module-scoped: give its store a data root of its own before the per-test one exists.
    previous = os.environ.get("PYODLOG_HOME")
    os.environ["PYODLOG_HOME"] = str(tmp_path_factory.mktemp("guide_home"))
    namespace: dict = {}
    try:
        exec(
            compile(block_starting_with("# subclass-guide"), "README.md:subclass-guide", "exec"),
            namespace,
        )
        yield namespace
        namespace["logger"].close()
    finally:
        if previous is None:
            os.environ.pop("PYODLOG_HOME", None)
        else:
            os.environ["PYODLOG_HOME"] = previous


def test_the_guide_runs_and_its_logger_is_picked_by_the_factory(guide):
    assert type(guide["logger"]).__name__ == "TinyDetectorLogger"
    assert guide["TinyDetectorLogger"] in pyodlog.registered_loggers()


def test_the_custom_logger_records_what_the_model_returned(guide, tmp_path):
    logger, model = guide["logger"], guide["logger"].model
    torch.manual_seed(1)
    images = [torch.rand(3, 96, 160) for _ in range(3)]
    with torch.no_grad():
        want = model(images)
        got = logger(images, input_ids=["a", "b", "c"])
    # Written by the default HDF5 store, read back from the export.
    result = pyodlog.open_result(logger.export(tmp_path))
    rows = [i for i, name in enumerate(result.images["input_id"]) if name in ("a", "b", "c")]
    assert [result.images["input_id"][i] for i in rows] == ["a", "b", "c"]
    assert sum(int(result.images["det_count"][i]) for i in rows) > 10
    for g, w, i in zip(got, want, rows):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(g[key], w[key])
        d = result.image_detections(i)
        assert (
            torch.equal(d.boxes, w["boxes"])
            and torch.equal(d.scores, w["scores"])
            and torch.equal(d.labels, w["labels"])
        )
        # The logit row is the one that produced the score (sigmoid may round
        # differently by an ulp depending on where an element sits in a vector; the
        # default storage keeps logits as float16: 2^-11 relative, times |logit|).
        torch.testing.assert_close(
            d.logits.sigmoid().gather(1, d.labels[:, None]).squeeze(1),
            d.scores,
            rtol=1e-6 if "storage" not in logger.schema else 2**-8,
            atol=0,
        )


def test_registering_the_same_logger_twice_is_an_error(guide):
    with pytest.raises(ValueError, match="registered already"):
        pyodlog.register_logger(guide["TinyDetectorLogger"])


def test_the_quick_start_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_blocks()[0], "README.md:quick-start", "exec"), namespace)
    result = namespace["result"]
    assert len(result) == 2 and result.images["camera"] == ["cam1", "cam2"]
    assert namespace["zip_path"].exists() and namespace["fpn_level"].dim() == 3


class SpecDetectorLogger(pyodlog.ObjectDetectionTorchLogger):
    """A logger written from the specification (docs/specification.md): ``_parse_model_output`` returns one
    ``DetectionOutput`` per image, built from what the model returned."""

    family = "TinyDetector, per-image DetectionOutputs (a test logger)"

    @staticmethod
    def detect(model):
        return isinstance(model, TinyDetector)  # not registered: constructed directly

    def _get_n_class(self, model):
        return model.cls_head.out_channels

    def _register_model_hooks(self, model):
        self._add_forward_hook(model.cls_head, lambda m, i, out: self._state.update(logits=out))
        self._add_forward_hook(model.box_head, lambda m, i, out: self._state.update(deltas=out))

    def _parse_model_output(self, model_output, img_sizes):
        model, raw = self._core, self._state["logits"]  # [B, C, h, w]
        logits = raw.flatten(2).transpose(1, 2)  # [B, cells, C]
        boxes = model.decode(self._state["deltas"], raw.shape[-2:])  # [B, cells, 4]
        outputs = []
        for b, out in enumerate(model_output):  # one image at a time, no loop over detections
            # The cell each returned detection came from: the one whose box it is.
            cell = (out["boxes"][:, None, :] == boxes[b][None, :, :]).all(-1).float().argmax(1)
            outputs.append(
                pyodlog.DetectionOutput(
                    out["boxes"], out["scores"], out["labels"], logits[b][cell], cell, img_sizes[b]
                )
            )
        return outputs


def test_a_logger_written_from_the_specification_returns_per_image_detection_outputs(tmp_path):
    torch.manual_seed(2)
    model = TinyDetector().eval()
    images = [torch.rand(3, 96, 160) for _ in range(3)]
    with SpecDetectorLogger(model, "spec", "v1") as logger, torch.no_grad():
        want = model(images)
        got = logger(images, input_ids=["a", "b", "c"])
        logger(images[:1], input_ids=["d"])  # a one-image batch
        result = pyodlog.open_result(logger.export(tmp_path))
    for g, w in zip(got, want):
        assert all(torch.equal(g[k], w[k]) for k in ("boxes", "scores", "labels"))
    assert result.images["input_id"] == ["a", "b", "c", "d"]
    assert sum(len(w["boxes"]) for w in want) > 10
    for i, w in enumerate(want):
        d = result.image_detections(i)
        assert torch.equal(d.boxes, w["boxes"]) and torch.equal(d.labels, w["labels"])
        torch.testing.assert_close(  # float16 logits by default (RecordStorage)
            d.logits.sigmoid().gather(1, d.labels[:, None]).squeeze(1),
            d.scores,
            rtol=1e-6 if "storage" not in logger.schema else 2**-8,
            atol=0,
        )


class OneDetectionOutput(SpecDetectorLogger):
    """The seed's wording: a (single) DetectionOutput; fine for a one-image batch only."""

    def _parse_model_output(self, model_output, img_sizes):
        return super()._parse_model_output(model_output, img_sizes)[0]


def test_a_single_detection_output_is_taken_for_one_image_and_refused_for_more():
    torch.manual_seed(2)
    model = TinyDetector().eval()
    with OneDetectionOutput(model, "spec", "v1", sink=pyodlog.InMemorySink()) as logger:
        with torch.no_grad():
            logger([torch.rand(3, 64, 64)])
            # Not one per image: the call still answers; the broken contract is reported.
            out = logger([torch.rand(3, 64, 64), torch.rand(3, 64, 64)])
            assert len(out) == 2
        assert re.search(
            r"OneDetectionOutput\._parse_model_output must return a list of one "
            r"pyodlog\.DetectionOutput per image \(2\).*got DetectionOutput",
            logger.stats()["last_logging_error"],
        )
        assert len(logger.sink.records("spec", "v1", logger.result_name)) == 1


def test_detection_batch_from_outputs_pads_and_says_what_does_not_fit():
    def output(n, with_embeddings=True, n_class=3):
        return pyodlog.DetectionOutput(
            torch.rand(n, 4),
            torch.rand(n),
            torch.arange(n),
            torch.rand(n, n_class),
            torch.arange(n),
            (10, 20),
            torch.rand(n, 2) if with_embeddings else None,
        )

    a, b = output(3), output(0)
    batch = pyodlog.DetectionBatch.from_outputs([a, b])
    assert batch.boxes.shape == (2, 3, 4) and batch.counts.tolist() == [3, 0]
    assert batch.labels[1].eq(-1).all() and batch.candidate_index[1].eq(-1).all()
    back = batch.unbind()
    assert torch.equal(back[0].logits, a.logits) and torch.equal(back[0].embeddings, a.embeddings)
    assert len(back[1]) == 0 and back[1].image_size == (10, 20)
    with pytest.raises(ValueError, match="every DetectionOutput of a batch has embeddings or none"):
        pyodlog.DetectionBatch.from_outputs([a, output(2, with_embeddings=False)])
    with pytest.raises(ValueError, match="logits of different widths"):
        pyodlog.DetectionBatch.from_outputs([a, output(2, n_class=4)])
