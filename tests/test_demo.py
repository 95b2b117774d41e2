"""`make demo` end to end (small counts), and the paired-rotation timing it shares with the benchmark."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyodlog
from pyodlog.demokit.scenes import make_scenes
from pyodlog.demokit.timing import RatioSummary, paired_rotation

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_logs_val_and_deploying_and_prints_the_next_commands(tmp_path):
    env = {
        **os.environ,
        "PYODLOG_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyodlog.demo",
            *("--val", "6", "--deploying", "5", "--batch", "4"),
            *("--timing-seconds", "0.5", "--export-dir", str(tmp_path / "exports")),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    zips = list((tmp_path / "exports").glob("*.zip"))
    assert len(zips) == 1
    zip_path = zips[0]
    assert f"  pyodlog view {zip_path}\n" in out
    assert (
        f"  pyodlog report {zip_path} --where dataset_type=deploying --against {zip_path} "
        "--against-where dataset_type=val --out demo-report.html\n"
    ) in out
    assert "outputs unchanged by logging: True; the ZIP's detections equal the model's: True" in out
    assert re.search(r"logged/bare x\d+\.\d+ \(IQR \d+\.\d+-\d+\.\d+, \d+ paired calls\)", out), out
    assert re.search(
        r"detector on val: precision (0\.[89]\d|1\.00), recall (0\.[89]\d|1\.00)", out
    ), out

    result = pyodlog.open_result(zip_path)
    kinds = [str(v) for v in result.images["dataset_type"]]
    assert kinds == ["val"] * 6 + ["deploying"] * 5
    assert [str(v) for v in result.images["input_id"]][:2] == ["val-000", "val-001"]
    assert {str(v) for v in result.images["camera"][6:]} <= {"field-cam-0", "field-cam-1"}
    assert len(result.detections["boxes"]) > 0
    val_objects = sum(len(s.labels) for s in make_scenes(6, "val"))
    assert f"ground truth logged with val: {val_objects} objects" in out
    assert len(result.targets["boxes"]) == val_objects
    assert result.class_names is not None and "circle" in result.class_names
    assert all(result.thumbnail(i) for i in range(len(result)))  # the viewer shows the scenes
    assert "nm_count" in result.images  # near-misses logged (what the model almost said)


class FakeClock:
    """A clock the timed calls advance by a known amount (so ratios are exact)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_paired_rotation_warms_up_alternates_the_order_and_pairs_the_ratios():
    clock, order = FakeClock(), []

    def call(name: str, seconds: float):
        def run() -> None:
            order.append(name)
            clock.now += seconds

        return run

    timed = paired_rotation(
        {"bare": call("bare", 1.0), "logged": call("logged", 1.25)}, 4, warmup=2, clock=clock
    )
    # two untimed warm-up rotations, then four timed ones in alternating order
    assert order == ["bare", "logged"] * 2 + ["bare", "logged", "logged", "bare"] * 2
    assert timed.rotations == 4 and timed.warmup == 2
    assert timed.times["bare"] == [1.0] * 4 and timed.times["logged"] == [1.25] * 4
    assert timed.ratios("logged", "bare") == [1.25] * 4
    summary = timed.ratio("logged", "bare")
    assert (summary.median, summary.q1, summary.q3, summary.n) == (1.25, 1.25, 1.25, 4)
    assert str(summary) == "x1.250 (IQR 1.250-1.250, 4 paired calls)"


def test_paired_rotation_stops_at_the_time_budget_but_not_before_the_minimum():
    clock = FakeClock()

    def run() -> None:
        clock.now += 1.0

    timed = paired_rotation(
        {"a": run, "b": run}, 100, warmup=0, time_budget_s=7.0, min_rotations=2, clock=clock
    )
    assert timed.rotations == 4  # 2 s per rotation: stops once 8 s >= 7 s were spent
    timed = paired_rotation(
        {"a": run, "b": run}, 100, warmup=0, time_budget_s=0.0, min_rotations=3, clock=clock
    )
    assert timed.rotations == 3


def test_the_ratio_summary_is_the_median_and_quartiles_of_the_paired_ratios():
    summary = RatioSummary.of([1.0, 1.1, 1.2, 1.3, 5.0])  # one outlier rotation
    assert summary.median == pytest.approx(1.2)
    assert (summary.q1, summary.q3) == (pytest.approx(1.1), pytest.approx(1.3))
    with pytest.raises(ValueError, match="at least one rotation"):
        RatioSummary.of([])
