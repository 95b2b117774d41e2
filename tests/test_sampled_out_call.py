"""A call sampling leaves out is decided before its model runs and does only what the aggregates
need (issue 22): no features compressed, no near-misses, no thumbnails; the aggregates still
count it exactly as a fully logged call."""

from __future__ import annotations

import math
import pickle
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision

import pyodlog
from pyodlog.models.torchvision_rcnn import TorchvisionRCNNLogger
from pyodlog.monitoring.deferred import DeferredBudget, DeferredDetections
from pyodlog.monitoring.sampling import CallDecision
from pyodlog.structures import DetectionBatch
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

RARE = 1e-9  # a rate no image of these tests is drawn at
FRAMES = 12


def _frames():
    g = torch.Generator().manual_seed(5)
    return [torch.rand(3, 64, 64, generator=g) for _ in range(FRAMES)]


def _run(tmp_path, name, sampling):
    torch.manual_seed(0)
    model = TinyDetector().eval()
    logger = TinyDetectorLogger(
        model,
        "tiny",
        name,
        sink=pyodlog.HDF5Store(tmp_path / name),
        score_thresh=0.0,
        sampling=sampling,
        target_layers={"stem": "backbone.0"},
        log_images={"max_side": 32},
        metrics=False,
    )
    with torch.inference_mode():
        for i, frame in enumerate(_frames()):
            logger([frame], input_ids=[f"frame-{i}"])
            # What the user reads from the hooks is there either way.
            assert logger.get_hooked_features("stem").shape[1] == 8
        logger([_frames()[0]], input_ids=["val-0"], dataset_type="val")
    logger.wait_for_save()
    stats = logger.stats()
    directory = logger.sink.directory
    logger.close()
    return stats, pyodlog.open_result(directory)


def test_sampled_out_calls_write_nothing_and_count_in_the_aggregates_exactly(tmp_path):
    full_stats, full = _run(tmp_path, "full", None)
    stats, sampled = _run(tmp_path, "sampled", pyodlog.Sampling(RARE, keep_near_misses=False))
    assert full_stats["written"] == FRAMES + 1 and stats["written"] == 1  # only the val call
    assert stats["sampled_out"] == FRAMES and stats["logging_errors"] == 0
    # stats() and its Prometheus form count the sampled-out calls (they were 0 before).
    assert (stats["calls_seen"], stats["calls_logged"], stats["calls_sampled_out"]) == (
        FRAMES + 1,
        1,
        FRAMES,
    )
    assert full_stats["calls_sampled_out"] == 0 and full_stats["calls_logged"] == FRAMES + 1
    assert sampled.images["input_id"] == ["val-0"]
    assert sampled.images["sample_weight"].tolist() == [1.0]
    assert "stem" in sampled.feature_names()  # the kept call has its features
    # Every histogram, count and sketch equals the fully logged run's: only sampled_calls differ.
    a, b = full.aggregates().to_dict(), sampled.aggregates().to_dict()
    for group_a, group_b in zip(a["groups"], b["groups"]):
        group_a.pop("sampled_calls"), group_b.pop("sampled_calls")
    assert a == b
    assert sampled.aggregates().totals()["calls"] == FRAMES + 1
    assert sampled.aggregates().totals()["sampled_calls"] == 1


