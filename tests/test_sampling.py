"""Sampling: one unit test per policy, sample weights, determinism, and the logger end to end."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pyodlog
from pyodlog.io.aggregates import summarize_call
from pyodlog.monitoring.sampling import check_sampling
from tests.helpers.records import open_store, synthetic_record
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

RARE = 1e-9  # a rate no image of these tests is drawn at


def summary_of(record, n_class=7):
    return summarize_call(record, n_class)


def peaked(seed, **kwargs):
    """A record whose every detection is certain (one class far above the others), labels 0..2."""
    r = synthetic_record(seed, **kwargs)
    logits = torch.full_like(r.detections.logits, -30.0)
    logits[..., 0] = 30.0
    r.detections.logits = logits
    r.detections.labels = r.detections.labels % 3
    r.detections.counts[:] = r.detections.boxes.shape[1]
    return r


def test_rate_only_keeps_about_rate_of_the_images_with_weight_one_over_rate():
    policy = pyodlog.Sampling(0.1)
    kept = weights = 0
    n = 3000
    for i in range(n):
        s = summary_of(peaked(i, n_images=1, input_ids=[f"img-{i}"]))
        w = policy.decide(s, [f"img-{i}"])
        if w is not None:
            kept += 1
            weights += w
            assert w == pytest.approx(10.0)
    assert abs(kept - 300) <= 4 * math.sqrt(n * 0.1 * 0.9)  # binomial, 4 sigma
    assert abs(weights - n) <= 4 * 10 * math.sqrt(n * 0.1 * 0.9)  # the weighted count is unbiased


def test_deterministic_draws_keep_the_same_images_whatever_the_batching():
    policy = pyodlog.Sampling(0.2, seed=5)
    ids = [f"cam/{i:05d}.jpg" for i in range(400)]
    drawn = {i for i in ids if policy.draw(i) < 0.2}
    again = pyodlog.Sampling(0.2, seed=5)
    assert drawn == {i for i in ids if again.draw(i) < 0.2}  # a rerun draws the same images
    assert drawn != {i for i in ids if pyodlog.Sampling(0.2, seed=6).draw(i) < 0.2}
    kept: set[str] = set()
    for start in range(0, 400, 4):  # batches of 4: a call is kept when one of its images is drawn
        batch = ids[start : start + 4]
        w = policy.decide(summary_of(peaked(start, n_images=4, input_ids=batch)), batch)
        if w is not None:
            kept.update(batch)
            assert w == pytest.approx(1 / (1 - 0.8**4))
        else:
            assert not drawn & set(batch)
    assert drawn <= kept


def test_random_draws_are_reproducible_from_their_seed():
    def decisions(seed):
        policy = pyodlog.Sampling(0.3, deterministic=False, seed=seed)
        s = summary_of(peaked(0))
        return [policy.decide(s, ["same-id", "x"]) is not None for _ in range(200)]

    assert decisions(1) == decisions(1)
    assert decisions(1) != decisions(2)
    assert 0 < sum(decisions(1)) < 200  # the same id is not always kept: draws are random


def test_near_misses_are_always_kept_when_the_record_has_them():
    policy = pyodlog.Sampling(RARE, keep_near_misses=True)
    record = peaked(0)
    assert policy.decide(summary_of(record), record.input_ids) is None
    record.detections.near_misses = SimpleNamespace(
        counts=torch.tensor([0, 2])
    )  # issue 14's near-misses
    assert policy.always_keeps(summary_of(record)) == "near_miss"
    # Opt-in: the default policy (and sampling=0.01) is the rate alone.
    assert pyodlog.Sampling(RARE).always_keeps(summary_of(record)) is None
    assert pyodlog.Sampling(RARE).decide(summary_of(record), record.input_ids) is None
    assert check_sampling(0.01).keep_near_misses is False
    assert policy.decide(summary_of(record), record.input_ids) == 1.0
    record.detections.near_misses = SimpleNamespace(counts=torch.tensor([0, 0]))
    assert policy.decide(summary_of(record), record.input_ids) is None
    record.detections.near_misses = SimpleNamespace(counts=torch.tensor([1, 0]))
    off = pyodlog.Sampling(RARE, keep_near_misses=False)
    assert off.decide(summary_of(record), record.input_ids) is None


def test_a_real_logger_keeps_every_call_with_near_misses(tmp_path):
    """Issue 14's near-misses (a real RetinaNet logging them) drive issue 22's sampling."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=160, max_size=160
    ).eval()
    logger = pyodlog.create_logger(
        model,
        "rn",
        "v1",
        sink=pyodlog.HDF5Store(tmp_path),
        score_thresh=0.0102,
        near_miss=8,
        sampling=pyodlog.Sampling(RARE, keep_near_misses=True),
        metrics=False,
    )
    with torch.inference_mode():
        for i in range(3):
            logger([torch.rand(3, 160, 160)], input_ids=[f"img-{i}"])
    logger.wait_for_save()
    stats = logger.stats()
    directory = logger.sink.directory
    logger.close()
    result = pyodlog.open_result(directory)
    kept_with_near_misses = int((result.images["nm_count"] > 0).sum())
    # Every call had near-misses (random weights: many candidates just under the threshold).
    assert kept_with_near_misses == len(result) == 3 and stats["sampled_out"] == 0
    assert (result.images["sample_weight"] == 1.0).all()


