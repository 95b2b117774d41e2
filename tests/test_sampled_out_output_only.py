"""``Sampling(sampled_out_aggregates="output")`` (issue 22): a call sampled out before its model
runs is not parsed; the aggregates still count it exactly for what the model returned (calls,
images, detections, score, box-size and detections-per-image histograms), while the entropy and
margin histograms and the embedding sketch count the kept calls only."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision

import pyodlog
from pyodlog.models.torchvision_rcnn import TorchvisionRCNNLogger
from pyodlog.monitoring.sampling import CallDecision
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

RARE = 1e-9  # a rate no image of these tests is drawn at
EXACT = ("calls", "images", "detections", "sampled_calls", "detections_per_image", "score")


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "fasterrcnn":
        return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, box_score_thresh=0.0
        ).eval()
    return torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, score_thresh=0.0
    ).eval()


def _frames(n: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    # Batches of one and of two images, of other sizes than the logged img_sizes.
    return [[torch.rand(3, 150, 200, generator=g) for _ in range(1 + i % 2)] for i in range(n)]


def _logged(tmp_path, model, mode: str, rate: float, frames):
    logger = pyodlog.create_logger(
        model,
        "m",
        mode,
        sink=pyodlog.HDF5Store(tmp_path / mode),
        sampling=pyodlog.Sampling(rate, sampled_out_aggregates=mode),
        metrics=False,
    )
    with torch.inference_mode():
        for i, images in enumerate(frames):
            ids = [f"f{i}-{j}" for j in range(len(images))]
            logger(images, input_ids=ids, img_sizes=[(300, 400)] * len(images))
        logger(frames[0], input_ids=["val"] * len(frames[0]), dataset_type="val")
    logger.wait_for_save()
    stats = logger.stats()
    directory = logger.sink.directory
    logger.close()
    return stats, pyodlog.open_result(directory)


@pytest.mark.parametrize("family", ["fasterrcnn", "ssdlite"])
def test_output_aggregates_count_every_call_and_the_kept_calls_uncertainty(tmp_path, family):
    model = _model(family)
    frames = _frames(8)
    all_stats, everything = _logged(tmp_path, model, "all", 0.3, frames)
    out_stats, output = _logged(tmp_path, model, "output", 0.3, frames)
    # The same draw (a hash of the ids): the same calls kept, the same rows written.
    assert all_stats["calls_sampled_out"] == out_stats["calls_sampled_out"] > 0
    assert out_stats["logging_errors"] == all_stats["logging_errors"] == 0
    assert list(output.images["input_id"]) == list(everything.images["input_id"])
    a, o = everything.aggregates(), output.aggregates()
    for label in (None, 1, 2):
        ta, to = a.totals(label=label), o.totals(label=label)
        for key in EXACT:
            assert ta[key] == to[key], (label, key)
        # Box sizes in the logged img_sizes' pixels, as a parsed call logs them.
        assert ta["box_size"] == to["box_size"], label
    total = a.totals()
    assert total["detections"] > 0 and sum(total["entropy"]) == total["detections"]
    # Uncertainty and embeddings: the kept calls' detections only (the rows written).
    kept_rows = len(output.detections["scores"])
    assert 0 < kept_rows < total["detections"]
    ot = o.totals()
    assert sum(ot["entropy"]) == sum(ot["margin"]) == kept_rows
    sketched = sum(float(g.sketch_n.sum()) for g in o.groups.values())
    if family == "fasterrcnn":  # (SSD logs no embeddings)
        assert sketched == kept_rows
        assert sum(float(g.sketch_n.sum()) for g in a.groups.values()) == total["detections"]
    # A kept call is the same in both.
    np.testing.assert_array_equal(output.detections["entropy"], everything.detections["entropy"])


def test_the_record_holds_the_returned_detections_only():
    model = _model("fasterrcnn")
    sink = pyodlog.InMemorySink()
    logger = pyodlog.create_logger(
        model,
        "frcnn",
        "v1",
        sink=sink,
        sampling=pyodlog.Sampling(RARE, sampled_out_aggregates="output"),
        target_layers={"fpn": "backbone.fpn.layer_blocks.0"},
        metrics=False,
    )
    images = [torch.rand(3, 160, 200, generator=torch.Generator().manual_seed(1))]
    with torch.inference_mode():
        out = logger(images, input_ids=["a"], img_sizes=[(320, 400)])
        # What the user reads from the hooks is there all the same.
        assert logger.get_hooked_features("fpn").dim() == 4
        expected_boxes = out[0]["boxes"] * 2  # img_sizes twice the input's
        out[0]["scores"].zero_()  # the caller changes the output afterwards: the record has a copy
    stats = logger.stats()
    logger.close()
    assert (stats["calls_seen"], stats["calls_sampled_out"], stats["logging_errors"]) == (1, 1, 0)
    (record,) = sink.records("frcnn", "v1", logger.result_name)
    assert isinstance(record.sampling, CallDecision) and record.sampling.output_only
    det = record.detections
    n = int(det.counts[0])
    assert det.output_only and n == len(out[0]["labels"]) > 0
    torch.testing.assert_close(det.boxes[0, :n], expected_boxes)
    assert torch.equal(det.labels[0, :n], out[0]["labels"])
    assert bool((det.scores[0, :n] > 0).all())
    assert det.logits.shape[-1] == 0 and det.embeddings is None and det.entropy is None
    assert bool((det.candidate_index == -1).all()) and det.near_misses is None
    assert record.features == {}


def test_a_family_that_cannot_read_its_output_unparsed_is_parsed(tmp_path):
    """The README's custom family has no output-only reader: its sampled-out calls are parsed
    (as with "all"), so its uncertainty histograms count every call."""
    torch.manual_seed(0)
    logger = TinyDetectorLogger(
        TinyDetector().eval(),
        "tiny",
        "t",
        sink=pyodlog.HDF5Store(tmp_path / "t"),
        score_thresh=0.0,
        sampling=pyodlog.Sampling(RARE, sampled_out_aggregates="output"),
        metrics=False,
    )
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for i in range(4):
            logger([torch.rand(3, 64, 64, generator=g)], input_ids=[f"i{i}"])
    logger.wait_for_save()
    assert logger.stats()["calls_sampled_out"] == 4
    directory = logger.sink.directory
    logger.close()
    totals = pyodlog.open_result(directory).aggregates().totals()
    assert totals["detections"] > 0 and sum(totals["entropy"]) == totals["detections"]


def test_the_setting_is_checked_shown_and_kept():
    with pytest.raises(ValueError, match="sampled_out_aggregates='none'.*'all'.*'output'"):
        pyodlog.Sampling(0.1, sampled_out_aggregates="none")
    policy = pyodlog.Sampling(0.1, sampled_out_aggregates="output")
    assert "sampled_out_aggregates='output'" in repr(policy)
    assert policy.to_dict()["sampled_out_aggregates"] == "output"
    assert pickle.loads(pickle.dumps(policy)).sampled_out_aggregates == "output"
    assert pyodlog.Sampling(0.1).sampled_out_aggregates == "all"
    # A policy pickled before the setting existed (a quarantined record) reads as "all".
    old = pyodlog.Sampling(0.1)
    state = old.__getstate__()
    del state["sampled_out_aggregates"]
    revived = pyodlog.Sampling.__new__(pyodlog.Sampling)
    revived.__setstate__(state)
    assert revived.sampled_out_aggregates == "all"
    # Kept calls and calls an output rule may keep are never output-only.
    assert not CallDecision(policy, drawn=True, sampled_out=False).output_only
    assert CallDecision(policy, drawn=False, sampled_out=True).output_only
    assert not CallDecision(pyodlog.Sampling(0.1), drawn=False, sampled_out=True).output_only


@pytest.mark.parametrize("case", ["no detections", "bfloat16 autocast, a NaN image"])
def test_empty_and_low_precision_outputs_are_counted(tmp_path, case):
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None,
        weights_backbone=None,
        box_score_thresh=0.999 if case == "no detections" else 0.0,
    ).eval()
    logger = pyodlog.create_logger(
        model,
        "m",
        "e",
        sink=pyodlog.HDF5Store(tmp_path / "e"),
        sampling=pyodlog.Sampling(RARE, sampled_out_aggregates="output"),
        metrics=False,
    )
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 150, 200, generator=g), torch.full((3, 120, 160), float("nan"))]
    with (
        torch.inference_mode(),
        torch.autocast("cpu", torch.bfloat16, enabled=case != "no detections"),
    ):
        out = logger(images)
    logger.wait_for_save()
    stats = logger.stats()
    directory = logger.sink.directory
    logger.close()
    assert stats["logging_errors"] == stats["aggregate_errors"] == 0
    totals = pyodlog.open_result(directory).aggregates().totals()
    counts = [len(o["scores"]) for o in out]
    assert (totals["calls"], totals["images"], totals["detections"]) == (1, 2, sum(counts))
    assert sum(totals["score"]) == sum(totals["box_size"]) == sum(counts)
    assert sum(totals["entropy"]) == 0 and sum(totals["detections_per_image"]) == 2


class _CollapseLabels(TorchvisionRCNNLogger):
    """A deployment's subclass whose parse maps every class to 1 ("object")."""

    def _parse_model_output(self, model_output, img_sizes):
        batch = super()._parse_model_output(model_output, img_sizes)
        batch.labels = torch.where(batch.labels >= 0, torch.ones_like(batch.labels), batch.labels)
        return batch


