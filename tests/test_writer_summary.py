"""The writer's aggregate summary: one computation per flush, equal to the per-call summaries summed,
and a summary the record carries (``aggregate_summary``) used as it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyodlog
from pyodlog.io.aggregates import (
    Aggregates,
    summarize_call,
    summarize_calls,
    uncertainty,
)
from pyodlog.ops.uncertainty import SOFTMAX, detection_uncertainty
from tests.helpers.records import open_store, synthetic_record

N_CLASS = 7


def mixed_records(same_columns: bool = False) -> list:
    """Records of every kind one summary may hold together (``same_columns``: all with embeddings
    and none with uncertainty columns, as one logger's records are)."""
    records = []
    for seed in range(12):
        r = synthetic_record(
            seed,
            n_images=1 + seed % 3,
            emb_dim=None if seed % 4 == 1 and not same_columns else 32,
            dataset_type=("deploying", "val")[seed % 2],
            n_epoch=(None, 0, 3)[seed % 3],
        )
        det = r.detections
        if seed % 3 == 0:  # every image at its quota (rows are views)
            det.counts[:] = det.boxes.shape[1]
        if seed % 5 == 0:  # labels outside [0, n_class) count in the "other" row
            det.labels[:, 0] = N_CLASS + 2
        if (
            seed % 4 == 2 and not same_columns
        ):  # the uncertainty columns the fused operator adds (nats)
            det.entropy, det.margin, det.energy = detection_uncertainty(det.logits, SOFTMAX)
        records.append(r)
    records[5].detections.counts[:] = 0  # a call without detections
    return records


def test_a_flush_summary_equals_the_per_call_summaries_summed():
    records = mixed_records()
    kept = [i % 3 != 1 for i in range(len(records))]
    batch = summarize_calls(records, N_CLASS)
    together = Aggregates(N_CLASS)
    batch.add_to(together, kept)
    one_by_one = Aggregates(N_CLASS)
    for record, keep in zip(records, kept):
        one_by_one.add(summarize_call(record, N_CLASS), kept=keep)
    assert (
        set(together.groups)
        == set(one_by_one.groups)
        == {
            ("deploying", -1),
            ("deploying", 0),
            ("deploying", 3),
            ("val", -1),
            ("val", 0),
            ("val", 3),
        }
    )
    for key, want in one_by_one.groups.items():
        got = together.groups[key]
        assert (got.calls, got.images, got.detections, got.sampled_calls) == (
            want.calls,
            want.images,
            want.detections,
            want.sampled_calls,
        )
        np.testing.assert_array_equal(got.hist, want.hist)  # counts: exact
        np.testing.assert_array_equal(got.detections_per_image, want.detections_per_image)
        np.testing.assert_array_equal(got.sketch_n, want.sketch_n)
        np.testing.assert_allclose(got.sketch_sum, want.sketch_sum, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(got.sketch_sq, want.sketch_sq, rtol=1e-12, atol=1e-9)
    assert sum(g.calls for g in together.groups.values()) == len(records)
    # What a sampling policy sees of each call: the same values as its own summary.
    for i, record in enumerate(records):
        alone, view = summarize_call(record, N_CLASS), batch.call(i)
        assert (view.dataset_type, view.n_epoch) == (alone.dataset_type, alone.n_epoch)
        assert (view.n_images, view.n_detections) == (alone.n_images, alone.n_detections)
        np.testing.assert_array_equal(view.labels, alone.labels)
        np.testing.assert_array_equal(view.entropy, alone.entropy)
        np.testing.assert_array_equal(view.margin, alone.margin)


def test_uncertainty_of_a_row_does_not_depend_on_the_other_rows():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 91, generator=g) * 4
    logits[7, :] = -float("inf")  # no class possible
    logits[7, 3] = 0.0
    logits[9, 5] = logits[9, 6] = 50.0  # a tie at the top: margin 0
    entropy, margin = uncertainty(logits)
    for rows in (slice(0, 1), slice(5, 12), slice(100, 300)):
        e, m = uncertainty(logits[rows])
        assert torch.equal(e, entropy[rows]) and torch.equal(m, margin[rows])
    assert margin[9] == 0.0 and margin[7] == 1.0 and entropy[7] == 0.0
    # top-1 minus top-2 of the softmax, and the normalised entropy, as PyTorch computes them
    p = torch.softmax(logits.double(), -1)
    top = p.topk(2, dim=-1).values
    torch.testing.assert_close(margin.double(), top[:, 0] - top[:, 1], atol=1e-6, rtol=0)
    want = -(p * p.log().nan_to_num(0.0, 0.0, 0.0)).sum(-1) / np.log(91)
    torch.testing.assert_close(entropy.double(), want, atol=1e-6, rtol=0)
    one = uncertainty(torch.randn(4, 1))
    assert torch.equal(one[1], torch.ones(4)) and torch.equal(one[0], torch.zeros(4))


def test_the_writer_counts_a_call_from_the_summary_it_carries(tmp_path):
    """A record carrying ``aggregate_summary`` (made on the call path) is counted from it, not again."""
    store = open_store(tmp_path, N_CLASS)
    carried = synthetic_record(1, n_images=2)
    other = synthetic_record(2, n_images=3, dataset_type="val")
    carried.detections.counts[:] = 6
    other.detections.counts[:] = 1
    carried.aggregate_summary = summarize_call(other, N_CLASS)  # deliberately another call's
    wrong_classes = synthetic_record(3, n_images=1)
    wrong_classes.aggregate_summary = summarize_call(wrong_classes, N_CLASS + 5)  # does not fit
    store.submit(carried)
    store.submit(wrong_classes)
    store.close()
    res = pyodlog.open_result(tmp_path / "m/v/r")
    assert len(res) == 3  # both calls' rows are written
    totals = res.aggregates().totals()
    # carried: counted as its summary says (3 images, 3 detections, "val"); wrong_classes: summarised
    assert totals["calls"] == 2
    assert totals["images"] == 3 + 1
    assert totals["detections"] == 3 + int(wrong_classes.detections.counts.sum())
    assert res.aggregates().totals(dataset_type="val")["calls"] == 1


@pytest.mark.parametrize("flush_interval", [0.01, 5.0])
def test_every_call_of_a_burst_is_counted_once(tmp_path, flush_interval):
    """Calls summarised together at each flush (small flushes, or one per barrier) count exactly once."""
    from pyodlog.io.writer import WriterConfig

    store = open_store(
        tmp_path, N_CLASS, config=WriterConfig(flush_interval=flush_interval, batch_images=5)
    )
    policy = pyodlog.Sampling(0.3, keep_other_dataset_types=False)
    records = mixed_records(same_columns=True)
    for r in records:
        r.sampling = policy
        store.submit(r)
    store.wait_for_save()
    stats = store.stats()
    store.close()
    totals = pyodlog.open_result(tmp_path / "m/v/r").aggregates().totals()
    assert totals["calls"] == len(records)
    assert totals["images"] == sum(len(r) for r in records)
    assert totals["detections"] == sum(int(r.detections.counts.sum()) for r in records)
    assert totals["sampled_calls"] == len(records) - stats["sampled_out"]


def test_the_pipelined_writer_stores_the_same_rows_in_the_same_order(tmp_path):
    """Summaries computed on the helper thread while batches are written: the same rows, in the
    order of the calls, every call acknowledged by wait_for_save readable before the store closes."""
    from pyodlog.io.writer import WriterConfig

    records = [synthetic_record(seed, n_images=2, max_det=5) for seed in range(30)]
    results = {}
    for pipelined in (True, False):
        root = tmp_path / f"pipelined-{pipelined}"
        store = open_store(
            root,
            N_CLASS,
            config=WriterConfig(
                flush_interval=5.0, batch_images=4, backpressure="block", summary_thread=pipelined
            ),
        )
        for r in records[:17]:
            store.submit(r)
        store.wait_for_save()
        assert (store.writer._rows_pool is not None) == pipelined  # the helper thread was used
        stats = store.stats()
        assert stats["durable"] == stats["written"] == 17 and stats["queued"] == 0
        # Acknowledged: in the open segment's flushed rows, readable now.
        assert len(pyodlog.open_result(root / "m/v/r")) == 34
        for r in records[17:]:
            store.submit(r)
        store.close()
        results[pipelined] = pyodlog.open_result(root / "m/v/r")
    fast, serial = results[True], results[False]
    want_ids = [i for r in records for i in r.input_ids]
    assert fast.images["input_id"] == serial.images["input_id"] == want_ids
    for name in ("boxes", "scores", "labels", "logits"):
        np.testing.assert_array_equal(fast.detections[name], serial.detections[name])
    a, b = fast.aggregates().totals(), serial.aggregates().totals()
    for key in ("calls", "images", "detections", "score", "entropy", "margin", "box_size"):
        assert a[key] == b[key]  # counts: exact, whatever calls were summarised together
    np.testing.assert_allclose(a["embedding_cov"], b["embedding_cov"], rtol=1e-9, atol=1e-12)
    assert a["calls"] == len(records)


@pytest.mark.parametrize("name", ["score", "entropy", "margin", "box_size"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_fast_bins_are_the_bins_of_the_edges(name, dtype):
    """Bins found by arithmetic equal a binary search of the fixed edges, on and beside every edge."""
    from pyodlog.io.aggregates import BINS, _bucket_np

    edges = np.asarray(BINS[name], np.float64)
    finite = edges[np.isfinite(edges)].astype(dtype)
    rng = np.random.default_rng(0)
    scale = 2.0 if name != "box_size" else 20000.0
    values = np.concatenate(
        [
            finite,
            np.nextafter(finite, dtype(-np.inf)),
            np.nextafter(finite, dtype(np.inf)),
            (rng.random(5000) * scale - 0.5).astype(dtype),
            np.asarray([np.nan, np.inf, -np.inf, -0.0, 0.0, -3.0, 1e30], dtype),
        ]
    ).astype(dtype)
    want = np.searchsorted(edges[1:-1], values.astype(np.float64), side="right")
    want[np.isnan(values)] = len(edges) - 2
    np.testing.assert_array_equal(_bucket_np(values, name), want)


def test_float16_rows_are_the_halves_of_the_clamped_values():
    """compact_rows' one cast gives the halves of the finite values clamped to +-65504 (inf, NaN kept)."""
    from pyodlog.ops.compression import FLOAT16_MAX, compact_rows

    edge = [1e6, -1e6, 65519.9, 65520.0, -65520.0, 65504.0, 7e4, 0.0, -0.0, 1e-8]
    x = torch.tensor([edge + [float("inf"), -float("inf"), float("nan")]] * 3)
    x = torch.cat([x, torch.randn(50, 13) * 3e4])
    got, scale, offset = compact_rows(x, "float16")
    want = torch.where(torch.isfinite(x), x.clamp(-FLOAT16_MAX, FLOAT16_MAX), x).half()
    assert scale is None and offset is None and got.dtype == torch.float16
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))  # bit for bit, NaN included


def test_the_summary_thread_is_opt_in():
    from pyodlog.io.writer import WriterConfig

    assert WriterConfig().summary_thread is False
    with pytest.raises(ValueError, match="summary_thread must be True or False"):
        WriterConfig(summary_thread="yes")  # type: ignore[arg-type]