@pytest.mark.parametrize("measure, threshold", [("entropy", 0.5), ("margin", 0.2)])
def test_uncertain_detections_are_always_kept(measure, threshold):
    policy = pyodlog.Sampling(RARE, keep_uncertain={measure: threshold})
    record = peaked(0)
    assert policy.decide(summary_of(record), record.input_ids) is None
    record.detections.logits[1, 2] = 0.0  # one detection with uniform class probabilities
    assert policy.always_keeps(summary_of(record)) == "uncertain"
    assert policy.decide(summary_of(record), record.input_ids) == 1.0
    # Uncertainty columns the record carries (issue 14) are used as they are.
    record = peaked(1)
    shape = record.detections.scores.shape
    if measure == "entropy":
        record.detections.entropy = torch.full(shape, 0.9 * math.log(7))  # nats
    else:
        record.detections.margin = torch.full(shape, 0.05)
    assert policy.always_keeps(summary_of(record)) == "uncertain"


def test_watched_classes_are_always_kept():
    record = peaked(0)  # labels 0..2
    assert (
        pyodlog.Sampling(RARE, watch_classes=[5, 6]).decide(summary_of(record), record.input_ids)
        is None
    )
    record.detections.labels[0, 0] = 6
    policy = pyodlog.Sampling(RARE, watch_classes=[6])
    assert policy.always_keeps(summary_of(record)) == "watched_class"
    # A padding row (beyond the image's count) is not a detection.
    record.detections.counts[0] = 0
    assert policy.always_keeps(summary_of(record)) is None


def test_dataset_types_other_than_deploying_are_always_kept():
    record = peaked(0, dataset_type="val")
    assert pyodlog.Sampling(RARE).decide(summary_of(record), record.input_ids) == 1.0
    off = pyodlog.Sampling(RARE, keep_other_dataset_types=False)
    assert off.decide(summary_of(record), record.input_ids) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rate": 0.0}, r"rate must be a number in \(0, 1\]"),
        ({"rate": 1.5}, r"rate must be a number in \(0, 1\]"),
        ({"rate": 0.1, "keep_uncertain": {"energy": 1.0}}, "use 'entropy'"),
        ({"rate": 0.1, "keep_uncertain": {"margin": 2}}, r"must be in \[0, 1\]"),
        ({"rate": 0.1, "watch_classes": "person"}, "list of class labels"),
        ({"rate": 0.1, "watch_classes": [1.5]}, "class labels"),
        ({"rate": 0.1, "deterministic": 1}, "True or False"),
    ],
)
def test_sampling_validates_its_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pyodlog.Sampling(**kwargs)


@pytest.mark.parametrize("sampling", ["1%", 0, 2.0, True])
def test_the_logger_refuses_a_bad_sampling_argument(sampling):
    with pytest.raises(ValueError, match="sampling"):
        TinyDetectorLogger(
            TinyDetector().eval(), "tiny", "v1", sink=pyodlog.InMemorySink(), sampling=sampling
        )


