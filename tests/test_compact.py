"""Compact records: storage precision per column, projection, widening on read, tolerances."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import pyodlog
from pyodlog.io.aggregates import uncertainty
from pyodlog.ops.compression import compact_rows, random_projection, widen_rows
from pyodlog_collector.segment_check import check_segment
from tests.helpers.golden import expected, unpack_golden
from tests.helpers.records import open_store, synthetic_record, valid_rows
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

# (n_class, embedding width) of each family with an embedding, as create_logger logs them.
FAMILIES = {
    "Faster R-CNN (ResNet-50 FPN)": (91, 1024),
    "RetinaNet / FCOS": (91, 256),
    "DETR (ResNet-50)": (92, 256),
    "YOLOv8n": (80, 448),
}


def detection_bytes(result_dir: Path) -> tuple[int, int]:
    """(bytes of every detections/ dataset's rows, number of detections) over the closed segments."""
    total = n = 0
    for path in sorted(result_dir.glob("*.h5")):
        with h5py.File(path, "r") as f:
            for ds in f["detections"].values():
                total += ds.size * ds.dtype.itemsize
            n += f["detections/scores"].shape[0]
    return total, n


def write(tmp_path: Path, name: str, records, storage, n_class: int) -> Path:
    store = open_store(tmp_path / name, n_class=n_class, storage=storage)
    for r in records:
        store.submit(r)
    store.close()
    return tmp_path / name / "m" / "v" / "r"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_storage_cuts_bytes_per_detection_to_a_quarter(tmp_path, family):
    n_class, width = FAMILIES[family]
    records = [synthetic_record(s, 2, 20, n_class, width) for s in range(4)]
    full, n = detection_bytes(write(tmp_path, "full", records, "float32", n_class))
    compact, n2 = detection_bytes(write(tmp_path, "compact", records, None, n_class))
    assert n == n2 > 0
    assert full / n == 36 + 4 * n_class + 4 * width  # boxes, score, label, candidate + float32 rows
    assert compact / n == 36 + 2 * n_class + 128 + 8  # float16 logits, 128 uint8 + scale and offset
    assert compact / full <= 0.25, f"{family}: {compact / full:.3f} of float32"


def test_the_reader_widens_every_precision_to_float32_within_its_bound(tmp_path):
    records = [synthetic_record(s, 3, 8, 7, 40, logit_scale=50.0) for s in range(3)]
    want_logits = valid_rows(records, "logits")
    want_emb = valid_rows(records, "embeddings")
    for logits, embeddings, dim in (
        ("float32", "float32", None),
        ("float16", "uint8", None),
        ("bfloat16", "bfloat16", 16),
        ("uint8", "float16", 16),
    ):
        spec = pyodlog.RecordStorage(logits, embeddings, dim, projection_seed=7)
        res = pyodlog.open_result(write(tmp_path, f"{logits}-{embeddings}", records, spec, 7))
        got_logits = torch.from_numpy(res.detections["logits"])
        got_emb = torch.from_numpy(res.detections["embeddings"])
        assert got_logits.dtype == got_emb.dtype == torch.float32
        emb_ref = want_emb if dim is None else want_emb @ random_projection(40, dim, 7)
        for got, want, precision in (
            (got_logits, want_logits, logits),
            (got_emb, emb_ref, embeddings),
        ):
            err = (got - want).abs()
            if precision == "float32":
                assert torch.equal(got, want)
            elif precision == "float16":
                assert bool((err <= want.abs() * 2**-11 + 2**-24).all())
            elif precision == "bfloat16":
                assert bool((err <= want.abs() * 2**-8).all())
            else:  # uint8: half a step of the row's range, plus float32 rounding
                step = (want.max(1).values - want.min(1).values) / 252
                assert bool((err <= step[:, None] / 2 * 1.001 + 1e-5).all())
        # Boxes and scores stay float32, exactly.
        assert torch.equal(torch.from_numpy(res.detections["boxes"]), valid_rows(records, "boxes"))
        assert torch.equal(
            torch.from_numpy(res.detections["scores"]), valid_rows(records, "scores")
        )


def test_float16_clamps_finite_values_beyond_its_range_and_keeps_inf_and_nan():
    x = torch.tensor([[1e6, -1e6, float("inf"), float("nan"), 1.5]])
    values, _, _ = compact_rows(x, "float16")
    back = widen_rows(values)
    assert back[0, :2].tolist() == [65504.0, -65504.0]
    assert back[0, 2] == float("inf") and torch.isnan(back[0, 3]) and back[0, 4] == 1.5


def test_uncertainty_from_stored_logits_is_within_the_stated_tolerance(tmp_path):
    """Entropy (normalised) and margin from the stored logits vs from the float32 logits."""
    records = [synthetic_record(s, 4, 25, 91, None, logit_scale=4.0) for s in range(6)]
    want_e, want_m = uncertainty(valid_rows(records, "logits"))
    # (entropy, margin) tolerances for logits within +-20 (README "Compact records").
    tolerance = {"float16": (2e-3, 5e-3), "bfloat16": (1e-2, 4e-2), "uint8": (1e-2, 4e-2)}
    for precision, (tol_e, tol_m) in tolerance.items():
        spec = pyodlog.RecordStorage(logits=precision)
        res = pyodlog.open_result(write(tmp_path, precision, records, spec, 91))
        got_e, got_m = uncertainty(torch.from_numpy(res.detections["logits"]))
        assert float((got_e - want_e).abs().max()) <= tol_e, precision
        assert float((got_m - want_m).abs().max()) <= tol_m, precision


def test_drift_statistics_from_projected_embeddings_are_within_tolerance(tmp_path):
    """Mean shift and pairwise distances of 1024-d embeddings from the default storage (128 dims, uint8)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 1024, generator=g)
    shifted = torch.randn(400, 1024, generator=g) + 0.2 * torch.randn(1024, generator=g)
    records = []
    for k, emb in enumerate((base, shifted)):
        r = synthetic_record(k, 20, 20, 91, 1024, dataset_type=("ref", "cur")[k])
        r.detections.counts[:] = 20
        r.detections.embeddings = emb.reshape(20, 20, 1024)
        records.append(r)
    res = pyodlog.open_result(write(tmp_path, "default", records, None, 91))
    stored = torch.from_numpy(res.detections["embeddings"])
    assert stored.shape == (800, 128)
    shift_full = float((shifted.mean(0) - base.mean(0)).norm())
    shift_stored = float((stored[400:].mean(0) - stored[:400].mean(0)).norm())
    assert abs(shift_stored / shift_full - 1) <= 0.15
    i = torch.randint(0, 800, (2000,), generator=g)
    j = torch.randint(0, 800, (2000,), generator=g)
    both = torch.cat([base, shifted])
    keep = i != j
    ratio = (stored[i] - stored[j]).norm(dim=1)[keep] / (both[i] - both[j]).norm(dim=1)[keep]
    assert abs(float(ratio.mean()) - 1) <= 0.02 and float(ratio.std()) <= 0.08


def test_float32_storage_keeps_the_old_schema_and_a_change_of_storage_is_a_schema_change(tmp_path):
    model = TinyDetector().eval()
    with TinyDetectorLogger(
        model, "tiny", "v1", sink=pyodlog.InMemorySink(), storage="float32"
    ) as exact:
        assert "storage" not in exact.schema  # the schema before format 3: old results still open
    with TinyDetectorLogger(model, "tiny", "v1", sink=pyodlog.InMemorySink()) as compact:
        assert compact.schema["storage"] == pyodlog.RecordStorage().to_dict()
    with torch.no_grad(), TinyDetectorLogger(model, "tiny", "v3", storage="float32") as logger:
        logger([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], input_ids=["a", "b"])
        logger.wait_for_save()
        path = logger.export(str(tmp_path / "x.zip"))
    res = pyodlog.open_result(path)
    assert res.detections["logits"].dtype == np.float32 and len(res) == 2
    # A storage the user asks for that differs from the result's is another schema.
    with pytest.raises(pyodlog.SchemaMismatchError):
        TinyDetectorLogger(
            model,
            "tiny",
            "v3",
            result_name=logger.result_name,
            storage=pyodlog.RecordStorage(logits="bfloat16"),
        )


def test_a_result_written_before_compact_records_is_continued_in_float32(tmp_path, caplog):
    """The default storage (compact) meets a result an earlier pyodlog wrote (float32, no "storage"
    in its schema): the result is continued as it was written, with a warning, not refused."""
    model = TinyDetector().eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    with torch.no_grad(), TinyDetectorLogger(model, "tiny", "old", storage="float32") as first:
        first(images, input_ids=["a", "b"])
        first.wait_for_save()
    folder = first.sink.directory
    before = json.loads((folder / "result.json").read_text())["schema"]
    assert "storage" not in before  # what pyodlog wrote before segment format 3
    with (
        caplog.at_level("WARNING", "pyodlog"),
        torch.no_grad(),
        TinyDetectorLogger(model, "tiny", "old", result_name=first.result_name) as later,
    ):
        assert "storage" not in later.schema
        later(images, input_ids=["c", "d"])
        later.wait_for_save()
    assert any("continued as it was written" in r.getMessage() for r in caplog.records)
    assert json.loads((folder / "result.json").read_text())["schema"] == before
    for segment in folder.glob("seg-*.h5"):
        with h5py.File(segment, "r") as f:
            assert f["detections/logits"].dtype == np.float32  # the result's own precision
    result = pyodlog.open_result(folder)
    assert result.images["input_id"] == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    "storage, message",
    [
        ("float64", "storage must be None"),
        (pyodlog.RecordStorage, "storage must be None"),
    ],
)
def test_bad_storage_is_refused_before_anything_is_written(storage, message):
    model = TinyDetector().eval()
    with pytest.raises(ValueError, match=message):
        TinyDetectorLogger(model, "tiny", "v1", sink=pyodlog.InMemorySink(), storage=storage)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"logits": "int4"}, "logits='int4'"),
        ({"embedding_dim": 0}, "embedding_dim=0"),
        ({"projection_seed": -1}, "projection_seed=-1"),
    ],
)
def test_record_storage_validates_its_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pyodlog.RecordStorage(**kwargs)


def test_the_collector_accepts_a_compact_segment(tmp_path):
    records = [synthetic_record(s) for s in range(3)]
    result = write(tmp_path, "c", records, pyodlog.RecordStorage(logits="uint8"), 7)
    (segment,) = result.glob("*.h5")
    check_segment(segment)  # raises InvalidSegment otherwise


def test_the_golden_segment_of_format_3_still_reads(tmp_path):
    """A segment written by this version (compact rows, sample weights, aggregates) reads back as recorded."""
    want = expected("segment-format3.json")
    folder = tmp_path / "golden"
    unpack_golden("segment-format3.h5.gz", folder, want["segment"], checksum=True)
    res = pyodlog.open_result(folder, strict=True)
    assert res.images["input_id"] == want["input_id"]
    assert res.images["sample_weight"].tolist() == want["sample_weight"]
    np.testing.assert_array_equal(res.detections["logits"], np.asarray(want["logits"], np.float32))
    np.testing.assert_array_equal(
        res.detections["embeddings"], np.asarray(want["embeddings"], np.float32)
    )
    assert res.aggregates().to_dict() == want["aggregates"]
