"""logger.stats() as one documented dict, the same numbers as Prometheus metrics (a private registry,
the default one, a real FastAPI serving app's /metrics), and the real collector's own /metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import prometheus_client
import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

import pyodlog
from pyodlog.io import HDF5Store, WriterConfig
from pyodlog.monitoring.health import STATS_KEYS
from pyodlog.sync import SyncConfig, SyncError
from tests.helpers.collector_process import KEY_A, CollectorProcess, write_keys
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger
from tests.test_serving_example import png

ROOT = Path(__file__).resolve().parent.parent
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


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition (parsed by prometheus_client's own parser)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def labels(model="tiny", result="run", **extra) -> tuple[tuple[str, str], ...]:
    return tuple(
        sorted({"model": model, "version": "v1", "result": result, "rank": "0", **extra}.items())
    )


def make_logger(root, *, result="run", **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("metrics", False)
    store = HDF5Store(root, config=WriterConfig(flush_interval=0.05, segment_max_records=4))
    return TinyDetectorLogger(
        TinyDetector().eval(),
        "tiny",
        "v1",
        result_name=result,
        sink=store,
        auto_sync=False,
        sync_config=SyncConfig(**FAST),
        **kwargs,
    )


def log_saved(logger, n):
    """n calls, each saved before the next: segments close after exactly 4 calls each."""
    for seed in range(n):
        log_calls(logger, 1, seed)
        logger.wait_for_save()


def log_calls(logger, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for i in range(n):
            logger([torch.rand(3, 16, 16, generator=g)], [f"{seed}-{i}"])


class BrokenParse(TinyDetectorLogger):
    """The model answers, the family's parsing fails: a logging error, never raised."""

    def _parse_model_output(self, output, img_sizes):
        raise RuntimeError("parsing failed on purpose")


def test_stats_is_one_dict_with_every_documented_key(tmp_path):
    with make_logger(tmp_path) as logger:
        log_saved(logger, 10)  # segments close at 4 and 8 calls
        stats = logger.stats()
    assert set(STATS_KEYS) <= set(stats)
    assert stats["calls_seen"] == stats["calls_logged"] == stats["written"] == 10
    assert stats["calls_sampled_out"] == 0 and stats["dropped"] == 0
    assert stats["dropped_by_reason"] == {} and stats["logging_errors"] == 0
    assert stats["segments_closed"] == 2 and stats["segments_open"] == 1
    assert stats["bytes_written"] > 0 and stats["queue_depth"] == 0 and stats["queued"] == 0
    assert stats["segments_synced"] == stats["segments_pending"] == 0  # no collector
    assert stats["sync_lag_seconds"] == 0.0 and stats["last_error"] is None
    assert stats["local_bytes"] > 0 and stats["local_budget_bytes"] >= stats["local_bytes"]
    # The existing keys stay.
    for key in ("submitted", "written", "durable", "quarantined", "last_logging_error"):
        assert key in stats

    with TinyDetectorLogger(
        TinyDetector().eval(), "tiny", "v1", sink=pyodlog.InMemorySink(), metrics=False
    ) as memory:
        log_calls(memory, 3)
        stats = memory.stats()
    assert set(STATS_KEYS) <= set(stats)
    assert stats["calls_seen"] == stats["calls_logged"] == 3 and stats["segments_open"] == 0


def test_a_call_that_cannot_be_logged_is_seen_not_logged_and_its_error_reported(tmp_path):
    with BrokenParse(TinyDetector().eval(), "tiny", "v1", metrics=False) as logger:
        log_calls(logger, 2)
        logger.wait_for_save()  # on the CPU the parse runs on the writer thread (deferall)
        stats = logger.stats()
    assert stats["calls_seen"] == 2 and stats["calls_logged"] == 0
    assert stats["logging_errors"] == 2
    assert stats["last_error"] == "logging: RuntimeError: parsing failed on purpose"


def test_sync_state_and_lag_come_from_the_acknowledgements(tmp_path, collector):
    logger = make_logger(tmp_path / "home", api_endpoint=collector.url, api_key=KEY_A)
    log_saved(logger, 8)
    logger.sink.rotate()
    before = logger.stats()
    logger.upload()
    after = logger.stats()
    logger.close()
    assert before["segments_pending"] == 2 and before["segments_synced"] == 0
    assert before["sync_lag_seconds"] > 0
    assert after["segments_pending"] == 0 and after["segments_synced"] == 2
    assert after["sync_lag_seconds"] == 0.0 and after["sync_bytes_sent"] > 0


def test_the_last_error_never_holds_the_key(tmp_path, collector):
    key = "not-a-key-this-collector-knows-0123456789"
    registry = prometheus_client.CollectorRegistry()
    logger = make_logger(tmp_path / "home", api_endpoint=collector.url, api_key=key)
    pyodlog.expose_metrics(logger, registry)
    log_calls(logger, 2)
    with pytest.raises(SyncError):
        logger.upload()
    stats = logger.stats()
    text = prometheus_client.generate_latest(registry).decode()
    logger.close()
    assert stats["last_error"].startswith("sync: ") and "403" in stats["last_error"]
    assert key[:8] not in repr(stats) and key[:8] not in text
    assert samples(text)["pyodlog_logger_error", labels()] == 1.0