def test_a_store_writes_the_kept_calls_with_their_weights_and_counts_the_others(tmp_path):
    store = open_store(tmp_path)
    policy = pyodlog.Sampling(0.25, watch_classes=[6])
    records = []
    for seed in range(40):
        r = peaked(seed, n_images=2)
        if seed % 10 == 0:
            r.detections.labels[0, 0] = 6  # always kept
        r.sampling = policy
        records.append(r)
        store.submit(r)
    store.wait_for_save()
    stats = store.stats()
    store.close()
    expected = [policy.decide(summary_of(r), r.input_ids) for r in records]
    kept = [r for r, w in zip(records, expected) if w is not None]
    assert stats["sampled_out"] == 40 - len(kept) > 0 and stats["written"] == len(kept)
    assert stats["submitted"] == stats["written"] + stats["sampled_out"] + stats["queued"]
    res = pyodlog.open_result(tmp_path / "m/v/r")
    assert res.images["input_id"] == [i for r in kept for i in r.input_ids]
    want = np.repeat([w for w in expected if w is not None], 2).astype(np.float32)
    np.testing.assert_array_equal(res.images["sample_weight"], want)
    assert res.images["sample_weight"][:2].tolist() == [1.0, 1.0]  # seed 0: a watched class


def test_a_logger_with_sampling_writes_a_sample_and_its_aggregates_count_every_call():
    model = TinyDetector().eval()
    with (
        torch.no_grad(),
        TinyDetectorLogger(model, "tiny", "v1", sampling=0.2, score_thresh=0.0) as logger,
    ):
        for i in range(30):
            logger([torch.rand(3, 32, 32)], input_ids=[f"frame-{i}"])
        logger([torch.rand(3, 32, 32)], input_ids=["val-0"], dataset_type="val")
        logger.wait_for_save()
        stats = logger.stats()
        directory = logger.sink.directory
    res = pyodlog.open_result(directory)
    policy = pyodlog.Sampling(0.2)
    drawn = [f"frame-{i}" for i in range(30) if policy.draw(f"frame-{i}") < 0.2]
    assert res.images["input_id"] == drawn + ["val-0"]  # deterministic: exactly the drawn frames
    assert stats["sampled_out"] == 30 - len(drawn) and stats["logging_errors"] == 0
    assert res.images["sample_weight"].tolist() == [5.0] * len(drawn) + [1.0]
    totals = res.aggregates().totals()
    assert (
        totals["calls"] == 31
        and totals["images"] == 31
        and totals["sampled_calls"] == len(drawn) + 1
    )
    assert res.aggregates().totals(dataset_type="val")["calls"] == 1


def test_the_readme_production_example_runs():
    from tests.helpers.readme_blocks import block_starting_with

    namespace: dict = {}
    exec(
        compile(
            block_starting_with("# production-example"), "README.md:production-example", "exec"
        ),
        namespace,
    )
    assert namespace["totals"]["calls"] == 13
    weights = namespace["result"].images["sample_weight"]
    assert len(weights) == len(namespace["result"]) >= 1 and weights[-1] == 1.0  # the val call


def test_a_policy_pickles_with_its_record_for_the_quarantine():
    import pickle

    policy = pyodlog.Sampling(0.3, deterministic=False, watch_classes=[2], seed=4)
    record = peaked(0)
    record.sampling = policy
    back = pickle.loads(pickle.dumps(record)).sampling
    assert back.to_dict() == policy.to_dict()
    assert back.decide(summary_of(record), ["a"]) == policy.decide(summary_of(record), ["a"])


def test_segments_without_weights_read_as_weight_one_beside_weighted_ones(tmp_path):
    from pyodlog.io.export import write_tables
    from pyodlog.io.reader import read_segment
    from pyodlog.io.segment import write_checksum

    store = open_store(tmp_path, storage="float32")
    policy = pyodlog.Sampling(0.5)
    for seed in range(6):
        r = peaked(seed)
        r.sampling = policy
        store.submit(r)
    store.close()
    directory = tmp_path / "m/v/r"
    (segment,) = directory.glob("*.h5")
    # The same rows as an older writer stored them: no sample_weight column, no aggregates.
    tables = read_segment(segment)
    del tables.numeric["images/sample_weight"]
    tables.aggregates = []
    older = directory / ("seg-00000000000000000001-r000-p1-000000-000001.h5")
    write_tables(older, tables, dict(tables.attrs, segment_format=2))
    write_checksum(older)
    res = pyodlog.open_result(directory, strict=True)
    n = len(tables.strings["images/input_id"])
    weights = res.images["sample_weight"]
    assert len(res) == 2 * n and len(weights) == 2 * n
    assert weights[:n].tolist() == [1.0] * n  # the older segment sorts first
    assert weights[n:].tolist() == read_segment(segment).numeric["images/sample_weight"].tolist()
    assert res.aggregates().totals()["calls"] == 6  # only the newer segment has aggregates
