"""Records logged with different optional columns (uncertainty, embeddings, near-misses, targets,
thumbnail-free calls) in one batch, one segment or one result: every record is written and reads
back exactly, the columns a call did not log filled as not logged (pyodlog.io.columns.NOT_LOGGED).

Real HDF5 through the real writer (tests/helpers/records.py's store), read back with
``open_result(strict=True)``, which refuses a segment whose columns disagree.
"""

from __future__ import annotations

import numpy as np
import torch

import pyodlog
from pyodlog.io.writer import WriterConfig
from pyodlog.ops.uncertainty import SOFTMAX, detection_uncertainty
from pyodlog.structures import NearMissBatch
from tests.helpers.records import open_store, synthetic_record

N_CLASS = 7
ONE_BATCH = WriterConfig(flush_interval=60.0)  # everything submitted lands in one batch


def with_uncertainty(record):
    det = record.detections
    det.entropy, det.margin, det.energy = detection_uncertainty(det.logits, SOFTMAX)
    return record


def with_near_misses(record, k: int = 3, seed: int = 0, emb_dim: int | None = None):
    """Near-misses (``k`` per image, some images with fewer) like the fused operator's."""
    det = record.detections
    b = det.boxes.shape[0]
    g = torch.Generator().manual_seed(100 + seed)
    xy = torch.rand(b, k, 2, generator=g) * 200
    logits = torch.randn(b, k, N_CLASS, generator=g)
    entropy, margin, energy = detection_uncertainty(logits, SOFTMAX)
    det.near_misses = NearMissBatch(
        boxes=torch.cat([xy, xy + 10], -1),
        scores=torch.rand(b, k, generator=g) * 0.05,
        labels=torch.randint(0, N_CLASS, (b, k), generator=g),
        logits=logits,
        candidate_index=torch.arange(k).repeat(b, 1),
        counts=torch.randint(0, k + 1, (b,), generator=g),
        reason=torch.ones(b, k, dtype=torch.uint8),
        suppressed_by=torch.full((b, k), -1, dtype=torch.int64),
        suppressor_iou=torch.full((b, k), float("nan")),
        exhausted=torch.zeros(b, dtype=torch.bool),
        floor=0.01,
        k=k,
        score_thresh=0.05,
        iou_thresh=0.5,
        max_detections=det.boxes.shape[1],
        embeddings=None if emb_dim is None else torch.randn(b, k, emb_dim, generator=g),
        entropy=entropy,
        margin=margin,
        energy=energy,
    )
    return record


def valid(t: torch.Tensor, counts: torch.Tensor) -> np.ndarray:
    mask = torch.arange(t.shape[1])[None, :] < counts[:, None]
    return t[mask].numpy()


def read(tmp_path):
    return pyodlog.open_result(tmp_path / "m/v/r", strict=True)


def segments(tmp_path):
    return sorted((tmp_path / "m/v/r").glob("seg-*.h5"))


def assert_record_reads_back(res, first_image: int, record) -> None:
    """Every column of the record, exactly (float32 storage), the ones it did not log as not logged."""
    det = record.detections
    counts = det.counts
    a = int(res.images["det_offset"][first_image])
    n = int(counts.sum())
    assert res.images["det_count"][first_image : first_image + len(counts)].tolist() == (
        counts.tolist()
    )
    assert res.images["input_id"][first_image : first_image + len(counts)] == record.input_ids
    rows = slice(a, a + n)
    for name in ("boxes", "scores", "labels", "logits", "candidate_index"):
        np.testing.assert_array_equal(res.detections[name][rows], valid(getattr(det, name), counts))
    for name in ("entropy", "margin", "energy", "embeddings"):
        value = getattr(det, name)
        if value is not None:
            np.testing.assert_array_equal(res.detections[name][rows], valid(value, counts))
        elif name in res.detections:
            assert np.isnan(res.detections[name][rows]).all(), name
    images = slice(first_image, first_image + len(counts))
    nm = det.near_misses
    if nm is None:
        if "nm_k" in res.images:
            assert res.images["nm_k"][images].tolist() == [-1] * len(counts)
            assert res.images["nm_count"][images].tolist() == [0] * len(counts)
        return
    assert res.images["nm_k"][images].tolist() == [nm.k] * len(counts)
    assert res.images["nm_count"][images].tolist() == nm.counts.tolist()
    for i in range(len(counts)):
        got = res.image_near_misses(first_image + i)
        c = int(nm.counts[i])
        for name in ("boxes", "scores", "labels", "logits", "reason", "entropy"):
            np.testing.assert_array_equal(got[name].numpy(), getattr(nm, name)[i, :c].numpy())
        if nm.embeddings is not None:
            np.testing.assert_array_equal(got["embeddings"].numpy(), nm.embeddings[i, :c].numpy())
        elif "embeddings" in got:
            assert torch.isnan(got["embeddings"]).all()


