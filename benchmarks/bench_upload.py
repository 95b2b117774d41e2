"""Upload throughput to the reference collector on loopback, against a plain ``requests.put`` of the same bytes.

Both send a 64 MiB segment to the same collector process, into a fresh result
each round, and the collector does the same work for both (write, SHA-256
check, fsync, rename). On tmpfs (/dev/shm) where present, so that the disk's
write-back does not decide the figure. The baseline is one PUT of the whole body, already in memory, with the
checksum computed beforehand (both outside the timing); pyodlog's ``Syncer``
takes the checksum from the segment's sidecar (written by the writer when it
closed the segment; here by the same function, outside the timing), asks what
the collector has, sends pieces of ``SyncConfig.chunk_bytes`` (64 MiB; each
resumable) from the mapped file, the next one on its way while the collector
takes in the current one, and writes its acknowledgement marker. ``test_upload_paired`` alternates
the two, round by round, and reports the median of the per-round ratios (the
figure for RESULTS.md: the machine's load drifts between the separate groups).
Also: how long the collector takes from process start to its first answer,
against starting a bare Python interpreter (stopping it is not timed).

    PYTHONPATH=. python -m pytest benchmarks/bench_upload.py -s -p no:cacheprovider \
        -o python_files='bench_*.py'

Besides wall time, ``test_upload_paired`` prints the CPU time one upload costs, in this
process and in the collector's (``clock_getcpuclockid``): on a loaded machine, where other
processes take the cores in turn, it is the steadier figure of the two.
"""

from __future__ import annotations

