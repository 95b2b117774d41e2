"""Upload throughput to the reference collector on loopback, against a plain ``requests.put`` of the same bytes.

Both send a 64 MiB segment to the same collector process, into a fresh result
each round, and the collector does the same work for both (write, SHA-256
check, fsync, rename). On tmpfs (/dev/shm) where present, so that the disk's
write-back does not decide the figure. The baseline is one PUT of the whole body with the
checksum computed beforehand (outside the timing); pyodlog's ``Syncer``
computes the checksum, asks what the collector has, and sends 8 MiB pieces
(each resumable), and writes its acknowledgement marker. Also: how long the
collector takes from process start to its first answer, against starting a
bare Python interpreter.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

from pyodlog.sync import CollectorClient, SyncConfig, Syncer
from pyodlog.sync.secret import Secret
from pyodlog_protocol import segment_path
from tests.helpers.collector_process import (
    KEY_A,
    CollectorProcess,
    write_keys,
    write_segment_of_size,
)

SIZE = 64 << 20


# The collector's root and the segment on tmpfs: the disk's write-back otherwise decides the figure (a
# collector fsync waits for whatever earlier rounds left dirty, so rounds run later are slower).
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


@pytest.fixture(scope="module")
def collector():
    folder = Path(tempfile.mkdtemp(dir=SHM))
    server = CollectorProcess(
        folder / "collector",
        write_keys(folder / "keys"),
        ["--quiet", "--max-request-bytes", "128M"],
    ).start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)  # tmpfs is memory


@pytest.fixture(scope="module")
def segment():
    folder = Path(tempfile.mkdtemp(dir=SHM))
    path = folder / "seg-00000000000000000001-r000-p1-bench0-000001.h5"
    write_segment_of_size(path, SIZE)  # a valid segment: the collector checks what it stores
    yield path
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("impl", ["requests.put", "pyodlog Syncer"])
def test_upload_throughput(benchmark, collector, segment, impl):
    data = segment.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    session = requests.Session()
    client = CollectorClient(collector.url, Secret(KEY_A), SyncConfig())

    def plain_put():
        url = collector.url + segment_path("bench", "v1", uuid.uuid4().hex, 0, segment.name)
        answer = session.put(
            url,
            data=data,
            params={"sha256": digest, "offset": 0, "total": len(data)},
            headers={"Authorization": f"Bearer {KEY_A}"},
            timeout=120,
        )
        assert answer.status_code == 201

    def make_syncer():
        (segment.parent / ".sync").exists() and [
            p.unlink() for p in (segment.parent / ".sync").rglob("*.ack")
        ]
        syncer = Syncer(
            client,
            lambda: [segment],
            segment.parent,
            "bench",
            "v1",
            uuid.uuid4().hex,
            0,
            None,
            client.config,
            auto=False,
        )
        return (syncer,), {}

    def pyodlog_upload(syncer):
        assert syncer.sync_once().segments == 1

    benchmark.group = f"upload to the collector on loopback ({SIZE >> 20} MiB segment)"
    benchmark.extra_info["role"] = "baseline" if impl == "requests.put" else impl
    benchmark.extra_info["bytes"] = SIZE
    if impl == "requests.put":
        benchmark.pedantic(plain_put, rounds=5, warmup_rounds=1)
    else:
        benchmark.pedantic(pyodlog_upload, setup=make_syncer, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["python -c pass", "pyodlog serve"])
def test_collector_start(benchmark, tmp_path, impl):
    keys = write_keys(tmp_path / "keys")

    def bare_python():
        subprocess.run([sys.executable, "-c", "pass"], check=True)

    def serve_until_it_answers():
        server = CollectorProcess(tmp_path / f"root-{uuid.uuid4().hex[:6]}", keys, ["--quiet"])
        server.start()
        deadline = time.monotonic() + 30
        while (
            requests.get(server.url + "/v1/health", timeout=5).status_code != 200
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        server.stop()

    benchmark.group = "collector start: process start to first answer"
    benchmark.extra_info["role"] = "baseline" if impl == "python -c pass" else impl
    benchmark.pedantic(
        bare_python if impl == "python -c pass" else serve_until_it_answers,
        rounds=5,
        warmup_rounds=1,
    )