def submit_all(tmp_path, records, config=ONE_BATCH, storage="float32", barrier_between=False):
    store = open_store(tmp_path, N_CLASS, storage=storage, config=config)
    for record in records:
        store.submit(record)
        if barrier_between:
            store.wait_for_save()
    store.close()


def test_one_batch_mixing_uncertainty_and_embeddings_keeps_every_record(tmp_path):
    """Before: the batch's entropy/embeddings columns were shorter than its detections, and the
    reader skipped the whole segment as damaged (every record of the batch lost)."""
    records = [
        synthetic_record(1, emb_dim=32),  # embeddings, no uncertainty
        with_uncertainty(synthetic_record(2, emb_dim=None)),  # uncertainty, no embeddings
        with_uncertainty(synthetic_record(3, emb_dim=32, n_images=3)),  # both
        synthetic_record(4, emb_dim=None),  # neither
    ]
    submit_all(tmp_path, records)
    assert len(segments(tmp_path)) == 1  # one batch, one segment
    res = read(tmp_path)
    assert res.skipped == []
    assert len(res) == 9
    first = 0
    for record in records:
        assert_record_reads_back(res, first, record)
        first += len(record)
    assert len(res.detections["embeddings"]) == len(res.detections["scores"])


def test_compact_storage_fills_embeddings_not_logged_with_nan(tmp_path):
    """The default compact storage (uint8 embeddings with per-row scale/offset, float16 logits):
    a detection without an embedding reads back as a NaN row, the others within uint8's bound."""
    records = [
        synthetic_record(5, emb_dim=None),
        synthetic_record(6, emb_dim=16),
        with_uncertainty(synthetic_record(7, emb_dim=None)),
    ]
    submit_all(tmp_path, records, storage=None)
    res = read(tmp_path)
    assert len(res) == sum(len(r) for r in records)
    emb = res.detections["embeddings"]
    n0 = int(records[0].detections.counts.sum())
    n1 = int(records[1].detections.counts.sum())
    assert np.isnan(emb[:n0]).all() and np.isnan(emb[n0 + n1 :]).all()
    want = valid(records[1].detections.embeddings, records[1].detections.counts)
    span = want.max(axis=1, keepdims=True) - want.min(axis=1, keepdims=True)
    assert (np.abs(emb[n0 : n0 + n1] - want) <= span / 255 + 1e-6).all()
    assert np.isnan(res.detections["entropy"][: n0 + n1]).all()
    assert not np.isnan(res.detections["entropy"][n0 + n1 :]).any()


def test_near_misses_on_some_calls_of_a_batch_only(tmp_path):
    """Calls with near-misses (with and without their embeddings), with targets, and calls
    without either, in one batch."""
    with_targets = synthetic_record(12, emb_dim=8, n_images=3)
    with_targets.targets = {
        "boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 50.0, 60.0], [0, 0, 9, 9]]),
        "labels": torch.tensor([1, 2, 3]),
        "counts": [2, 0, 1],
    }
    records = [
        synthetic_record(10, emb_dim=8),
        with_near_misses(with_uncertainty(synthetic_record(11, emb_dim=8)), seed=1, emb_dim=8),
        with_targets,
        with_near_misses(with_uncertainty(synthetic_record(13, emb_dim=8)), seed=2),
    ]
    submit_all(tmp_path, records)
    res = read(tmp_path)
    assert len(res) == 9
    assert res.images["gt_count"].tolist() == [0, 0, 0, 0, 2, 0, 1, 0, 0]
    assert res.images["gt_logged"].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0]
    np.testing.assert_array_equal(res.image_targets(6)["labels"].numpy(), [3])
    first = 0
    for record in records:
        assert_record_reads_back(res, first, record)
        first += len(record)
    assert len(res.near_misses["scores"]) == int(res.images["nm_count"].sum())
    assert len(res.near_misses["embeddings"]) == len(res.near_misses["scores"])