def test_the_record_of_a_sampled_out_call_holds_only_what_the_aggregates_need():
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.01
    ).eval()
    sink = pyodlog.InMemorySink()
    logger = pyodlog.create_logger(
        model,
        "frcnn",
        "v1",
        sink=sink,
        sampling=pyodlog.Sampling(RARE, keep_near_misses=False),
        target_layers={"fpn": "backbone.fpn.layer_blocks.0"},
        metrics=False,
    )
    image = [torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(1))]
    with torch.inference_mode():
        out = logger(image, input_ids=["a"])
        logger(image, input_ids=["b"], dataset_type="val")  # kept whatever its draw
    stats = logger.stats()
    logger.close()
    # A sink without a policy of its own: the logger counts the call it sampled out.
    assert (stats["calls_seen"], stats["calls_logged"], stats["calls_sampled_out"]) == (2, 1, 1)
    out_record, kept_record = sink.records("frcnn", "v1", logger.result_name)
    assert isinstance(out_record.sampling, CallDecision) and out_record.sampling.sampled_out
    assert out_record.sampling.decide(None, ["a"]) is None
    assert out_record.features == {} and out_record.detections.near_misses is None
    # The detections, their logits and embeddings (what the aggregates summarise) are there.
    det = out_record.detections
    n = int(det.counts[0])
    assert n == len(out[0]["scores"]) > 0
    assert torch.equal(det.boxes[0, :n], out[0]["boxes"])
    assert torch.equal(det.scores[0, :n], out[0]["scores"])
    assert det.logits.shape[-1] == 91 and det.embeddings is not None
    assert (det.candidate_index[0, :n] >= 0).all()
    # The kept call: everything, as without sampling.
    assert not kept_record.sampling.sampled_out
    assert "fpn" in kept_record.features and kept_record.detections.near_misses is not None


def test_the_draw_is_made_once_on_the_call_path_and_pickles_with_the_record():
    policy = pyodlog.Sampling(0.5, deterministic=False, seed=3, keep_near_misses=False)
    reference = pyodlog.Sampling(0.5, deterministic=False, seed=3)
    decisions = [policy.before_call("deploying", ["same-id"], True) for _ in range(50)]
    assert [d.drawn for d in decisions] == [reference.drawn(["same-id"]) for _ in range(50)]
    assert [d.sampled_out for d in decisions] == [not d.drawn for d in decisions]
    # The writer asks the decision, which does not draw again.
    quiet = SimpleNamespace(
        dataset_type="deploying",
        has_near_miss=False,
        labels=np.zeros(0, np.int64),
        entropy=np.zeros(0, np.float32),
        margin=np.zeros(0, np.float32),
    )
    weights = [d.decide(quiet, ["same-id"]) for d in decisions if d.drawn]
    assert weights == [2.0] * len(weights)
    back = pickle.loads(pickle.dumps(decisions[0]))
    assert (back.drawn, back.sampled_out, back.to_dict()) == (
        decisions[0].drawn,
        decisions[0].sampled_out,
        policy.to_dict(),
    )
    # A rule that looks at the output keeps the call undecided until the writer summarises it.
    watching = pyodlog.Sampling(RARE, watch_classes=[1], keep_near_misses=False)
    assert not watching.before_call("deploying", ["x"], False).sampled_out
    nm_rule = pyodlog.Sampling(RARE, keep_near_misses=True)
    assert not nm_rule.before_call("deploying", ["x"], True).sampled_out
    assert nm_rule.before_call("deploying", ["x"], False).sampled_out
    # The default is the rate alone: near-misses logged or not, a call not drawn is out at once.
    assert pyodlog.Sampling(RARE).before_call("deploying", ["x"], True).sampled_out
    assert pyodlog.Sampling(RARE).before_call("deploying", ["x"], False).sampled_out
    assert not pyodlog.Sampling(RARE).before_call("val", ["x"], False).sampled_out
    assert np.isclose(policy.drawn_weight(2), 1 / 0.75)


# -- the parse of a sampled-out call runs on the writer thread (issue 22, sampling2) -------------


class _ThreadRecording:
    """A logger subclass mixin that notes the thread each parse runs on (the real parse runs)."""

    def _parse_model_output(self, model_output, img_sizes):
        self.parse_threads.append(threading.current_thread() is threading.main_thread())
        return super()._parse_model_output(model_output, img_sizes)


