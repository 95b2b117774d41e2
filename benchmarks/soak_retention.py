"""Soak test of the local disk budget: minutes of logging into a small budget, with auto-sync to the
real collector and a collector outage in the middle.

Run: .venv/bin/python -m benchmarks.soak_retention [--seconds 300] [--budget-mib 24]

A TinyDetector logger (one ~64 KB uncompressed feature per call, small segments) logs as fast as it
can with ``auto_sync`` to the reference collector on loopback and
``Retention(max_local_bytes=budget)``. The collector is stopped for the middle third of the run
(nothing is acknowledged: the budget fills with unacknowledged data and new records are dropped),
then started again (segments are acknowledged, deleted, logging resumes). A thread measures the
result folder every 20 ms. At the end it checks, and prints:

- the folder never exceeded the budget (peak of the 20 ms samples and of each check);
- nothing unacknowledged was deleted: every segment the logger closed is still on the local disk or
  held by the collector (a segment deleted before it was acknowledged would be in neither);
- the counts are exact: the images held locally or by the collector (each segment once) equal
  ``stats()["calls_logged"]``, and ``calls_seen == calls_logged + dropped`` equals the calls made;
- some calls were dropped for the budget during the outage, and logging resumed after it.
Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import pyodlog
from benchmarks.environment import print_header
from pyodlog.io import HDF5Store, WriterConfig
from pyodlog.io.reader import read_segment
from pyodlog.io.retention import folder_bytes
from pyodlog.sync import SyncConfig
from tests.helpers.collector_process import KEY_A, CollectorProcess, write_keys
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

MIB = 1 << 20


def soak(seconds: float, budget: int, segment_records: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        collector = CollectorProcess(
            tmp_path / "collector",
            write_keys(tmp_path / "keys.txt"),
            ["--max-request-bytes", "64M", "--max-segment-bytes", "256M", "--quiet"],
        ).start()
        torch.manual_seed(0)
        store = HDF5Store(
            tmp_path / "home",
            config=WriterConfig(flush_interval=0.1, segment_max_records=segment_records),
        )
        logger = TinyDetectorLogger(
            TinyDetector().eval(),
            "soak",
            "v1",
            result_name="run",
            target_layers={"b": {"path": "backbone.0", "compression": "none"}},
            sink=store,
            api_endpoint=collector.url,
            api_key=KEY_A,
            auto_sync=True,
            sync_config=SyncConfig(retries=1, backoff=0.05, max_retry_interval=0.5),
            retention=pyodlog.Retention(max_local_bytes=budget, check_interval=0.5),
            metrics=False,
        )
        folder = store.directory
        assert folder is not None
        closed: list[str] = []
        store.add_segment_listener(lambda path: closed.append(path.name))
        peak = [0]
        done = threading.Event()

        def measure() -> None:
            while not done.wait(0.02):
                peak[0] = max(peak[0], folder_bytes(folder))

        sampler = threading.Thread(target=measure, daemon=True)
        sampler.start()
        g = torch.Generator().manual_seed(1)
        calls = 0
        phases: list[dict] = []
        start = time.monotonic()
        outage = (start + seconds / 3, start + 2 * seconds / 3)
        phase = "before outage"
        with torch.inference_mode():
            while time.monotonic() - start < seconds:
                now = time.monotonic()
                if phase == "before outage" and now >= outage[0]:
                    phases.append({"phase": phase, **_snapshot(logger)})
                    collector.stop()
                    phase = "outage"
                elif phase == "outage" and now >= outage[1]:
                    phases.append({"phase": phase, **_snapshot(logger)})
                    collector.start()  # same port and root
                    phase = "after outage"
                logger([torch.rand(3, 64, 64, generator=g)], [f"{calls:08d}"])
                calls += 1
        phases.append({"phase": phase, **_snapshot(logger)})
        logger.close()  # closes the last segment; auto-sync sends what it can in close_timeout
        logger_state = logger.syncer.state if logger.syncer else None
        final = logger.stats()
        done.set()
        sampler.join()
        peak[0] = max(peak[0], folder_bytes(folder))
        local = {p.name: p for p in folder.glob("*.h5")}
        remote = {p.name: p for p in collector.segments("tenant-a", "soak", "v1", "run")}
        collector.stop()
        acked = logger_state.acknowledged_names() if logger_state else set()
        deleted = set(closed) - set(local)
        held = {**remote, **local}
        images = sum(read_segment(p).n_images for p in held.values())
        checks = {
            "folder never above the budget": peak[0] <= budget,
            "nothing unacknowledged deleted": set(closed) <= set(held) and deleted <= acked,
            "images held == calls_logged": images == final["calls_logged"],
            "calls_seen == logged + dropped == calls made": final["calls_seen"]
            == final["calls_logged"] + final["dropped"]
            == calls,
            "drops only for the budget": set(final["dropped_by_reason"]) <= {"disk_budget"},
            "dropped during the outage": phases[1]["disk_budget"] > phases[0]["disk_budget"],
            "logging resumed after it": final["calls_logged"] > phases[1]["calls_logged"],
        }
        return {
            "seconds": seconds,
            "budget": budget,
            "calls": calls,
            "peak": peak[0],
            "segments_closed": len(closed),
            "segments_deleted": final["segments_deleted"],
            "segments_local": len(local),
            "segments_at_collector": len(remote),
            "images_held": images,
            "final": final,
            "phases": phases,
            "checks": checks,
        }


def _snapshot(logger) -> dict:
    stats = logger.stats()
    return {
        "calls_seen": stats["calls_seen"],
        "calls_logged": stats["calls_logged"],
        "disk_budget": stats["dropped_by_reason"].get("disk_budget", 0),
        "segments_deleted": stats["segments_deleted"],
        "local_mib": stats["local_bytes"] / MIB,
        "over_budget": stats["over_budget"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--budget-mib", type=float, default=24.0)
    parser.add_argument("--segment-records", type=int, default=16)
    args = parser.parse_args(argv)
    out = soak(args.seconds, int(args.budget_mib * MIB), args.segment_records)
    print(
        f"soak_retention: {out['seconds']:.0f} s, budget {out['budget'] / MIB:.1f} MiB, "
        f"{out['calls']} calls, peak folder {out['peak'] / MIB:.2f} MiB; segments closed "
        f"{out['segments_closed']}, deleted (acknowledged) {out['segments_deleted']}, "
        f"left locally {out['segments_local']}, at the collector {out['segments_at_collector']}"
    )
    print(
        "| phase | calls seen | calls logged | dropped (disk_budget) | deleted | local MiB | over budget |"
    )
    print("|---|---|---|---|---|---|---|")
    for p in out["phases"]:
        print(
            f"| {p['phase']} | {p['calls_seen']} | {p['calls_logged']} | {p['disk_budget']} | "
            f"{p['segments_deleted']} | {p['local_mib']:.2f} | {p['over_budget']} |"
        )
    failed = [name for name, ok in out["checks"].items() if not ok]
    for name, ok in out["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    print_header("benchmarks.soak_retention")
    sys.exit(main())