def test_prometheus_metrics_are_the_stats_read_at_scrape_time(tmp_path):
    registry = prometheus_client.CollectorRegistry()
    budget = 4 << 20
    logger = make_logger(
        tmp_path, metrics=registry, retention=pyodlog.Retention(max_local_bytes=budget)
    )
    other = make_logger(tmp_path, result="other", metrics=registry)
    while not logger.sink.over_budget:  # fill the budget: disk_budget drops to count
        log_calls(logger, 1)
        logger.wait_for_save()
    log_calls(logger, 3)
    log_calls(other, 2)
    logger.wait_for_save()
    stats = logger.stats()
    got = samples(prometheus_client.generate_latest(registry).decode())
    mine = labels()
    assert got["pyodlog_calls_seen_total", mine] == stats["calls_seen"]
    assert got["pyodlog_calls_logged_total", mine] == stats["calls_logged"]
    assert got["pyodlog_calls_sampled_out_total", mine] == 0
    assert got["pyodlog_dropped_total", labels(reason="disk_budget")] == stats["dropped"] >= 3
    assert got["pyodlog_dropped_total", labels(reason="queue_full")] == 0
    assert got["pyodlog_bytes_written_total", mine] == stats["bytes_written"]
    assert got["pyodlog_local_budget_bytes", mine] == budget
    assert got["pyodlog_over_budget", mine] == 1.0
    assert got["pyodlog_segments", labels(state="closed")] == stats["segments_closed"]
    assert got["pyodlog_calls_seen_total", labels(result="other")] == 2  # one family, two loggers
    # Read at scrape time: a later call shows in the next scrape without anything else done.
    log_calls(other, 1)
    got = samples(prometheus_client.generate_latest(registry).decode())
    assert got["pyodlog_calls_seen_total", labels(result="other")] == 3
    other.close()  # a closed logger leaves the scrape
    got = samples(prometheus_client.generate_latest(registry).decode())
    logger.close()
    assert ("pyodlog_calls_seen_total", labels(result="other")) not in got
    assert ("pyodlog_calls_seen_total", mine) in got


def test_metrics_go_to_the_default_registry_unless_told_otherwise(tmp_path):
    with (
        make_logger(tmp_path, result="auto", metrics=None) as auto,
        make_logger(tmp_path / "b", result="off", metrics=False) as off,
    ):
        log_calls(auto, 2)
        log_calls(off, 1)
        got = samples(prometheus_client.generate_latest().decode())
    assert got["pyodlog_calls_seen_total", labels(result="auto")] == 2
    assert ("pyodlog_calls_seen_total", labels(result="off")) not in got
    with pytest.raises(ValueError, match="metrics must be"):
        make_logger(tmp_path, metrics="yes")


def test_a_fastapi_serving_apps_metrics_endpoint_shows_the_logger(tmp_path):
    """examples/serving (uvicorn, one worker): its /metrics is prometheus_client's ASGI app on the
    default registry; the logger's pyodlog_* metrics are there beside the process's own."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = dict(
        os.environ,
        PYODLOG_HOME=str(tmp_path / "home"),
        PYODLOG_SERVING_MODEL="tests.test_concurrency:small_faster_rcnn",
        PYODLOG_SERVING_THREADS="2",
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app:app",
            "--app-dir",
            str(ROOT / "examples" / "serving"),
            "--fd",
            str(sock.fileno()),
            "--no-access-log",
        ],
        env=env,
        pass_fds=[sock.fileno()],
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stderr:
            log.append(line)
            if "Application startup complete" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(180) and process.poll() is None, "".join(log)
        for seed in range(3):
            answer = requests.post(
                f"{url}/predict",
                params={"input_id": f"req-{seed}"},
                data=png(seed),
                headers={"Content-Type": "image/png"},
                timeout=120,
            )
            assert answer.status_code == 200, answer.text
        scrape = requests.get(f"{url}/metrics", timeout=60)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(120)
        finally:
            if process.poll() is None:
                process.kill()
            sock.close()
    assert scrape.status_code == 200
    got = samples(scrape.text)
    app = labels(model="detector", result="serving")
    assert got["pyodlog_calls_seen_total", app] == 3
    assert got["pyodlog_logging_errors_total", app] == 0
    assert ("pyodlog_segments", labels(model="detector", result="serving", state="open")) in got
    assert any(name.startswith("process_") or name.startswith("python_") for name, _ in got)


def test_the_collector_serves_its_own_metrics(tmp_path, collector):
    logger = make_logger(tmp_path / "home", api_endpoint=collector.url, api_key=KEY_A)
    log_saved(logger, 8)
    summary = logger.upload()
    logger.close()
    stored = collector.segments("tenant-a", "tiny", "v1", "run")
    refused = requests.get(
        f"{collector.url}/v1/results", headers={"Authorization": "Bearer wrong-key-0"}, timeout=30
    )
    assert refused.status_code == 403
    scrape = requests.get(f"{collector.url}/metrics", timeout=30)  # no key: nothing secret in it
    assert scrape.status_code == 200
    assert scrape.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    got = samples(scrape.text)
    n = len(stored)
    assert summary.segments == n == 2
    assert got["pyodlog_collector_requests_total", (("code", "201"), ("method", "PUT"))] == n
    assert got["pyodlog_collector_requests_total", (("code", "403"), ("method", "GET"))] == 1
    assert got["pyodlog_collector_segments_stored_total", ()] == n
    assert got["pyodlog_collector_bytes_stored_total", ()] == sum(p.stat().st_size for p in stored)
    assert got["pyodlog_collector_stored_segments", ()] == n
    assert got["pyodlog_collector_stored_bytes", ()] == sum(p.stat().st_size for p in stored)
    assert got["pyodlog_collector_upload_seconds_count", ()] == n
    assert got["pyodlog_collector_upload_seconds_bucket", (("le", "+Inf"),)] == n
    assert got["pyodlog_collector_upload_bytes_total", ()] == summary.bytes
    for secret in ("tenant-a", KEY_A[:8], "tiny"):
        assert secret not in scrape.text