def _rcnn_run(tmp_path, name, sampling, *, mutate=False, logger_class=None, defer_parse=True):
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.01
    ).eval()
    cls = logger_class or type(
        "RecordingRCNN",
        (_ThreadRecording, TorchvisionRCNNLogger),
        {"parse_threads": None, "defer_parse": defer_parse},
    )
    logger = cls(
        model,
        "frcnn",
        name,
        sink=pyodlog.HDF5Store(tmp_path / name),
        sampling=sampling,
        metrics=False,
    )
    logger.parse_threads = []
    g = torch.Generator().manual_seed(3)
    frames = [torch.rand(3, 160, 160, generator=g) for _ in range(6)]
    with torch.inference_mode():
        for i, frame in enumerate(frames):
            out = logger([frame], input_ids=[f"f{i}"])
            assert len(out[0]["scores"]) > 0
            if mutate:  # the caller changes what it got back, in place: the log must not see it
                out[0]["boxes"] += 1000.0
                out[0]["scores"].zero_()
                out[0]["labels"].fill_(3)
    logger.wait_for_save()
    stats = logger.stats()
    directory = logger.sink.directory
    threads = list(logger.parse_threads)
    logger.close()
    return stats, pyodlog.open_result(directory), threads


def _without_sampled_calls(aggregates):
    a = aggregates.to_dict()
    for group in a["groups"]:
        group.pop("sampled_calls")
    return a


