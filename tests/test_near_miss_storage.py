"""Near-misses and uncertainty as stored: the segment columns, the envelope, older files."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torchvision.models import detection

import pyodlog
from pyodlog.io.segment import SEGMENT_FORMAT, write_checksum
from pyodlog.ops.postprocess import BELOW_SCORE, OVER_CAP, SUPPRESSED
from tests.helpers.golden import expected as golden_expected
from tests.helpers.golden import unpack_golden


def rcnn():
    torch.manual_seed(0)
    return detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.01
    ).eval()


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 200, 240, generator=g), torch.rand(3, 180, 260, generator=g)]


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_the_segment_holds_near_misses_per_the_contract(tmp_path):
    model = rcnn()
    logger = pyodlog.create_logger(
        model, "m", "v", auto_sync=False, near_miss=50, max_detections_per_image=5
    )
    logger(images())
    data = pyodlog.open_result(logger.export(tmp_path))
    logger.close()
    nm = data.near_misses
    for name, dtype in {
        "boxes": "float32",
        "scores": "float32",
        "labels": "int64",
        "candidate_index": "int64",
        "logits": "float32",
        "embeddings": "float32",
        "entropy": "float32",
        "margin": "float32",
        "energy": "float32",
        "reason": "uint8",
        "suppressed_by": "int64",
        "suppressor_iou": "float32",
    }.items():
        assert nm[name].dtype.name == dtype, name
    assert nm["logits"].shape[1] == 91 and nm["boxes"].shape[1] == 4
    assert data.images["nm_k"].tolist() == [50, 50]
    assert data.images["nm_count"].tolist() == [50, 50]  # random weights: plenty of candidates
    assert data.images["nm_exhausted"].tolist() == [1, 1]
    np.testing.assert_allclose(data.images["nm_floor"], 0.005)
    np.testing.assert_allclose(data.images["nm_score_thresh"], 0.01)
    assert data.images["nm_max_detections"].tolist() == [5, 5]
    seen = set()
    for i in range(len(data)):
        det = data.image_detections(i)
        m = data.image_near_misses(i)
        assert len(det) == 5
        scores = m["scores"].numpy()
        assert (np.diff(scores) <= 0).all()  # visiting order
        for j in range(len(scores)):
            reason = int(m["reason"][j])
            seen.add(reason)
            if reason == BELOW_SCORE:
                assert 0.005 < scores[j] <= 0.01
                assert int(m["suppressed_by"][j]) == -1 and np.isnan(float(m["suppressor_iou"][j]))
            elif reason == SUPPRESSED:
                assert scores[j] > 0.01
                by = int(m["suppressed_by"][j])
                if by >= 0:
                    assert int(det.labels[by]) == int(m["labels"][j])
                    assert float(det.scores[by]) >= scores[j]
                    iou = float(m["suppressor_iou"][j])
                    assert iou > 0.5
                    assert box_iou(det.boxes[by].numpy(), m["boxes"][j].numpy()) == pytest.approx(
                        iou, abs=1e-3
                    )
            else:
                assert reason == OVER_CAP
                assert scores[j] <= float(det.scores.min())
        # The candidates' logits are the detections' kind of row: the candidate's class_logits.
        assert (m["candidate_index"] >= 0).all()
    assert {SUPPRESSED, OVER_CAP} <= seen


def test_segments_are_format_5_and_mixed_results_stay_aligned(tmp_path):
    model = rcnn()
    with pyodlog.create_logger(
        model, "m", "v", result_name="r", auto_sync=False, near_miss=0
    ) as lg:
        lg(images(0))
        lg.wait_for_save()
    with pyodlog.create_logger(
        model, "m", "v", result_name="r", auto_sync=False, near_miss=8
    ) as lg:
        lg(images(1))
    for segment in result_dir().glob("seg-*.h5"):
        with h5py.File(segment, "r") as f:
            assert f.attrs["segment_format"] == SEGMENT_FORMAT == 5
    result = pyodlog.open_result(result_dir(), strict=True)
    assert len(result) == 4
    assert result.images["nm_k"].tolist() == [-1, -1, 8, 8]
    # A float32 head (0), and the images logged without near-misses read as not logged (0).
    assert result.images["nm_score_dtype"].tolist() == [0, 0, 0, 0]
    assert result.images["nm_count"].tolist()[:2] == [0, 0]
    assert all(len(v) == 0 for v in result.image_near_misses(0).values())
    assert len(result.image_near_misses(2)["scores"]) == 8
    assert len(result.near_misses["scores"]) == int(result.images["nm_count"].sum())
    # Uncertainty was logged by both loggers.
    assert not np.isnan(result.detections["entropy"]).any()
    # Replaying at the logged thresholds is the logged detections.
    rep = result.replay()
    assert rep.counts.tolist() == result.images["det_count"].tolist()


def result_dir() -> Path:
    return Path(os.environ["PYODLOG_HOME"]) / "m" / "v" / "r"


def test_a_file_of_pyodlog_0_1_0_has_no_near_misses_and_replays_only_itself(tmp_path):
    directory = tmp_path / "golden" / "v1" / "run"
    unpack_golden("segment-0.1.0.h5.gz", directory, "seg-golden.h5", checksum=False)
    result = pyodlog.open_result(directory, strict=True)
    assert result.near_misses == {} and "entropy" not in result.detections
    assert result.image_near_misses(0) == {}
    rep = result.replay()
    assert rep.counts.tolist() == result.images["det_count"].tolist()
    with pytest.raises(ValueError, match="without their thresholds"):
        result.replay(score_thresh=0.5)
    with pytest.raises(ValueError, match="thresholds were not logged either"):
        result.replay(score_thresh=0.5, iou_thresh=0.5, max_detections_per_image=10)
    best = result.replay(0.5, 0.5, 10, strict=False)
    assert not best.exact.any()


def test_a_segment_with_only_part_of_the_near_miss_columns_is_refused(tmp_path):
    model = rcnn()
    with pyodlog.create_logger(
        model, "m", "v", result_name="r", auto_sync=False, near_miss=4
    ) as lg:
        lg(images())
    segment = next(result_dir().glob("seg-*.h5"))
    with h5py.File(segment, "a") as f:
        del f["near_misses/reason"]
    for sidecar in result_dir().glob("*.sha256"):
        sidecar.unlink()
    with pytest.raises(pyodlog.CorruptResultError, match="near_misses/reason"):
        pyodlog.open_result(result_dir(), strict=True)


def test_a_format_2_segment_reads_as_before_without_near_misses(tmp_path):
    """Written before near-misses existed (tests/golden/README.md): read unchanged, no near-miss
    or uncertainty column, and replay gives back its detections."""
    expected = golden_expected("segment-format2.json")
    directory = tmp_path / "golden2" / "v1" / "run"
    unpack_golden("segment-format2.h5.gz", directory, "seg-golden2.h5", checksum=True)
    with h5py.File(directory / "seg-golden2.h5", "r") as f:
        assert f.attrs["segment_format"] == 2
    result = pyodlog.open_result(directory, strict=True)
    assert result.images["input_id"] == expected["input_id"]
    assert result.images["det_count"].tolist() == expected["det_count"]
    np.testing.assert_array_equal(result.detections["scores"], np.float32(expected["scores"]))
    assert result.detections["labels"].tolist() == expected["labels"]
    assert result.near_misses == {} and "entropy" not in result.detections
    assert "nm_offset" not in result.images
    assert result.replay().counts.tolist() == expected["det_count"]


def test_near_misses_are_stored_in_the_detections_precision_and_the_collector_accepts_them(
    tmp_path,
):
    """Compact storage (the default) applies to near-misses as to detections, so a replay mixes
    rows of one kind; the reference collector's segment check accepts such a segment."""
    from pyodlog_collector.segment_check import check_segment

    with pyodlog.create_logger(rcnn(), "m", "v", result_name="r", near_miss=8) as lg:
        lg(images(0))
        lg.wait_for_save()
    segments = sorted(result_dir().glob("seg-*.h5"))
    assert segments
    for segment in segments:
        with h5py.File(segment, "r") as f:
            assert f["near_misses/logits"].dtype == np.float16  # like detections/logits
            if "detections/embeddings" in f:
                assert f["near_misses/embeddings"].dtype == f["detections/embeddings"].dtype
                assert f["near_misses/embeddings"].shape[1] == f["detections/embeddings"].shape[1]
        check_segment(segment)  # raises InvalidSegment if the collector would refuse it
    result = pyodlog.open_result(result_dir(), strict=True)
    assert result.near_misses["logits"].dtype == np.float32  # widened on read
    assert result.near_misses["logits"].shape[1] == result.detections["logits"].shape[1]


