"""upload() and auto_sync against the real collector process over loopback HTTP."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyodlog.io import HDF5Store, WriterConfig, open_result
from pyodlog.sync import CollectorClient, SyncConfig, SyncError
from tests.helpers.collector_process import (
    KEY_A,
    CollectorProcess,
    FlakyProxy,
    start_tls_collector,
    write_keys,
)
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

FAST = dict(retries=2, backoff=0.01, max_retry_interval=0.2, close_timeout=10)


@pytest.fixture
def collector(tmp_path):
    server = CollectorProcess(tmp_path / "collector", write_keys(tmp_path / "keys.txt")).start()
    yield server
    server.stop()


def make_logger(
    root, endpoint, key=KEY_A, result_name="run", writer=None, sync=None, heavy=False, **kwargs
):
    torch.manual_seed(0)
    store = HDF5Store(root, config=writer or WriterConfig(flush_interval=0.05))
    layers = {"b": {"path": "backbone.0", "compression": "none" if heavy else "uint8"}}
    kwargs.setdefault("auto_sync", False)
    return TinyDetectorLogger(
        TinyDetector().eval(),
        "tiny",
        "v1",
        result_name=result_name,
        target_layers=layers,
        api_endpoint=endpoint,
        api_key=key,
        sink=store,
        sync_config=sync or SyncConfig(**FAST),
        **kwargs,
    )


def log_calls(logger, n, seed=0, size=(96, 128)):
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for i in range(n):
            logger(
                [torch.rand(3, *size, generator=g) for _ in range(3)],
                input_ids=[f"{seed}-{i}-{j}" for j in range(3)],
            )
            logger.wait_for_save()  # one batch per call: segment_max_records then counts calls


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_records(a, b):
    assert len(a) == len(b) and a.images["input_id"] == b.images["input_id"]
    for column in ("boxes", "scores", "labels", "logits"):
        np.testing.assert_array_equal(a.detections[column], b.detections[column])


def test_upload_round_trip_and_idempotence(tmp_path, collector):
    local_root = tmp_path / "local"
    logger = make_logger(
        local_root, collector.url, writer=WriterConfig(flush_interval=0.05, segment_max_records=3)
    )
    log_calls(logger, 7)
    summary = logger.upload()
    local = sorted(logger.sink.segments())
    assert len(local) == 3 and summary.segments == 3 and summary.already_stored == 0
    assert summary.bytes == sum(p.stat().st_size for p in local) and summary.seconds > 0
    remote = collector.segments("tenant-a", "tiny", "v1", "run")
    assert [p.name for p in remote] == [p.name for p in local]
    assert [sha_of(p) for p in remote] == [sha_of(p) for p in local]
    assert_same_records(
        open_result(collector.root / "tenant-a" / "tiny" / "v1" / "run"),
        open_result(logger.sink.directory),
    )
    # Nothing new: nothing is sent, not even a status request per segment.
    puts = collector.log().count("PUT ")
    again = logger.upload()
    assert (again.segments, again.bytes, again.already_stored) == (0, 0, 0)
    assert collector.log().count("PUT ") == puts
    # Lost acknowledgements (another machine, a wiped .sync folder): the collector says it has them.
    for marker in (logger.sink.directory / ".sync").rglob("*.ack"):
        marker.unlink()
    status_requests = collector.log().count("GET /v1/segments/tiny/v1/run/0/")
    recheck = logger.upload()
    assert (recheck.segments, recheck.bytes, recheck.already_stored) == (0, 0, 3)
    # One listing answered for all three: no status request per segment, no PUT.
    assert collector.log().count("GET /v1/segments/tiny/v1/run/0/") == status_requests
    assert len(collector.segments("tenant-a", "tiny", "v1", "run")) == 3
    # More records later: only the new segment goes.
    log_calls(logger, 2, seed=1)
    assert logger.upload().segments == 1
    logger.close()
    assert len(collector.segments("tenant-a", "tiny", "v1", "run")) == 4


def test_upload_selects_the_resolved_epoch(tmp_path, collector):
    root = tmp_path / "local"
    with make_logger(root, collector.url, n_epoch=0) as first:
        log_calls(first, 2)
        first.wait_for_save()
    with make_logger(root, collector.url, n_epoch=1) as second:
        log_calls(second, 2, seed=5)
        assert second.upload().segments == 1
        remote = open_result(collector.root / "tenant-a" / "tiny" / "v1" / "run")
        assert set(remote.images["n_epoch"].tolist()) == {1}
    with make_logger(root, collector.url, n_epoch=None) as everything:
        assert everything.upload().segments == 1  # epoch 0's segment
    assert set(
        open_result(collector.root / "tenant-a" / "tiny" / "v1" / "run").images["n_epoch"].tolist()
    ) == {0, 1}


def test_auto_sync_sends_segments_as_they_close_and_remembers_across_processes(tmp_path, collector):
    root = tmp_path / "local"
    writer = WriterConfig(flush_interval=0.05, segment_max_records=2)
    logger = make_logger(root, collector.url, writer=writer, auto_sync=True)
    log_calls(logger, 6)
    deadline = time.monotonic() + 30
    while (
        len(collector.segments("tenant-a", "tiny", "v1", "run")) < 3 and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert (
        len(collector.segments("tenant-a", "tiny", "v1", "run")) == 3
    )  # sent while the logger kept running
    log_calls(logger, 1, seed=9)
    logger.close()  # closes the last segment and sends it before returning
    local = sorted(p.name for p in root.glob("tiny/v1/run/*.h5"))
    assert [p.name for p in collector.segments("tenant-a", "tiny", "v1", "run")] == local and len(
        local
    ) == 4
    puts = collector.log().count("PUT ")
    with make_logger(root, collector.url, auto_sync=True) as again:
        time.sleep(0.5)
        assert again.syncer.pending() == []
    assert collector.log().count("PUT ") == puts  # nothing acknowledged is sent twice


def test_auto_sync_never_blocks_inference_and_catches_up_when_the_collector_returns(
    tmp_path, collector
):
    root = tmp_path / "local"
    url = collector.url
    collector.stop()
    writer = WriterConfig(flush_interval=0.05, segment_max_records=1)
    logger = make_logger(
        root, url, writer=writer, auto_sync=True, sync=SyncConfig(**dict(FAST, close_timeout=1))
    )
    log_calls(logger, 3)  # the collector is down: calls go on
    logger.wait_for_save()
    started = time.monotonic()
    logger.close()
    assert time.monotonic() - started < 5  # bounded by close_timeout, not by the dead collector
    assert len(list(root.glob("tiny/v1/run/*.h5"))) == 3
    collector.start()
    with make_logger(root, url, auto_sync=True) as later:
        deadline = time.monotonic() + 30
        while later.syncer.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert later.syncer.pending() == []
    assert len(collector.segments("tenant-a", "tiny", "v1", "run")) == 3


def kill_when_a_quarter_is_staged(collector, size):
    """A started thread that kills the collector once more than a quarter of a ``size``-byte
    upload of tiny/v1/run sits in its staging folder, and the list that receives the staged
    size at that moment."""
    staging = collector.root / "tenant-a" / ".staging" / "tiny" / "v1" / "run"
    killed_at: list[int] = []

    def kill_when_a_quarter_arrived():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            staged = list(staging.glob("*.part")) if staging.is_dir() else []
            if staged and staged[0].stat().st_size > size // 4:
                collector.kill()
                killed_at.append(staged[0].stat().st_size)
                return
            time.sleep(0.0005)

    killer = threading.Thread(target=kill_when_a_quarter_arrived)
    killer.start()
    return killer, killed_at


def test_a_collector_killed_mid_upload_is_resumed_without_duplicates(tmp_path, collector):
    root = tmp_path / "local"
    sync = SyncConfig(**dict(FAST, chunk_bytes=16 << 10))
    logger = make_logger(root, collector.url, heavy=True, sync=sync)
    log_calls(logger, 8)  # ~9 MB of uncompressed features in one segment
    logger.wait_for_save()
    logger.sink.rotate()
    (segment,) = logger.sink.segments()
    size = segment.stat().st_size
    killer, killed_at = kill_when_a_quarter_is_staged(collector, size)
    with pytest.raises(SyncError, match=f"cannot reach the collector .*{collector.port}"):
        logger.upload()
    killer.join()
    assert killed_at and killed_at[0] < size
    assert collector.segments("tenant-a", "tiny", "v1", "run") == []  # nothing half-visible
    collector.start()  # same port, same root
    summary = logger.upload()
    assert summary.segments == 1 and summary.bytes <= size - killed_at[0] + sync.chunk_bytes
    (stored,) = collector.segments("tenant-a", "tiny", "v1", "run")
    assert sha_of(stored) == sha_of(segment)
    logger.close()


def test_the_client_retries_5xx_and_honours_retry_after(tmp_path, collector):
    proxy = FlakyProxy(collector.port, failures=2, status=503, retry_after="1")
    try:
        logger = make_logger(
            tmp_path / "local", proxy.url, sync=SyncConfig(**dict(FAST, retries=5))
        )
        log_calls(logger, 2)
        started = time.monotonic()
        summary = logger.upload()
        waited = time.monotonic() - started
        assert summary.segments == 1 and len(proxy.refused) == 2
        # The backoff alone would retry within ~0.03 s; the server asked for 1 s before each retry.
        assert waited >= 2.0
        logger.close()
    finally:
        proxy.close()
    assert len(collector.segments("tenant-a", "tiny", "v1", "run")) == 1


def test_persistent_5xx_is_a_clear_error_and_a_later_upload_succeeds(tmp_path, collector):
    proxy = FlakyProxy(collector.port, failures=50, status=500, retry_after=None)
    try:
        logger = make_logger(tmp_path / "local", proxy.url)
        log_calls(logger, 1)
        with pytest.raises(SyncError, match=r"HTTP 500"):
            logger.upload()
        proxy.failures_left = 0
        assert logger.upload().segments == 1
        logger.close()
    finally:
        proxy.close()


def test_a_wrong_or_missing_key_says_which_endpoint_refused_and_never_shows_the_key(
    tmp_path, collector, caplog, capsys
):
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-key-0123456789-abcdef-SECRET"
    logger = make_logger(tmp_path / "local", collector.url, key=wrong)
    log_calls(logger, 1)
    with pytest.raises(
        SyncError, match=rf"refused GET {collector.url}/v1/segments/tiny/v1/run.*HTTP 403"
    ) as error:
        logger.upload()
    assert (
        wrong not in str(error.value)
        and wrong not in repr(logger)
        and wrong not in repr(logger.syncer.client)
    )
    no_key = CollectorClient(collector.url, None)
    with pytest.raises(SyncError, match="HTTP 401.*no API key was given"):
        no_key.list_segments("tiny", "v1", "run")
    logger.close()
    # A successful upload with the right key: the key appears in no log, output or file either.
    good = make_logger(tmp_path / "local2", collector.url, key=KEY_A, auto_sync=True)
    log_calls(good, 2)
    good.upload()
    good.close()
    printed = capsys.readouterr()
    text = caplog.text + printed.out + printed.err + collector.log()
    for secret in (wrong, KEY_A):
        assert secret not in text
        for path in (
            list((tmp_path / "local").rglob("*"))
            + list((tmp_path / "local2").rglob("*"))
            + list(collector.root.rglob("*"))
        ):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


def test_endpoint_rules_are_checked_before_anything_is_sent(tmp_path):
    model = TinyDetector().eval()
    with pytest.raises(ValueError, match="plain http:// to a host that is not loopback"):
        TinyDetectorLogger(
            model, "tiny", "v1", api_endpoint="http://collector.example:8750", api_key=KEY_A
        )
    with pytest.raises(ValueError, match="must not contain credentials"):
        TinyDetectorLogger(
            model,
            "tiny",
            "v1",
            api_endpoint=f"https://user:{KEY_A}@collector.example",
            api_key=KEY_A,
        )
    with pytest.raises(ValueError, match="needs an API key"):
        TinyDetectorLogger(model, "tiny", "v1", api_endpoint="https://collector.example")
    with pytest.raises(ValueError, match="ca_bundle=.* does not exist"):
        SyncConfig(ca_bundle=str(tmp_path / "missing.pem"))
    # Opting in is possible (no traffic here: auto_sync off, nothing uploaded).
    with TinyDetectorLogger(
        model,
        "tiny",
        "v1",
        api_endpoint="http://collector.example:8750",
        api_key=KEY_A,
        auto_sync=False,
        sync_config=SyncConfig(allow_insecure_http=True),
    ) as logger:
        assert logger.api_endpoint == "http://collector.example:8750"
    with TinyDetectorLogger(model, "tiny", "v1", auto_sync=True) as local_only:
        assert (
            local_only.syncer is None and not local_only.auto_sync
        )  # without an endpoint nothing is sent


def test_concurrent_uploads_from_several_loggers(tmp_path, collector):
    loggers = [
        make_logger(
            tmp_path / f"local{i}",
            collector.url,
            result_name="shared",
            writer=WriterConfig(flush_interval=0.05, segment_max_records=2),
        )
        for i in range(3)
    ]
    for i, logger in enumerate(loggers):
        log_calls(logger, 4, seed=i)
    errors, summaries = [], []

    def upload(logger):
        try:
            summaries.append(logger.upload())
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=upload, args=(logger,)) for logger in loggers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sum(s.segments for s in summaries) == 6
    remote = collector.segments("tenant-a", "tiny", "v1", "shared")
    local = [p for logger in loggers for p in logger.sink.segments()]
    assert sorted(p.name for p in remote) == sorted(p.name for p in local)
    assert len(open_result(collector.root / "tenant-a" / "tiny" / "v1" / "shared")) == 3 * 4 * 3
    for logger in loggers:
        logger.close()


def test_the_collector_exports_what_it_holds_as_a_pyodlog_zip(tmp_path, collector):
    logger = make_logger(
        tmp_path / "local",
        collector.url,
        writer=WriterConfig(flush_interval=0.05, segment_max_records=2),
    )
    log_calls(logger, 5)
    logger.upload()
    local_zip = logger.export(tmp_path / "local.zip")
    logger.close()
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyodlog",
            "export",
            "--root",
            str(collector.root),
            "--tenant",
            "tenant-a",
            "tiny",
            "v1",
            "run",
            "-o",
            str(tmp_path / "remote.zip"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert_same_records(open_result(tmp_path / "remote.zip"), open_result(local_zip))


def test_upload_shows_a_progress_bar_when_asked(tmp_path, collector, capsys):
    logger = make_logger(
        tmp_path / "local", collector.url, sync=SyncConfig(**dict(FAST, progress=True))
    )
    log_calls(logger, 2)
    logger.upload()
    logger.close()
    assert "pyodlog upload run" in capsys.readouterr().err


def test_https_is_verified_and_a_private_ca_can_be_given(tmp_path):
    server, ca = start_tls_collector(tmp_path)
    try:
        assert server.url.startswith("https://")
        endpoint = f"https://localhost:{server.port}"
        untrusting = make_logger(tmp_path / "local", endpoint)
        log_calls(untrusting, 1)
        with pytest.raises(SyncError, match="TLS verification of the collector failed.*ca_bundle"):
            untrusting.upload()
        untrusting.close()
        trusting = make_logger(
            tmp_path / "local", endpoint, sync=SyncConfig(**dict(FAST, ca_bundle=str(ca)))
        )
        assert trusting.upload().segments == 1
        trusting.close()
        assert len(server.segments("tenant-a", "tiny", "v1", "run")) == 1
        assert KEY_A not in server.log()
    finally:
        server.stop()