def _assert_same(a, b, where="aggregates"):
    """Equal, counts exactly; the embedding sketch's float64 sums up to their rounding (the writer
    sums the calls of each flush together, and flushes fall differently in two runs)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and "sketch" in where:
        assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12), (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_a_sampled_out_rcnn_call_is_parsed_on_the_writer_thread_with_the_same_aggregates(tmp_path):
    _, full, full_threads = _rcnn_run(tmp_path, "full", None, defer_parse=False)
    stats, sampled, threads = _rcnn_run(tmp_path, "sampled", pyodlog.Sampling(RARE), mutate=True)
    assert full_threads == [True] * 6  # defer_parse=False: parsed on the call path
    assert threads == [False] * 6  # sampled out: parsed by the writer, not by the caller
    assert stats["sampled_out"] == 6 and stats["written"] == 0
    assert stats["logging_errors"] == 0 and stats["quarantined"] == 0
    # The aggregates are those of the same calls fully logged, although the caller changed its
    # output in place right after each call (the call kept its own copy of the detections).
    _assert_same(
        _without_sampled_calls(sampled.aggregates()), _without_sampled_calls(full.aggregates())
    )
    assert sampled.aggregates().totals()["calls"] == 6


def test_a_deferred_parse_that_fails_is_counted_not_raised(tmp_path):
    class Failing(TorchvisionRCNNLogger):
        def _parse_model_output(self, model_output, img_sizes):
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("parse failed on the writer")
            return super()._parse_model_output(model_output, img_sizes)

    stats, result, _ = _rcnn_run(
        tmp_path,
        "failing",
        pyodlog.Sampling(RARE),
        logger_class=type("RecordingFailing", (_ThreadRecording, Failing), {"parse_threads": None}),
    )
    # Every call returned its output; the parse failures are counted and the calls kept aside.
    assert stats["logging_errors"] == 6 and stats["quarantined"] == 6
    assert "parse failed on the writer" in stats["last_logging_error"]
    assert result.aggregates().totals()["calls"] == 0


def test_deferred_detections_parse_once_and_hold_a_bounded_budget():
    made = []
    batch = DetectionBatch(
        torch.zeros(1, 1, 4),
        torch.ones(1, 1),
        torch.zeros(1, 1, dtype=torch.long),
        torch.zeros(1, 1, 3),
        torch.zeros(1, 1, dtype=torch.long),
        torch.ones(1, dtype=torch.long),
        [(8, 8)],
    )
    held = [torch.zeros(1000)]
    budget = DeferredBudget(6000)
    assert budget.take(4000) and not budget.take(4000) and budget.refused == 1
    deferred = DeferredDetections(
        lambda: made.append(1) or batch, held, lambda: budget.give_back(4000)
    )
    assert isinstance(deferred, DetectionBatch) and not deferred.parsed
    assert deferred.all_tensors() == held and made == []  # the store's hand-over parses nothing
    # Another thread (the store's writer taking the record) that lists its tensors parses it.
    seen = []
    reader = threading.Thread(target=lambda: seen.append(deferred.all_tensors()))
    reader.start()
    reader.join()
    assert made == [1] and seen[0][0] is batch.boxes and budget.held == 0
    assert torch.equal(deferred.scores, batch.scores) and deferred.embeddings is None
    assert torch.equal(deferred.counts, batch.counts) and made == [1]  # once
    assert deferred.parsed and deferred.all_tensors()[0] is batch.boxes
    back = pickle.loads(pickle.dumps(deferred))
    assert type(back) is DetectionBatch and torch.equal(back.scores, batch.scores)
    assert budget.take(6000)  # the bound is free again


def test_prometheus_counts_the_sampled_out_calls(tmp_path):
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    torch.manual_seed(0)
    logger = TinyDetectorLogger(
        TinyDetector().eval(),
        "tiny",
        "v1",
        result_name="run",
        sink=pyodlog.HDF5Store(tmp_path),
        score_thresh=0.0,
        sampling=0.5,  # the rate alone: about half the calls are sampled out before they run
        metrics=registry,
    )
    with torch.inference_mode():
        for i, frame in enumerate(_frames()):
            logger([frame], input_ids=[f"frame-{i}"])
    logger.wait_for_save()
    stats = logger.stats()
    labels = {"model": "tiny", "version": "v1", "result": "run", "rank": "0"}

    scraped = {
        name: registry.get_sample_value(f"pyodlog_{name}_total", labels)
        for name in ("calls_seen", "calls_sampled_out", "calls_logged")
    }
    out = sum(logger._sampling.draw(f"frame-{i}") >= 0.5 for i in range(FRAMES))
    logger.close()
    assert 0 < out < FRAMES
    assert stats["calls_sampled_out"] == stats["sampled_out"] == out
    assert stats["calls_logged"] == stats["written"] == FRAMES - out
    assert stats["calls_seen"] == FRAMES
    assert scraped == {"calls_seen": FRAMES, "calls_sampled_out": out, "calls_logged": FRAMES - out}


def test_sampled_out_calls_past_the_bound_or_with_autograd_history_are_parsed_on_their_path(
    tmp_path,
):
    cls = type(
        "RecordingTiny",
        (_ThreadRecording, TinyDetectorLogger),
        {"parse_threads": None, "max_deferred_bytes": 1},
    )
    torch.manual_seed(0)
    logger = cls(
        TinyDetector().eval(),
        "tiny",
        "bound",
        sink=pyodlog.HDF5Store(tmp_path),
        score_thresh=0.0,
        sampling=pyodlog.Sampling(RARE),
        metrics=False,
    )
    logger.parse_threads = []
    frames = _frames()
    with torch.inference_mode():
        logger([frames[0]], input_ids=["a"])  # nothing unparsed yet: deferred
    logger.wait_for_save()
    assert logger.parse_threads == [False] and logger._deferred_budget.held == 0
    assert logger._deferred_budget.take(1)  # as if another call's captures held the whole bound
    with torch.inference_mode():
        for i in range(2):
            logger([frames[i + 1]], input_ids=[f"b{i}"])
    logger._deferred_budget.give_back(1)
    logger([frames[3]], input_ids=["grad"])  # autograd on: its captures hold a graph
    logger.wait_for_save()
    stats = logger.stats()
    directory = logger.sink.directory
    logger.close()
    assert logger.parse_threads == [False, True, True, True]
    assert logger._deferred_budget.refused == 2
    assert stats["calls_sampled_out"] == 4 and stats["logging_errors"] == 0
    assert pyodlog.open_result(directory).aggregates().totals()["calls"] == 4