def test_a_segment_takes_batches_without_its_optional_columns_and_rotates_for_new_ones(tmp_path):
    """The open segment (made by a batch without uncertainty) and a batch with it: a new segment
    (an open segment cannot gain datasets); then a batch without it goes into that segment,
    filled as not logged, instead of rotating at every change. Nothing is dropped."""
    records = [
        synthetic_record(30, emb_dim=None),
        with_uncertainty(synthetic_record(31, emb_dim=16)),
        synthetic_record(32, emb_dim=None),
        with_near_misses(synthetic_record(33, emb_dim=None)),
        synthetic_record(34, emb_dim=None),
    ]
    submit_all(tmp_path, records, config=WriterConfig(flush_interval=0.01), barrier_between=True)
    # 30 | 31, 32 (filled) | 33 (near-misses are new), 34 (filled)
    assert len(segments(tmp_path)) == 3
    res = read(tmp_path)
    assert len(res) == sum(len(r) for r in records)
    first = 0
    for record in records:
        assert_record_reads_back(res, first, record)
        first += len(record)


def test_a_column_of_another_width_starts_a_new_segment(tmp_path):
    """Embeddings of another width (another model on the result) cannot share a dataset: the
    next batch goes into a new segment, nothing is quarantined."""
    records = [synthetic_record(40, emb_dim=16), synthetic_record(41, emb_dim=24)]
    submit_all(tmp_path, records, config=WriterConfig(flush_interval=0.01), barrier_between=True)
    assert len(segments(tmp_path)) == 2
    assert not (tmp_path / "m/v/r/quarantine").exists()
    for i, path in enumerate(segments(tmp_path)):
        part = pyodlog.io.reader.read_segment(path)
        want = valid(records[i].detections.embeddings, records[i].detections.counts)
        np.testing.assert_array_equal(part.numeric["detections/embeddings"], want)


def test_calls_of_another_width_in_one_batch_are_split_into_segments_of_their_own(tmp_path):
    """Within one batch a column cannot change width: the batch before the call that differs is
    appended, and that call starts the next batch (and segment). Every call is written, in
    order; before, the whole batch was quarantined."""
    store = open_store(tmp_path, N_CLASS, storage="float32", config=ONE_BATCH)
    records = [synthetic_record(50, emb_dim=16), synthetic_record(51, emb_dim=24)]
    records.append(synthetic_record(52, emb_dim=16))
    for record in records:
        store.submit(record)
    store.wait_for_save()
    stats = store.stats()
    store.close()
    assert stats["quarantined"] == 0 and stats["written"] == 3
    assert not (tmp_path / "m/v/r/quarantine").exists()
    paths = segments(tmp_path)
    assert len(paths) == 3
    for path, record in zip(paths, records):
        part = pyodlog.io.reader.read_segment(path)
        want = valid(record.detections.embeddings, record.detections.counts)
        np.testing.assert_array_equal(part.numeric["detections/embeddings"], want)
        assert part.strings["images/input_id"] == record.input_ids


def test_the_reader_aligns_segments_with_and_without_embeddings(tmp_path):
    """Segments written by loggers with and without embeddings (or near-miss embeddings): one
    result whose columns stay row-aligned, NaN rows where none was logged."""
    first = synthetic_record(60, emb_dim=None)
    second = with_near_misses(synthetic_record(61, emb_dim=12), emb_dim=12)
    third = with_near_misses(synthetic_record(62, emb_dim=None))
    for record in (first, second, third):
        submit_all(tmp_path, [record])  # each a store, a segment of its own
    assert len(segments(tmp_path)) == 3
    res = read(tmp_path)
    start = 0
    for record in (first, second, third):
        assert_record_reads_back(res, start, record)
        start += len(record)
    assert len(res.detections["embeddings"]) == len(res.detections["scores"])
    assert len(res.near_misses["embeddings"]) == len(res.near_misses["scores"])
