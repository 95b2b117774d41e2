"""Upload throughput to the reference collector on loopback, against a plain ``requests.put`` of the same bytes.

Both send a 64 MiB segment to the same collector process, into a fresh result
each round, and the collector does the same work for both (write, SHA-256
check, fsync, rename). On tmpfs (/dev/shm) where present, so that the disk's
write-back does not decide the figure. The baseline is one PUT of the whole body, already in memory, with the
checksum computed beforehand (both outside the timing); pyodlog's ``Syncer``
takes the checksum from the segment's sidecar (written by the writer when it
closed the segment; here by the same function, outside the timing), asks what
the collector has, sends 8 MiB pieces (each resumable) read from the mapped
file, and writes its acknowledgement marker. ``test_upload_paired`` alternates
the two, round by round, and reports the median of the per-round ratios (the
figure for RESULTS.md: the machine's load drifts between the separate groups).
Also: how long the collector takes from process start to its first answer,
against starting a bare Python interpreter (stopping it is not timed).

    PYTHONPATH=. python -m pytest benchmarks/bench_upload.py -s -p no:cacheprovider \
        -o python_files='bench_*.py'
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

from pyodlog.io.segment import write_checksum
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
    write_checksum(path)  # what the writer does when it closes a segment
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


def test_upload_paired(collector, segment):
    """requests.put and the Syncer alternately, round by round: the ratio of their times per round."""
    data = segment.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    session = requests.Session()
    config = SyncConfig(chunk_bytes=int(os.environ.get("PYODLOG_BENCH_CHUNK", 8 << 20)))
    client = CollectorClient(collector.url, Secret(KEY_A), config)
    rounds = int(os.environ.get("PYODLOG_BENCH_ROUNDS", 9))

    def plain_put() -> float:
        url = collector.url + segment_path("bench", "v1", uuid.uuid4().hex, 0, segment.name)
        start = time.perf_counter()
        answer = session.put(
            url,
            data=data,
            params={"sha256": digest, "offset": 0, "total": len(data)},
            headers={"Authorization": f"Bearer {KEY_A}"},
            timeout=120,
        )
        seconds = time.perf_counter() - start
        assert answer.status_code == 201
        return seconds

    def syncer_upload() -> float:
        shutil.rmtree(segment.parent / ".sync", ignore_errors=True)
        syncer = Syncer(
            client, lambda: [segment], segment.parent, "bench", "v1", uuid.uuid4().hex, 0, None,
            config, auto=False,
        )  # fmt: skip
        start = time.perf_counter()
        assert syncer.sync_once().segments == 1
        return time.perf_counter() - start

    plain_put(), syncer_upload()  # warm-up
    pairs = [(plain_put(), syncer_upload()) for _ in range(rounds)]
    ratios = [p / s for p, s in pairs]
    plain = statistics.median(p for p, _ in pairs)
    ours = statistics.median(s for _, s in pairs)
    print(
        f"\nupload {SIZE >> 20} MiB, pieces of {config.chunk_bytes >> 20} MiB, {rounds} paired rounds: "
        f"requests.put {plain * 1e3:.1f} ms ({SIZE / plain / 1e6:.0f} MB/s), Syncer {ours * 1e3:.1f} ms "
        f"({SIZE / ours / 1e6:.0f} MB/s); Syncer throughput / requests.put: median "
        f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
    )


def _serve(root: Path, keys: Path) -> tuple[float, CollectorProcess]:
    """Seconds from spawning ``python -m pyodlog_collector serve`` to its first answer (health)."""
    start = time.perf_counter()
    server = CollectorProcess(root, keys, ["--quiet"]).start()  # reads its "listening on" line
    answer = requests.get(server.url + "/v1/health", timeout=5)
    seconds = time.perf_counter() - start
    assert answer.status_code == 200
    return seconds, server


def test_collector_start_paired(tmp_path):
    """The collector's start against a bare interpreter's, alternately (stopping is not timed)."""
    keys = write_keys(tmp_path / "keys")
    bare, serve, stop = [], [], []
    for i in range(int(os.environ.get("PYODLOG_BENCH_ROUNDS", 9)) + 1):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.perf_counter() - start)
        seconds, server = _serve(tmp_path / f"root-{i}", keys)
        serve.append(seconds)
        start = time.perf_counter()
        server.stop()
        stop.append(time.perf_counter() - start)
    bare, serve, stop = bare[1:], serve[1:], stop[1:]  # the first round warms the caches
    print(
        f"\ncollector start to first answer: median {statistics.median(serve) * 1e3:.1f} ms "
        f"(min {min(serve) * 1e3:.1f}); bare interpreter (python -c pass) "
        f"{statistics.median(bare) * 1e3:.1f} ms; SIGTERM to exit {statistics.median(stop) * 1e3:.1f} ms"
    )


@pytest.mark.parametrize("impl", ["python -c pass", "pyodlog serve"])
def test_collector_start(benchmark, tmp_path, impl):
    keys = write_keys(tmp_path / "keys")
    servers: list[CollectorProcess] = []

    def bare_python():
        subprocess.run([sys.executable, "-c", "pass"], check=True)

    def serve_until_it_answers():
        servers.append(_serve(tmp_path / f"root-{uuid.uuid4().hex[:6]}", keys)[1])

    def stop_the_last():  # outside the timing: process start to first answer only
        while servers:
            servers.pop().stop()
        return (), {}

    benchmark.group = "collector start: process start to first answer"
    benchmark.extra_info["role"] = "baseline" if impl == "python -c pass" else impl
    if impl == "python -c pass":
        benchmark.pedantic(bare_python, rounds=5, warmup_rounds=1)
    else:
        benchmark.pedantic(serve_until_it_answers, setup=stop_the_last, rounds=5, warmup_rounds=1)
    stop_the_last()
