"""Multi-rank logging under a real torchrun job (2 ranks, gloo, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyodlog
from pyodlog.io import open_result, recover_segments
from pyodlog.io.reader import read_segment, trim_to_consistent
from tests.helpers import child_env

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


def torchrun(tmp_path, home, *args, timeout=300, **env_vars):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = child_env(PYODLOG_HOME=str(home), OMP_NUM_THREADS="1", **env_vars)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "tests.helpers.dist_worker",
            *args[:1],
            str(out),
            *args[1:],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    reports = {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}
    return run, reports, out


def test_rank0_exports_every_ranks_records_exactly_once(tmp_path, isolated_data_root):
    run, reports, out = torchrun(tmp_path, isolated_data_root, "export", "--calls", "3")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        reports[0]["result_name"] == reports[1]["result_name"]
        and reports[0]["n_epoch"] == reports[1]["n_epoch"] == 0
    )
    assert reports[1]["export"] is None and reports[0]["export"] == str(out / "all.zip")
    exported = open_result(out / "all.zip")
    logged = reports[0]["ids"] + reports[1]["ids"]
    assert sorted(exported.images["input_id"]) == sorted(logged) and len(set(logged)) == 12
    assert (
        int(exported.images["det_count"].sum())
        == sum(reports[0]["detections"] + reports[1]["detections"])
        > 0
    )
    # Each rank wrote its own segments, named and stamped with its rank.
    segments = sorted(Path(reports[0]["directory"]).glob("*.h5"))
    assert {s.name.split("-")[2] for s in segments} == {"r000", "r001"}
    assert exported.manifest["counts"]["segments"] == len(segments)


def test_ranks_follow_rank0s_result_and_epoch_and_a_missing_shared_folder_is_a_clear_error(
    tmp_path, isolated_data_root, monkeypatch
):
    from tests.helpers.dist_worker import LOGGER_ARGS, make_model

    # Rank 0's folder already holds a result at epoch 4; rank 1's folder is empty.
    monkeypatch.setenv("PYODLOG_HOME", str(isolated_data_root / "rank0"))
    with (
        pyodlog.create_logger(
            make_model(), result_name="earlier", n_epoch=4, **LOGGER_ARGS
        ) as earlier,
        torch.inference_mode(),
    ):
        earlier([torch.rand(3, 100, 100)])
    run, reports, _ = torchrun(
        tmp_path, isolated_data_root, "export", "--calls", "1", "--separate-homes"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        assert reports[rank]["result_name"] == "earlier" and reports[rank]["n_epoch"] == 4
    assert "rank 0 cannot see 1 segment(s) of rank 1" in reports[0]["export_error"]
    assert "auto_sync to a collector" in reports[0]["export_error"]
    assert "export" in reports[1] and reports[1]["export"] is None


def test_a_rank_that_dies_leaves_every_acknowledged_record_readable(tmp_path, isolated_data_root):
    run, _, out = torchrun(tmp_path, isolated_data_root, "die", "--calls", "4")
    assert run.returncode != 0  # rank 1 was killed; torchrun then stopped rank 0
    acked = {rank: (out / f"acked-rank{rank}.txt").read_text().split() for rank in (0, 1)}
    assert len(acked[1]) == 8 and len(acked[0]) >= 2
    (result_dir,) = list((isolated_data_root / "det" / "v1").iterdir())
    closed_before = sorted(result_dir.glob("*.h5"))
    for segment in closed_before:  # every closed segment reads back completely
        tables = read_segment(segment)
        assert tables.n_images > 0 and trim_to_consistent(tables).n_images == tables.n_images
    recover_segments(result_dir)  # what the next logger on this result does by itself
    assert list(result_dir.glob("*.part")) == [] and not (result_dir / "quarantine").exists()
    stored = open_result(result_dir).images["input_id"]
    assert len(stored) == len(set(stored))  # nothing twice
    for rank in (0, 1):
        assert set(acked[rank]) <= set(stored), f"rank {rank} lost acknowledged records"


def test_export_names_a_rank_that_does_not_arrive(tmp_path, isolated_data_root):
    run, reports, _ = torchrun(tmp_path, isolated_data_root, "skip-export", "--calls", "1")
    assert "not every rank arrived within 3 s" in reports[0]["export_error"], run.stderr[-3000:]
    assert (
        "Ranks 1 failed to pass monitoredBarrier" in reports[0]["export_error"]
    )  # names who is missing


def test_without_a_shared_folder_auto_sync_merges_the_ranks_on_the_collector(
    tmp_path, isolated_data_root
):
    from tests.helpers.collector_process import KEY_A, CollectorProcess, write_keys

    collector = CollectorProcess(tmp_path / "collector", write_keys(tmp_path / "keys.txt")).start()
    try:
        run, reports, _ = torchrun(
            tmp_path,
            isolated_data_root,
            "sync",
            "--calls",
            "3",
            "--separate-homes",
            PYODLOG_API_ENDPOINT=collector.url,
            PYODLOG_API_KEY=KEY_A,
        )
    finally:
        collector.stop()
    assert run.returncode == 0, run.stderr[-3000:]
    assert reports[0]["pending"] == reports[1]["pending"] == 0
    assert reports[0]["directory"] != reports[1]["directory"]  # two separate data folders
    merged = open_result(collector.root / "tenant-a" / "det" / "v1" / reports[0]["result_name"])
    assert sorted(merged.images["input_id"]) == sorted(reports[0]["ids"] + reports[1]["ids"])
    assert len(set(merged.images["input_id"])) == 12