def test_a_score_dtype_column_of_another_type_or_an_unknown_code_is_refused(tmp_path):
    """images/nm_score_dtype (format 5) read only as pyodlog writes it: uint8, codes 0-2 (replay
    could not know how a model of another code rounded its thresholds)."""
    model = rcnn()
    with pyodlog.create_logger(
        model, "m", "v", result_name="r", auto_sync=False, near_miss=4
    ) as lg:
        lg(images())
    segment = next(result_dir().glob("seg-*.h5"))
    original = segment.read_bytes()

    def rewritten(change):
        segment.write_bytes(original)
        with h5py.File(segment, "a") as f:
            change(f)
        write_checksum(segment)

    def as_float(f):
        values = f["images/nm_score_dtype"][()]
        del f["images/nm_score_dtype"]
        f.create_dataset("images/nm_score_dtype", data=values.astype(np.float64))

    rewritten(as_float)
    with pytest.raises(pyodlog.CorruptResultError, match="nm_score_dtype"):
        pyodlog.open_result(result_dir(), strict=True)
    rewritten(lambda f: f["images/nm_score_dtype"].__setitem__(0, 7))
    with pytest.raises(pyodlog.CorruptResultError, match=r"nm_score_dtype holds \[7\]"):
        pyodlog.open_result(result_dir(), strict=True)
