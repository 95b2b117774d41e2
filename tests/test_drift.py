"""pyodlog.analysis.compare: drift between slices of results written through the real HDF5 store.

Each case changes one thing between two synthetic results (class mix, scores, embeddings, a logged
uncertainty column) and checks that exactly the signals that measure it drift; results drawn from
the same distribution show none.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pyodlog
from pyodlog.analysis import DriftReport, compare
from tests.helpers.synthetic_results import write_synthetic_result

N_IMAGES = 300
NAMES = ["cat", "dog", "car", "bus", "person"]
SHIFTED_MIX = [0.4, 0.3, 0.1, 0.1, 0.1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift_results")

    def write(name, seed, **kwargs):
        return pyodlog.open_result(
            write_synthetic_result(root, name, N_IMAGES, seed=seed, **kwargs)
        )

    return {
        "reference": write("reference", 1),
        "same": write("same", 2),
        "mix": write("mix", 3, class_probs=SHIFTED_MIX),
        "scores": write("scores", 4, score_shift=0.15),
        "embeddings": write("embeddings", 5, embed_shift=0.3),
        "named": write("named", 6, class_names=NAMES),
        "named_mix": write("named_mix", 7, class_names=NAMES, class_probs=SHIFTED_MIX),
        "root": root,
    }


HIST_SIGNALS = {"detections_per_image", "score", "box_size", "box_aspect"}


def test_a_slice_against_itself_has_zero_statistics_and_no_drift(results):
    a = results["reference"]
    report = compare(a, a)
    assert report.drifted == []
    d = report.to_dict()
    assert {"class_frequency", "embedding", *HIST_SIGNALS} <= set(d)
    for name in ["class_frequency", *HIST_SIGNALS]:
        assert d[name]["statistic"] == 0.0, name
    for c in range(5):
        assert d[f"score[{c}]"]["statistic"] == 0.0
        assert f"embedding[{c}]" in d


def test_slices_from_the_same_distribution_show_no_drift(results):
    report = compare(results["reference"], results["same"])
    assert report.drifted == [], str(report)
    assert len(report) >= 20  # every signal was computed, per class too


def test_a_shifted_class_mix_drifts_class_frequency_only(results):
    report = compare(results["reference"], results["mix"])
    assert report.drifted == ["class_frequency"], str(report)
    signal = report.to_dict()["class_frequency"]
    assert signal["statistic"] > signal["threshold"] and signal["p_value"] < 1e-6
    assert signal["current"]["shares"]["0"] == pytest.approx(0.4, abs=0.03)
    # A threshold per signal name (or per method) changes the verdict, not the statistic.
    lenient = compare(results["reference"], results["mix"], thresholds={"class_frequency": 0.5})
    assert lenient.drifted == [] and lenient["class_frequency"].statistic == signal["statistic"]
    assert lenient.to_dict()["class_frequency"]["threshold"] == 0.5


def test_shifted_scores_drift_the_score_signals_only(results):
    report = compare(results["reference"], results["scores"])
    assert set(report.drifted) == {"score"} | {f"score[{c}]" for c in range(5)}, str(report)
    d = report.to_dict()
    assert d["score"]["current"]["mean"] == pytest.approx(
        d["score"]["reference"]["mean"] + 0.15, abs=0.02
    )


def test_embeddings_from_another_distribution_drift_the_embedding_signals_only(results):
    report = compare(results["reference"], results["embeddings"])
    assert set(report.drifted) == {"embedding"} | {f"embedding[{c}]" for c in range(5)}, str(report)
    d = report.to_dict()["embedding"]
    assert d["method"] == "mmd2" and d["p_value"] < 0.01 and d["statistic"] > d["threshold"]


def test_class_names_name_the_per_class_signals(results):
    report = compare(results["named"], results["named_mix"])
    assert report.drifted == ["class_frequency"], str(report)
    assert {f"score[{n}]" for n in NAMES} <= set(report.to_dict())
    assert set(report.to_dict()["class_frequency"]["current"]["shares"]) == set(NAMES)


def _with_entropy(data, shift: float, seed: int):
    # The uncertainty columns of issue 14 (written by the near-miss work) as the reader exposes
    # them: float32 per detection in data.detections.
    n = len(data.detections["scores"])
    rng = np.random.default_rng(seed)
    data.detections["entropy"] = (rng.gamma(2.0, 0.3, n) + shift).astype(np.float32)
    return data


def test_a_logged_uncertainty_column_is_compared_and_its_shift_drifts(results):
    root = results["root"]
    ref = _with_entropy(pyodlog.open_result(root / "synthetic/v1/reference"), 0.0, 1)
    same = _with_entropy(pyodlog.open_result(root / "synthetic/v1/same"), 0.0, 2)
    shifted = _with_entropy(pyodlog.open_result(root / "synthetic/v1/same"), 0.5, 3)
    assert "entropy" in compare(ref, same) and compare(ref, same).drifted == []
    assert compare(ref, shifted).drifted == ["entropy"]
    assert "entropy" not in compare(results["reference"], results["same"])  # not logged: no signal


def test_sample_weights_count_each_image_with_its_weight(results):
    root = results["root"]
    write_synthetic_result(root, "weighted", N_IMAGES, seed=8)
    write_synthetic_result(root, "weighted", N_IMAGES, seed=9, class_probs=[0.9, 0.1, 0, 0, 0])
    mixed = pyodlog.open_result(root / "synthetic/v1/weighted")
    assert len(mixed) == 2 * N_IMAGES
    assert "class_frequency" in compare(results["reference"], mixed).drifted
    # The second half sampled with weight 0: the slice is the first half's distribution again.
    second = np.array(["/s9/" in i for i in mixed.images["input_id"]])
    mixed.images["sample_weight"] = np.where(second, 0.0, 1.0).astype(np.float32)
    report = compare(results["reference"], mixed)
    assert report.drifted == [], str(report)
    assert report.to_dict()["detections_per_image"]["current"]["n"] == pytest.approx(N_IMAGES)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def assert_same_report(got: dict, want: dict) -> None:
    """Equal up to the rounding of sums taken in another order."""
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        else:
            assert got[key] == value, key


class _Reversed:
    """A view whose images are in reverse order: det_offset no longer runs contiguously."""

    def __init__(self, data):
        self.detections = data.detections
        self.images = {k: v[::-1] for k, v in data.images.items()}
        self.manifest = data.manifest


def test_chunk_size_and_row_order_do_not_change_the_statistics(results):
    ref, cur = results["reference"], results["mix"]
    whole = compare(ref, cur).to_dict()
    assert_same_report(compare(ref, cur, chunk_detections=500).to_dict(), whole)
    reordered = compare(ref, _Reversed(cur), chunk_detections=700).to_dict()
    for name, values in whole.items():
        if not name.startswith("embedding"):  # the embedding sample depends on the order
            assert reordered[name]["statistic"] == pytest.approx(values["statistic"]), name
            assert reordered[name]["drift"] == values["drift"]


def test_the_report_is_a_dict_a_frame_and_a_table(results):
    report = compare(results["reference"], results["mix"])
    assert isinstance(report, DriftReport)
    d = report.to_dict()
    json.dumps(d, allow_nan=False)  # JSON-safe
    for values in d.values():
        assert {"statistic", "threshold", "drift", "method", "p_value"} <= set(values)
    frame = report.to_frame()
    assert list(frame.index) == list(d) and bool(frame.loc["class_frequency", "drift"])
    text = str(report)
    assert "class_frequency" in text and "DRIFT" in text and "1 of" in text


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU present")
def test_the_embedding_test_runs_on_the_gpu_with_the_same_verdicts(results):
    ref, cur = results["reference"], results["embeddings"]
    on_cpu = compare(ref, cur, device="cpu").to_dict()
    on_gpu = compare(ref, cur, device="cuda").to_dict()
    for name, values in on_cpu.items():
        assert on_gpu[name]["drift"] == values["drift"], name
        assert on_gpu[name]["statistic"] == pytest.approx(values["statistic"], rel=1e-3, abs=1e-6)


def test_chunks_cover_every_detection_once_in_image_order(results):
    from pyodlog.analysis.drift import iter_chunks

    data = _Reversed(results["mix"])
    for chunk_detections, image_block in ((1, 7), (50, 16), (333, 1000), (1 << 18, 1 << 16)):
        rows, images = [], []
        for chunk in iter_chunks(data, chunk_detections, image_block):
            index = chunk.det_index
            got = np.arange(index.start, index.stop) if isinstance(index, slice) else index
            assert len(got) == chunk.det_counts.sum()
            assert len(got) <= chunk_detections or len(chunk.det_counts) == 1
            rows.append(got)
            images.extend(range(chunk.image_rows.start, chunk.image_rows.stop))
        assert images == list(range(len(data.images["det_count"])))
        want = np.concatenate(
            [
                np.arange(o, o + c)
                for o, c in zip(data.images["det_offset"], data.images["det_count"])
            ]
        )
        assert np.array_equal(np.concatenate(rows), want)


def test_progress_bars_are_shown_on_request_and_change_nothing(results, capsys):
    ref, cur = results["reference"], results["mix"]
    quiet = compare(ref, cur, progress=False).to_dict()
    assert capsys.readouterr().err == ""
    shown = compare(ref, cur, progress=True).to_dict()
    err = capsys.readouterr().err
    assert "drift: ranges" in err and "drift: statistics" in err and "det" in err
    assert_same_report(shown, quiet)
