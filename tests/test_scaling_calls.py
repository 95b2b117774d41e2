"""benchmarks/scaling_calls.py measures what its tables say (issue 17, curves not points).

Small, real runs: a Faster R-CNN with random weights at 128 px, one or two rotations, so that the
benchmark cannot rot between the runs that fill RESULTS.md.
"""

from __future__ import annotations

import pytest

from benchmarks.scaling_calls import (
    LOGGED,
    Soak,
    call_table,
    measure_point,
    memory_table,
    profile_points,
    profile_table,
)


def test_a_point_times_bare_and_every_logger_and_every_logged_call_is_written():
    from benchmarks.scaling_calls import _model

    point = measure_point(30, 1, 30, rotations=2, budget_s=0.0, model=_model(30, min_size=128))
    assert set(point.seconds) == {"bare", *LOGGED}
    assert point.detections == 30  # the loggers set detections_per_img; the quota is filled
    assert point.rotations == 2
    for name in LOGGED:
        # one warm-up rotation and two timed ones, none dropped: the writer kept up
        assert point.written[name] == (3, 0)
        ratios = point.ratios[name]
        assert ratios.n == 2 and ratios.q1 <= ratios.median <= ratios.q3
        assert point.fastest[name] > 0
    table = call_table("t", "detections", [point], "detection")
    assert "| 30 | 30 |" in table and "records written/dropped per point" in table


def test_soak_slope_is_bytes_per_call_after_warm_up():
    # 1 MiB of warm-up growth, then exactly 100 bytes per call.
    samples = [(c, 1 << 20 if c <= 20 else (1 << 21) + 100 * c) for c in range(10, 110, 10)]
    soak = Soak(samples, 1.0, written=100, dropped=0)
    assert soak.after_warmup()[0][0] == 30
    assert soak.bytes_per_call() == pytest.approx(100.0)
    assert "+100 bytes per call" in memory_table(soak, every=10)


def test_memory_soak_samples_rss_every_n_calls():
    from benchmarks.memory_soak import soak
    from benchmarks.scaling_calls import _model

    samples, stats = soak(6, every=3, model=_model(100, min_size=128))
    assert [c for c, _ in samples] == [3, 6]
    assert all(rss > 0 for _, rss in samples)
    assert stats["written"] == 6 and stats["dropped"] == 0


def test_profile_rows_cover_the_logger_call_path():
    points = [(1, 10), (1, 100), (2, 100)]
    rows = profile_points(points, min_size=128)
    after = rows["after the model (record of the call)"]
    # match_detections is part of the record of the call, measured inside it.
    assert all(0 < m <= a for m, a in zip(rows["  match_detections"], after))
    table = profile_table(rows, points)
    assert "log-log slope vs batch (100 det.)" in table


def test_writer_share_pairs_hdf5_and_memory_sinks_at_each_detection_count():
    from benchmarks.scaling_calls import writer_share

    table = writer_share(rotations=1, budget_s=0.0)
    rows = [line for line in table.splitlines() if line.startswith("| 1")]
    assert [row.split("|")[1].strip() for row in rows] == ["10", "100", "1,000"]
    assert all(row.rstrip(" |").endswith("| 1") for row in rows)  # one timed rotation each
