"""The local disk budget (pyodlog.Retention) on real segment files, with acknowledgements from the real
collector process over loopback: acknowledged segments are deleted oldest first to fit, unacknowledged
ones never (unless drop_unsynced), and what does not fit is dropped and counted, never written."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

import pyodlog
from pyodlog.io import HDF5Store, WriterConfig, open_result
from pyodlog.io.reader import read_segment
from pyodlog.io.retention import DEFAULT_MAX_LOCAL_BYTES, folder_bytes
from pyodlog.sync import SyncConfig
from tests.helpers.collector_process import KEY_A, CollectorProcess, write_keys
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger
from tests.test_store_hardening import small_disk  # noqa: F401 - a fixture (a real small tmpfs)

MIB = 1 << 20
FAST = dict(retries=2, backoff=0.01, max_retry_interval=0.2, close_timeout=10)


@pytest.fixture
def collector(tmp_path):
    server = CollectorProcess(
        tmp_path / "collector",
        write_keys(tmp_path / "keys.txt"),
        ["--max-request-bytes", "16M", "--max-segment-bytes", "64M"],
    ).start()
    yield server
    server.stop()


class Run:
    """A TinyDetector logger with a small budget; remembers every segment it closed."""

    def __init__(self, root: Path, retention, endpoint: str | None = None, per_segment: int = 3):
        torch.manual_seed(0)
        self.store = HDF5Store(
            root, config=WriterConfig(flush_interval=0.05, segment_max_records=per_segment)
        )
        self.logger = TinyDetectorLogger(
            TinyDetector().eval(),
            "tiny",
            "v1",
            result_name="run",
            sink=self.store,
            auto_sync=False,
            api_endpoint=endpoint,
            api_key=KEY_A if endpoint else None,
            sync_config=SyncConfig(**FAST),
            retention=retention,
            metrics=False,
        )
        self.closed: list[str] = []
        self.store.add_segment_listener(lambda path: self.closed.append(path.name))
        self.calls = 0
        self.peak = 0
        self.gen = torch.Generator().manual_seed(1)

    @property
    def folder(self) -> Path:
        assert self.store.directory is not None
        return self.store.directory

    def log(self, n: int) -> None:
        """n calls of one image each; the folder is measured after each is saved."""
        with torch.inference_mode():
            for _ in range(n):
                self.logger([torch.rand(3, 16, 16, generator=self.gen)], [f"call-{self.calls}"])
                self.calls += 1
                self.logger.wait_for_save()
                self.peak = max(self.peak, folder_bytes(self.folder))

    def log_until_over_budget(self, limit: int = 200) -> None:
        while not self.store.over_budget:
            assert self.calls < limit, "the budget never filled"
            self.log(1)

    def present(self) -> set[str]:
        return {p.name for p in self.folder.glob("*.h5")}


def images_in(paths) -> int:
    return sum(read_segment(p).n_images for p in paths)


def test_retention_arguments_are_checked_before_anything_is_written(tmp_path):
    for bad in (dict(max_local_bytes=0), dict(max_local_bytes=1.5), dict(max_age=-1)):
        with pytest.raises(ValueError, match="Retention"):
            pyodlog.Retention(**bad)
    with pytest.raises(ValueError, match="drop_unsynced"):
        pyodlog.Retention(drop_unsynced="yes")
    model = TinyDetector().eval()
    with pytest.raises(ValueError, match="retention must be a pyodlog.Retention"):
        TinyDetectorLogger(model, "tiny", "v1", retention=10 << 30, metrics=False)
    with pytest.raises(ValueError, match="InMemorySink"):
        TinyDetectorLogger(
            model,
            "tiny",
            "v1",
            sink=pyodlog.InMemorySink(),
            retention=pyodlog.Retention(max_local_bytes=MIB),
            metrics=False,
        )
    # The default sink gets the default budget; an in-memory sink none (and no error).
    with TinyDetectorLogger(model, "tiny", "v1", sink=pyodlog.InMemorySink(), metrics=False) as lg:
        assert lg.stats()["local_budget_bytes"] is None


def test_the_default_budget_cannot_fill_the_disk(tmp_path):
    with TinyDetectorLogger(TinyDetector().eval(), "tiny", "v1", metrics=False) as logger:
        budget = logger.stats()["local_budget_bytes"]
        free = shutil.disk_usage(logger.sink.directory).free
        held = folder_bytes(logger.sink.directory)
    assert budget <= DEFAULT_MAX_LOCAL_BYTES
    # min(10 GiB, held + 25 % of the free space at start): other writers on this disk move `free`.
    assert budget == pytest.approx(min(DEFAULT_MAX_LOCAL_BYTES, held + free / 4), rel=0.05)
    assert budget < free


def test_a_local_only_logger_never_deletes_and_drops_what_does_not_fit(tmp_path, caplog):
    budget = 4 * MIB
    run = Run(tmp_path, pyodlog.Retention(max_local_bytes=budget))
    with caplog.at_level(logging.WARNING, "pyodlog"):
        run.log_until_over_budget()
        run.log(10)  # all dropped at the call: the budget is full of unacknowledged data
    stats = run.logger.stats()
    run.logger.close()
    assert run.closed and set(run.closed) <= run.present()  # nothing closed was deleted
    assert run.peak <= budget and folder_bytes(run.folder) <= budget
    assert stats["segments_deleted"] == 0 and stats["over_budget"] is True
    assert (
        stats["dropped_by_reason"] == {"disk_budget": stats["dropped"]} and stats["dropped"] >= 10
    )
    assert stats["calls_seen"] == run.calls == stats["calls_logged"] + stats["dropped"]
    assert len(open_result(run.folder)) == stats["calls_logged"]  # exactly what was counted
    full = [r.getMessage() for r in caplog.records if "budget" in r.getMessage()]
    assert len(full) == 1 and "is full" in full[0] and "dropped_by_reason" in full[0]


def test_acknowledged_segments_are_deleted_oldest_first_and_logging_resumes(tmp_path, collector):
    budget = 6 * MIB
    run = Run(tmp_path / "home", pyodlog.Retention(max_local_bytes=budget), collector.url)
    run.log_until_over_budget()
    dropped_before = run.logger.stats()["dropped_by_reason"]["disk_budget"]
    assert set(run.closed) <= run.present()  # nothing acknowledged yet: nothing deleted

    summary = run.logger.upload()  # the collector acknowledges every closed segment
    acked = run.logger.syncer.state.acknowledged_names()
    assert summary.segments >= 2 and set(run.closed) == acked
    run.store.retention.check()  # what the retention thread does on the acknowledgement
    assert not run.store.over_budget
    deleted = set(run.closed) - run.present()
    assert deleted and deleted <= acked  # only acknowledged ones
    # Oldest first: what is left of the acknowledged segments is the newest of them.
    order = sorted(acked)
    assert sorted(deleted) == order[: len(deleted)]
    held = {p.name for p in collector.segments("tenant-a", "tiny", "v1", "run")}
    assert deleted <= held

    run.log(6)  # fits again: two more segments (acknowledged segments make room as needed)
    stats = run.logger.stats()
    run.logger.upload()
    run.store.retention.check()
    run.logger.close()
    assert stats["dropped_by_reason"]["disk_budget"] == dropped_before  # no new drop
    assert stats["segments_deleted"] >= len(deleted)  # counted (more may go to make room)
    assert run.peak <= budget
    # Every stored call is exactly once either here or at the collector (deleted ones only there).
    local = {p.name: p for p in run.folder.glob("*.h5")}
    remote = {p.name: p for p in collector.segments("tenant-a", "tiny", "v1", "run")}
    assert set(run.closed) == set(local) | set(remote)
    final = run.logger.stats()
    assert images_in({**remote, **local}.values()) == final["calls_logged"]
    assert final["calls_logged"] + final["dropped"] == final["calls_seen"] == run.calls


def test_delete_after_sync_false_keeps_acknowledged_segments_and_drops_instead(tmp_path, collector):
    budget = 4 * MIB
    policy = pyodlog.Retention(max_local_bytes=budget, delete_after_sync=False)
    run = Run(tmp_path / "home", policy, collector.url)
    run.log_until_over_budget()
    run.logger.upload()
    run.store.retention.check()
    run.log(3)
    stats = run.logger.stats()
    run.logger.close()
    assert set(run.closed) <= run.present() and stats["segments_deleted"] == 0
    assert stats["over_budget"] and stats["dropped_by_reason"]["disk_budget"] >= 3
    assert run.peak <= budget


def test_max_age_deletes_acknowledged_segments_only(tmp_path, collector):
    policy = pyodlog.Retention(max_local_bytes=1 << 30, max_age=1e-3)
    run = Run(tmp_path / "home", policy, collector.url)
    run.log(6)
    run.logger.upload()  # closes the open segment too: two acknowledged segments
    acked = set(run.closed)
    run.log(3)  # one more closed segment, never sent
    unsent = set(run.closed) - acked
    run.store.retention.check()
    stats = run.logger.stats()
    run.logger.close()
    assert acked and unsent
    assert run.present() >= unsent and not (run.present() & acked)
    assert stats["segments_deleted"] == len(acked) and stats["dropped"] == 0


def test_drop_unsynced_deletes_the_oldest_unacknowledged_segments_and_counts_them(tmp_path):
    budget = 5 * MIB
    run = Run(tmp_path, pyodlog.Retention(max_local_bytes=budget, drop_unsynced=True))
    run.log(40)
    stats = run.logger.stats()
    run.logger.close()
    gone = [name for name in run.closed if name not in run.present()]
    assert stats["segments_dropped_unsynced"] == len(gone) >= 1
    assert gone == run.closed[: len(gone)]  # oldest first
    assert stats["segments_deleted"] == 0  # none of them was acknowledged
    assert run.peak <= budget
    assert stats["dropped"] == 0 and stats["calls_logged"] == run.calls


def test_over_budget_is_what_the_inference_path_reads(tmp_path):
    run = Run(tmp_path, pyodlog.Retention(max_local_bytes=4 * MIB))
    run.log_until_over_budget()
    before = run.store.stats()["submitted"]
    assert run.store.over_budget and run.logger.stats()["over_budget"]
    run.log(1)
    after = run.store.stats()
    run.logger.close()
    # Counted as submitted and dropped at once: the invariant of the writer's counters holds.
    assert after["submitted"] == before + 1
    assert after["submitted"] == after["written"] + after["dropped"] + after["queued"]


def test_the_default_budget_keeps_a_small_disk_from_filling(small_disk):  # noqa: F811
    """On a real 12 MiB tmpfs, where the same logging without a budget ends in ENOSPC
    (tests/test_store_hardening.py), the default budget drops and counts instead."""
    free_at_start = shutil.disk_usage(small_disk).free
    store = HDF5Store(small_disk / "data", config=WriterConfig(flush_interval=0.01))
    logger = TinyDetectorLogger(
        TinyDetector().eval(),
        "tiny",
        "v1",
        result_name="r",
        sink=store,
        target_layers={"b": {"path": "backbone.0", "compression": "none"}},  # ~260 KB per image
        metrics=False,
    )
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for i in range(40):
            logger([torch.rand(3, 32, 32, generator=g)], [f"{i}"])
            logger.wait_for_save()  # never StorageError: the disk never fills
    stats = logger.stats()
    logger.close()
    assert stats["local_budget_bytes"] <= free_at_start / 4 + 1
    assert stats["dropped_by_reason"]["disk_budget"] >= 1
    assert stats["calls_logged"] + stats["dropped"] == stats["calls_seen"] == 40
    assert folder_bytes(small_disk / "data") <= free_at_start / 4 + (64 << 10)
    assert shutil.disk_usage(small_disk).free >= 0.7 * free_at_start