class _DictInput(TorchvisionRCNNLogger):
    """A subclass called with ``{"images": [...]}``."""

    def _call_image_sizes(self, model_input, kwargs):
        return super()._call_image_sizes(model_input["images"], kwargs)

    def _run_model(self, model_input):
        return self.model(model_input["images"])


@pytest.mark.parametrize("cls", [_CollapseLabels, _DictInput])
def test_a_subclass_that_reads_its_calls_otherwise_is_parsed(tmp_path, cls):
    """The output-only reader is the family's own: a subclass that changes the parse, the input
    or how the model runs has its sampled-out calls parsed (its aggregates as with "all")."""
    totals = {}
    for mode in ("all", "output"):
        logger = cls(
            _model("fasterrcnn"),
            "m",
            mode,
            sink=pyodlog.HDF5Store(tmp_path / mode),
            sampling=pyodlog.Sampling(RARE, sampled_out_aggregates=mode),
            metrics=False,
        )
        g = torch.Generator().manual_seed(1)
        with torch.inference_mode():
            for i in range(2):
                images = [torch.rand(3, 150, 200, generator=g)]
                logger({"images": images} if cls is _DictInput else images, input_ids=[f"x{i}"])
        logger.wait_for_save()
        stats = logger.stats()
        assert stats["logging_errors"] == 0 and stats["calls_sampled_out"] == 2
        directory = logger.sink.directory
        logger.close()
        aggregates = pyodlog.open_result(directory).aggregates()
        totals[mode] = (aggregates.totals(), aggregates.totals(label=1))
    for a, o in zip(totals["all"], totals["output"]):
        for key in (*EXACT, "entropy", "margin", "box_size"):
            assert a[key] == o[key], key
    assert totals["output"][0]["detections"] > 0
    if cls is _CollapseLabels:
        assert totals["output"][1]["detections"] == totals["output"][0]["detections"]


def test_a_sampled_out_call_whose_summary_fails_is_never_written(tmp_path, monkeypatch):
    """Counted in aggregate_errors and left out: its record (no logits) never becomes rows."""
    import pyodlog.io.writer as writer

    def failing(*args, **kwargs):
        raise RuntimeError("injected summary fault")

    monkeypatch.setattr(writer, "summarize_calls", failing)
    monkeypatch.setattr(writer, "summarize_call", failing)
    logger = pyodlog.create_logger(
        _model("fasterrcnn"),
        "m",
        "v",
        sink=pyodlog.HDF5Store(tmp_path / "v"),
        sampling=pyodlog.Sampling(RARE, sampled_out_aggregates="output"),
        metrics=False,
    )
    with torch.inference_mode():
        logger([torch.rand(3, 150, 200)], input_ids=["a"])
    logger.wait_for_save()
    stats = logger.stats()
    logger.close()
    assert (stats["sampled_out"], stats["quarantined"], stats["written"]) == (1, 0, 0)
    assert stats["aggregate_errors"] >= 1