import ctypes
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


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) another process of this user has used so far."""
    libc = ctypes.CDLL(None, use_errno=True)
    clock = ctypes.c_int()
    if libc.clock_getcpuclockid(pid, ctypes.byref(clock)):
        raise OSError(f"clock_getcpuclockid({pid}) failed")

    class Timespec(ctypes.Structure):
        _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]

    spec = Timespec()
    if libc.clock_gettime(clock.value, ctypes.byref(spec)):
        raise OSError(ctypes.get_errno(), "clock_gettime")
    return spec.sec + spec.nsec * 1e-9


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
    chunk = os.environ.get("PYODLOG_BENCH_CHUNK")  # default: SyncConfig's
    config = SyncConfig(chunk_bytes=int(chunk)) if chunk else SyncConfig()
    client = CollectorClient(collector.url, Secret(KEY_A), config)
    rounds = int(os.environ.get("PYODLOG_BENCH_ROUNDS", 9))

    cpu: dict[str, list[tuple[float, float]]] = {"plain": [], "ours": [], "read": []}

    def timed(kind: str, run) -> float:
        """Wall seconds of ``run()``; its CPU time here and in the collector goes to ``cpu[kind]``."""
        here, there = time.process_time(), process_cpu_seconds(collector.proc.pid)
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        cpu[kind].append(
            (time.process_time() - here, process_cpu_seconds(collector.proc.pid) - there)
        )
        return seconds

    def plain_put() -> None:
        url = collector.url + segment_path("bench", "v1", uuid.uuid4().hex, 0, segment.name)
        answer = session.put(
            url,
            data=data,
            params={"sha256": digest, "offset": 0, "total": len(data)},
            headers={"Authorization": f"Bearer {KEY_A}"},
            timeout=120,
        )
        assert answer.status_code == 201

    def read_and_put() -> None:
        """The baseline with the file read from the page cache in the timing, as the Syncer must."""
        url = collector.url + segment_path("bench", "v1", uuid.uuid4().hex, 0, segment.name)
        body = segment.read_bytes()
        answer = session.put(
            url,
            data=body,
            params={"sha256": digest, "offset": 0, "total": len(body)},
            headers={"Authorization": f"Bearer {KEY_A}"},
            timeout=120,
        )
        assert answer.status_code == 201

    syncers: list[Syncer] = []

    def new_syncer() -> None:  # outside the timing, like the baseline's digest
        shutil.rmtree(segment.parent / ".sync", ignore_errors=True)
        syncers.append(Syncer(
            client, lambda: [segment], segment.parent, "bench", "v1", uuid.uuid4().hex, 0, None,
            config, auto=False,
        ))  # fmt: skip

    def syncer_upload() -> None:
        assert syncers.pop().sync_once().segments == 1

    new_syncer()
    plain_put(), syncer_upload()  # warm-up
    pairs, with_read = [], []
    for _ in range(rounds):
        new_syncer()
        pairs.append((timed("plain", plain_put), timed("ours", syncer_upload)))
        with_read.append(timed("read", read_and_put) / pairs[-1][1])
    ratios = [p / s for p, s in pairs]
    plain = statistics.median(p for p, _ in pairs)
    ours = statistics.median(s for _, s in pairs)
    print(
        f"\nupload {SIZE >> 20} MiB, pieces of {config.chunk_bytes >> 20} MiB, {rounds} paired rounds, "
        f"load average {os.getloadavg()[0]:.1f}: requests.put {plain * 1e3:.1f} ms "
        f"({SIZE / plain / 1e6:.0f} MB/s), Syncer {ours * 1e3:.1f} ms ({SIZE / ours / 1e6:.0f} MB/s); "
        f"Syncer throughput / requests.put: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
    )
    # CPU time per upload, client + collector: what the two shared cores spend on one upload (steadier
    # than wall time on a loaded machine, where other processes take the cores in turn).
    medians = {
        kind: (statistics.median(c for c, _ in v) * 1e3, statistics.median(s for _, s in v) * 1e3)
        for kind, v in cpu.items()
    }
    (pc, ps), (oc, os_), (rc, rs) = medians["plain"], medians["ours"], medians["read"]
    print(
        f"CPU per upload (medians): requests.put {pc:.1f} ms here + {ps:.1f} ms collector = "
        f"{pc + ps:.1f} ms; Syncer {oc:.1f} ms + {os_:.1f} ms = {oc + os_:.1f} ms; "
        f"CPU ratio requests.put / Syncer {(pc + ps) / (oc + os_):.3f}"
    )
    # Taking the bytes out of the page cache costs the Syncer CPU that the in-memory baseline never
    # spends (about 7-10 ms per 64 MiB here, mapped or read): the baseline that reads the file too.
    print(
        f"requests.put of the file read in the timing: CPU {rc:.1f} ms + {rs:.1f} ms = "
        f"{rc + rs:.1f} ms; Syncer throughput / it: median {statistics.median(with_read):.3f}, "
        f"CPU ratio {(rc + rs) / (oc + os_):.3f}"
    )


def _serve(
    root: Path, keys: Path, cpu: list[float] | None = None
) -> tuple[float, CollectorProcess]:
    """Seconds from spawning ``python -m pyodlog_collector serve`` to its first answer (health);
    ``cpu`` receives the CPU seconds the collector process used until then."""
    start = time.perf_counter()
    server = CollectorProcess(root, keys, ["--quiet"]).start()  # reads its "listening on" line
    answer = requests.get(server.url + "/v1/health", timeout=5)
    seconds = time.perf_counter() - start
    if cpu is not None:
        cpu.append(process_cpu_seconds(server.proc.pid))
    assert answer.status_code == 200
    return seconds, server


def test_collector_start_paired(tmp_path, monkeypatch):
    """The collector's start against a bare interpreter's, alternately (stopping is not timed).

    As installed: its modules' bytecode cached (``pip install`` compiles it; a source
    checkout writes ``__pycache__`` on its first start). An environment with
    ``PYTHONDONTWRITEBYTECODE=1`` compiles every module at every start instead: keep it
    with ``PYODLOG_BENCH_BYTECODE=0``.
    """
    if os.environ.get("PYODLOG_BENCH_BYTECODE", "1") != "0":
        monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    import resource

    keys = write_keys(tmp_path / "keys")
    bare, serve, stop, bare_cpu, serve_cpu = [], [], [], [], []
    for i in range(int(os.environ.get("PYODLOG_BENCH_ROUNDS", 9)) + 1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        bare_cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        seconds, server = _serve(tmp_path / f"root-{i}", keys, serve_cpu)
        serve.append(seconds)
        start = time.perf_counter()
        server.stop()
        stop.append(time.perf_counter() - start)
    # The first round warms the caches (and writes the bytecode).
    bare, serve, stop, bare_cpu, serve_cpu = (
        x[1:] for x in (bare, serve, stop, bare_cpu, serve_cpu)
    )
    cached = "cached" if "PYTHONDONTWRITEBYTECODE" not in os.environ else "compiled at each start"
    print(
        f"\nload average {os.getloadavg()[0]:.1f}, bytecode {cached}: "
        f"collector start to first answer: median {statistics.median(serve) * 1e3:.1f} ms "
        f"(min {min(serve) * 1e3:.1f}); bare interpreter (python -c pass) "
        f"{statistics.median(bare) * 1e3:.1f} ms; SIGTERM to exit {statistics.median(stop) * 1e3:.1f} ms"
    )
    # CPU time, which the machine's load does not stretch: the collector's until its first answer.
    print(
        f"CPU to first answer: collector median {statistics.median(serve_cpu) * 1e3:.1f} ms "
        f"(min {min(serve_cpu) * 1e3:.1f}); bare interpreter {statistics.median(bare_cpu) * 1e3:.1f} ms"
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
