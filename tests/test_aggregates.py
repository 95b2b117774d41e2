"""Always-on aggregates: exact counts over a sampled run, the sketch, merging, the stored form."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

import pyodlog
from pyodlog.io.aggregates import (
    BINS,
    SKETCH_DIM,
    SKETCH_SEED,
    Aggregates,
    summarize_call,
    uncertainty,
)
from pyodlog.io.segment import write_checksum
from pyodlog.io.writer import WriterConfig
from pyodlog.ops.compression import random_projection
from pyodlog_collector.segment_check import check_segment
from tests.helpers.collector_process import KEY_A, CollectorProcess, write_keys
from tests.helpers.records import open_store, synthetic_record, valid_rows
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

N_CLASS = 7


def sampled_run(tmp_path, n_calls=24, rate=0.2, config=None, rank=0, dataset_types=("deploying",)):
    """Records logged through a real store with sampling; returns the records."""
    store = open_store(tmp_path, N_CLASS, rank=rank, config=config)
    policy = pyodlog.Sampling(rate, keep_other_dataset_types=False)
    records = []
    for seed in range(n_calls):
        r = synthetic_record(
            seed + 1000 * rank, n_images=3, dataset_type=dataset_types[seed % len(dataset_types)]
        )
        r.sampling = policy
        records.append(r)
        store.submit(r)
    store.wait_for_save()
    stats = store.stats()
    store.close()
    return records, stats


def histogram(values: np.ndarray, name: str) -> np.ndarray:
    edges = np.asarray(BINS[name], np.float64)
    index = np.searchsorted(edges[1:-1], values, side="right")
    index[np.isnan(values)] = len(edges) - 2
    return np.bincount(index, minlength=len(edges) - 1)


def test_counts_are_exact_over_a_sampled_run(tmp_path):
    records, stats = sampled_run(
        tmp_path, config=WriterConfig(flush_interval=0.01, segment_max_records=5)
    )
    assert stats["sampled_out"] > 0  # most calls left no rows
    res = pyodlog.open_result(tmp_path / "m/v/r")
    assert len(res) < 3 * len(records)
    totals = res.aggregates().totals()
    counts = torch.cat([r.detections.counts for r in records]).numpy()
    assert totals["calls"] == len(records) and totals["images"] == 3 * len(records)
    assert totals["detections"] == counts.sum()
    assert totals["sampled_calls"] == len(records) - stats["sampled_out"]
    assert (
        totals["detections_per_image"]
        == histogram(counts.astype(float), "detections_per_image").tolist()
    )
    labels = valid_rows(records, "labels").numpy()
    scores = valid_rows(records, "scores").numpy()
    entropy, margin = (t.numpy() for t in uncertainty(valid_rows(records, "logits")))
    boxes = valid_rows(records, "boxes").numpy()
    size = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    for label in range(N_CLASS):
        mine = labels == label
        per_class = res.aggregates().totals(label=label)
        assert per_class["detections"] == mine.sum()
        assert per_class["score"] == histogram(scores[mine], "score").tolist()
        assert per_class["box_size"] == histogram(size[mine], "box_size").tolist()
        assert sum(per_class["entropy"]) == sum(per_class["margin"]) == mine.sum()
    assert totals["entropy"] == histogram(entropy.astype(np.float64), "entropy").tolist()
    assert totals["margin"] == histogram(margin.astype(np.float64), "margin").tolist()


def test_the_embedding_sketch_is_the_mean_and_covariance_of_the_projected_embeddings(tmp_path):
    records, _ = sampled_run(tmp_path, n_calls=10)
    res = pyodlog.open_result(tmp_path / "m/v/r")
    z = (
        valid_rows(records, "embeddings") @ random_projection(32, SKETCH_DIM, SKETCH_SEED)
    ).double()
    labels = valid_rows(records, "labels")
    for label in (None, 3):
        rows = z if label is None else z[labels == label]
        t = res.aggregates().totals(label=label)
        np.testing.assert_allclose(t["embedding_mean"], rows.mean(0).numpy(), rtol=1e-5, atol=1e-6)
        cov = np.cov(rows.numpy().T, bias=True)
        np.testing.assert_allclose(t["embedding_cov"], cov, rtol=1e-4, atol=1e-5)


def test_merging_is_associative_and_commutative():
    parts = []
    for k in range(3):
        agg = Aggregates(N_CLASS)
        for seed in range(5):
            r = synthetic_record(100 * k + seed, dataset_type=("a", "b")[seed % 2], n_epoch=k % 2)
            agg.add(summarize_call(r, N_CLASS), kept=seed % 3 == 0)
        parts.append(agg)

    def merged(*items):
        out = Aggregates(N_CLASS)
        for item in items:
            out.merge(item)
        return out

    a, b, c = parts
    left, right = merged(merged(a, b), c), merged(a, merged(b, c))
    other = merged(c, a, b)
    for x in (right, other):
        assert x.totals()["calls"] == left.totals()["calls"] == 15
        for key, group in left.groups.items():
            g = x.groups[key]
            assert (g.calls, g.images, g.detections, g.sampled_calls) == (
                group.calls,
                group.images,
                group.detections,
                group.sampled_calls,
            )
            np.testing.assert_array_equal(g.hist, group.hist)
            np.testing.assert_array_equal(g.detections_per_image, group.detections_per_image)
            np.testing.assert_allclose(g.sketch_sq, group.sketch_sq, rtol=1e-12)
    # The stored form round-trips.
    assert Aggregates.from_json(left.to_json()) == left
    with pytest.raises(ValueError, match="different models"):
        left.merge(Aggregates(N_CLASS + 1))


def test_aggregates_merge_across_segments_ranks_and_an_export(tmp_path):
    config = WriterConfig(flush_interval=0.01, batch_images=1, segment_max_records=1)
    kinds = ("deploying", "val")
    r0, _ = sampled_run(tmp_path, n_calls=12, rate=0.5, config=config, rank=0, dataset_types=kinds)
    r1, _ = sampled_run(tmp_path, n_calls=9, rate=0.5, config=config, rank=1, dataset_types=kinds)
    directory = tmp_path / "m/v/r"
    segments = sorted(directory.glob("*.h5"))
    with_aggregates = 0
    for path in segments:
        check_segment(path)  # the collector takes every one of them
        with h5py.File(path, "r") as f:
            with_aggregates += f["aggregates"].shape[0] > 0
    assert with_aggregates == len(segments) >= 4  # each closed segment carries its share
    res = pyodlog.open_result(directory)
    t = res.aggregates().totals()
    assert t["calls"] == 21 and t["images"] == 63
    assert res.aggregates().totals(dataset_type="val")["calls"] == 6 + 4
    detections = sum(int(r.detections.counts.sum()) for r in r0 + r1)
    assert t["detections"] == detections
    # An export carries them merged into one.
    store = open_store(tmp_path, N_CLASS)
    zip_path = store.export(0, ("m", "v", "r"), tmp_path / "x.zip")
    store.close()
    exported = pyodlog.open_result(zip_path).aggregates().totals()
    assert exported["calls"] == 21 and exported["detections"] == detections


def test_calls_that_are_all_sampled_out_still_leave_their_aggregates(tmp_path):
    store = open_store(tmp_path, N_CLASS)
    policy = pyodlog.Sampling(1e-9)
    for seed in range(5):
        r = synthetic_record(seed)
        r.sampling = policy
        store.submit(r)
    store.close()
    directory = tmp_path / "m/v/r"
    (segment,) = directory.glob("*.h5")
    check_segment(segment)
    res = pyodlog.open_result(directory)
    assert len(res) == 0 and res.aggregates().totals()["calls"] == 5


def test_damaged_aggregates_are_refused_with_the_file_named(tmp_path):
    sampled_run(tmp_path, n_calls=3)
    (segment,) = (tmp_path / "m/v/r").glob("*.h5")
    with h5py.File(segment, "r+") as f:
        data = f["aggregates"][()]
        data[:5] = np.frombuffer(b"garba", np.uint8)
        f["aggregates"][...] = data
    write_checksum(segment)  # damaged before its checksum was taken
    with pytest.raises(pyodlog.CorruptResultError, match="aggregates are damaged"):
        pyodlog.open_result(tmp_path / "m/v/r", strict=True)


def test_a_call_without_detections_is_counted():
    record = synthetic_record(0, n_images=2, emb_dim=32)
    record.detections.counts[:] = 0
    summary = summarize_call(record, N_CLASS)
    agg = Aggregates(N_CLASS)
    agg.add(summary, kept=True)
    t = agg.totals()
    assert (t["calls"], t["images"], t["detections"]) == (1, 2, 0)
    assert t["detections_per_image"][0] == 2 and t["embedding_mean"] is None


@pytest.fixture
def big_collector(tmp_path):
    """A real collector process with its default limits (a segment is about 1 MiB of chunks)."""
    server = CollectorProcess(tmp_path / "collector", write_keys(tmp_path / "keys.txt")).start()
    yield server
    server.stop()


def test_aggregates_of_a_sampled_run_reach_the_collector(tmp_path, big_collector):
    """Segments with rows and a segment of aggregates only (every call sampled out) are uploaded."""
    collector = big_collector
    store = pyodlog.HDF5Store(tmp_path / "local", config=WriterConfig(flush_interval=0.01))
    logger = TinyDetectorLogger(
        TinyDetector().eval(),
        "tiny",
        "v1",
        result_name="run",
        n_epoch=2,
        sink=store,
        api_endpoint=collector.url,
        api_key=KEY_A,
        auto_sync=False,
        sampling=pyodlog.Sampling(1e-9),
    )
    with torch.no_grad():
        for i in range(4):
            logger([torch.rand(3, 32, 32)], input_ids=[f"a{i}"])
        logger([torch.rand(3, 32, 32)], input_ids=["v0"], dataset_type="val")  # kept
        summary = logger.upload()  # closes the segment with rows
        for i in range(3):
            logger([torch.rand(3, 32, 32)], input_ids=[f"b{i}"])
        logger.upload()  # a segment of aggregates only, sent though it holds no image of epoch 2
    logger.close()
    assert summary.segments == 1
    remote = pyodlog.open_result(collector.root / "tenant-a" / "tiny" / "v1" / "run")
    assert remote.images["input_id"] == ["v0"]
    totals = remote.aggregates().totals(n_epoch=2)
    assert (totals["calls"], totals["images"], totals["sampled_calls"]) == (8, 8, 1)


def test_a_close_that_fails_writes_the_aggregates_once(tmp_path):
    """ENOSPC while closing: the segment is rolled back (its aggregates too) and closed again later."""
    store = open_store(tmp_path, N_CLASS)
    failures = []

    def full_disk_once(name):
        if name == "<close>" and not failures:
            failures.append(name)
            raise OSError(28, "No space left on device")

    store.writer.column_fault = full_disk_once
    records = [synthetic_record(seed) for seed in range(4)]
    for r in records:
        store.submit(r)
    with pytest.raises(pyodlog.StorageError):
        store.rotate()
    store.rotate()  # the disk is back: the rolled-back segment closes
    store.close()
    res = pyodlog.open_result(tmp_path / "m/v/r", strict=True)
    assert failures and len(res) == 8
    assert res.aggregates().totals()["calls"] == 4


def test_embeddings_narrower_than_the_sketch_are_summarised_exactly():
    """A 3-d embedding (narrower than the 16-d sketch) maps by an exact isometry, not a crash."""
    from pyodlog.io.aggregates import SKETCH_DIM, SKETCH_SEED
    from pyodlog.ops.compression import random_projection

    projection = random_projection(3, SKETCH_DIM, SKETCH_SEED)
    assert projection.shape == (3, SKETCH_DIM)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    z = x @ projection
    torch.testing.assert_close(z @ z.T, x @ x.T, rtol=1e-4, atol=1e-4)  # inner products kept
