"""The HDF5 writer against a raw write() of the same bytes to the same file system, in the same run.

On tmpfs (/dev/shm), which removes disk noise. Each round submits every record
to a fresh store and waits until ``wait_for_save`` acknowledges it (fsynced);
the baseline writes the same tensors' bytes with ``write()`` and fsyncs.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyodlog.io import HDF5Store, WriterConfig
from pyodlog.ops import compress_features
from pyodlog.ops.uncertainty import SOFTMAX, detection_uncertainty
from pyodlog.structures import CallRecord, DetectionBatch

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
B, D, C = 8, 100, 91


def _records(n_calls: int, feature_heavy: bool, with_uncertainty: bool = False):
    """Synthetic calls; ``with_uncertainty``: with the ``entropy``/``margin``/``energy`` columns
    that the fused operator adds to a torchvision softmax head's records (Faster R-CNN), so the
    writer summarises them from those columns instead of the logits."""
    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(n_calls):
        det = DetectionBatch(
            torch.rand(B, D, 4, generator=g),
            torch.rand(B, D, generator=g),
            torch.randint(0, C, (B, D), generator=g),
            torch.randn(B, D, C, generator=g),
            torch.randint(0, 1000, (B, D), generator=g),
            torch.full((B,), D),
            [(480, 640)] * B,
            torch.randn(B, D, 256, generator=g) if feature_heavy else None,
        )
        features = (
            {"fpn": compress_features(torch.randn(B, 256, 40, 40, generator=g), "uint8")}
            if feature_heavy
            else {}
        )
        record = CallRecord(
            [f"{i:06d}-{j}" for j in range(B)],
            "deploying",
            0,
            time.time(),
            [(480, 640)] * B,
            det,
            features,
        )
        if with_uncertainty:
            u = detection_uncertainty(det.logits, SOFTMAX)
            det.entropy, det.margin, det.energy = u.entropy, u.margin, u.energy
        record.model_name, record.version_name, record.result_name = "bench", "v1", "r"
        records.append(record)
    return records


def _blobs(records):
    out = []
    for r in records:
        tensors = list(r.detections.tensors().values())
        for f in r.features.values():
            tensors += [f.payload, f.scale, f.offset]
        out += [np.ascontiguousarray(t.numpy()).tobytes() for t in tensors]
    return out


# name: (calls of 8 images, feature-heavy, with the uncertainty columns of a real softmax head)
CASES = {
    "feature-heavy": (40, True, False),
    "detections-only": (250, False, False),
    "feature-heavy+uncertainty": (40, True, True),
    "detections-only+uncertainty": (250, False, True),
}


@pytest.mark.skipif(SHM is None, reason="needs /dev/shm (tmpfs)")
@pytest.mark.parametrize("impl", ["raw write", "pyodlog HDF5Store"])
@pytest.mark.parametrize("case", list(CASES))
def test_writer_throughput(benchmark, case, impl):
    n_calls, heavy, with_uncertainty = CASES[case]
    records = _records(n_calls, heavy, with_uncertainty)
    blobs = _blobs(records)
    nbytes = sum(len(b) for b in blobs)
    folder = tempfile.mkdtemp(dir=SHM)

    def raw():
        path = os.path.join(folder, "raw.bin")
        with open(path, "wb") as f:
            for blob in blobs:
                f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.unlink(path)

    # backpressure="block": the benchmark measures how fast records are stored, so none may be
    # dropped when the burst outruns the writer (the default drops and counts).
    sink = HDF5Store(
        tempfile.mkdtemp(dir=folder),
        config=WriterConfig(flush_interval=1.0, batch_images=256, backpressure="block"),
    )
    sink.open_result("bench", "v1", "r", {"n_class": C}, False)

    def store():
        for r in records:
            sink.submit(r)
        sink.wait_for_save()

    benchmark.group = f"writer tmpfs {case} ({n_calls * B} images, {nbytes / 2**20:.0f} MiB)"
    benchmark.extra_info["role"] = "baseline" if impl == "raw write" else impl
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["images"] = n_calls * B
    try:
        benchmark.pedantic(raw if impl == "raw write" else store, rounds=5, warmup_rounds=1)
        if impl != "raw write":
            assert sink.stats()["written"] == 6 * n_calls  # every record stored, none dropped
    finally:
        sink.close()
        shutil.rmtree(folder, ignore_errors=True)


# -- standalone: paired rounds, medians, and a profile of the writer thread --------------------


def _paired(
    case: str,
    rounds: int,
    calls: int | None,
    profile: int,
    summary_thread: bool = False,
    compact: bool = False,
) -> dict[str, float]:
    """``rounds`` rounds of (raw write, store[, store with a summary thread]) one after the
    other: medians and ratios (and a profile's top lines)."""
    import cProfile
    import pstats
    import statistics
    import threading

    n_calls, heavy, with_uncertainty = CASES[case]
    n_calls = calls or n_calls
    records = _records(n_calls, heavy, with_uncertainty)
    blobs = _blobs(records)
    nbytes = sum(len(b) for b in blobs)
    folder = tempfile.mkdtemp(dir=SHM)
    profilers: list[cProfile.Profile] = []
    run = threading.Thread.run
    if profile:  # each of pyodlog's threads (the writer and any helper) runs under its own profiler

        def profiled_run(self: threading.Thread) -> None:
            if not self.name.startswith("pyodlog"):
                return run(self)
            profiler = cProfile.Profile()
            profilers.append(profiler)
            profiler.runcall(run, self)

        threading.Thread.run = profiled_run  # type: ignore[method-assign]
    sinks = {}
    for name in ["HDF5Store"] + (["HDF5Store, summary thread"] if summary_thread else []):
        sink = HDF5Store(
            tempfile.mkdtemp(dir=folder),
            config=WriterConfig(
                flush_interval=1.0,
                batch_images=256,
                backpressure="block",
                summary_thread=name != "HDF5Store",
            ),
        )
        schema: dict = {"n_class": C}
        if compact:  # the logger's default storage (float16 logits, 128-d uint8 embeddings)
            from pyodlog.structures import RecordStorage

            schema["storage"] = RecordStorage().to_dict()
        sink.open_result("bench", "v1", "r", schema, False)
        sinks[name] = sink
    times: dict[str, list[float]] = {"raw write": [], **{name: [] for name in sinks}}
    try:
        for i in range(rounds + 1):  # the first round warms up
            path = os.path.join(folder, "raw.bin")
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                for blob in blobs:
                    f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            t1 = time.perf_counter()
            os.unlink(path)
            if i:
                times["raw write"].append(t1 - t0)
            for name, sink in sinks.items():
                t2 = time.perf_counter()
                for r in records:
                    sink.submit(r)
                sink.wait_for_save()
                t3 = time.perf_counter()
                if i:
                    times[name].append(t3 - t2)
        for sink in sinks.values():
            assert sink.stats()["written"] == (rounds + 1) * n_calls  # none dropped
    finally:
        for sink in sinks.values():
            sink.close()
        threading.Thread.run = run  # type: ignore[method-assign]
        shutil.rmtree(folder, ignore_errors=True)
    images = n_calls * B
    medians = {name: statistics.median(t) for name, t in times.items()}
    raw = medians["raw write"]
    print(
        f"{case}{' (compact storage)' if compact else ''}: {n_calls} calls, {images} images, "
        f"{nbytes / 2**20:.1f} MiB (float32); medians of {rounds} "
        "rounds (raw write and the store(s) one after the other in each round):"
    )
    for name, median in medians.items():
        print(
            f"  {name:22s} {median * 1e3:7.1f} ms  {images / median:9,.0f} images/s  "
            f"raw/this {raw / median:.2f}   rounds (ms): {[round(t * 1e3, 1) for t in times[name]]}"
        )
    sys.stdout.flush()
    if profilers:
        print(
            f"  profile of pyodlog's threads, all {rounds + 1} rounds ({len(profilers)} threads):"
        )
        stats = pstats.Stats(profilers[0])
        for extra in profilers[1:]:
            stats.add(extra)
        stats.sort_stats("tottime").print_stats(profile)
    return medians


def _steps(case: str, reps: int = 12, calls: int = 32) -> None:
    """The writer's steps for one batch (``calls`` calls, 256 images by default), each alone on
    this thread, best of ``reps``: the raw write of the batch's bytes, the aggregate summary
    (``summarize_calls``), the rows (``record_to_columns``) and the segment append with its
    flush. What the writer thread does per batch, without the queue, the other thread or
    the barrier (the end-to-end rounds above include those)."""
    from pyodlog.io.aggregates import summarize_calls
    from pyodlog.io.columns import ColumnBatch, record_to_columns
    from pyodlog.io.segment import SegmentWriter

    _, heavy, with_uncertainty = CASES[case]
    records = _records(calls, heavy, with_uncertainty)
    blobs = _blobs(records)
    folder = tempfile.mkdtemp(dir=SHM)
    best = {"raw write": math.inf, "summary": math.inf, "rows": math.inf, "append+flush": math.inf}
    segment = None
    try:
        for _ in range(reps):
            path = os.path.join(folder, "raw.bin")
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                for blob in blobs:
                    f.write(blob)
            t1 = time.perf_counter()
            os.unlink(path)
            summarize_calls(records, C)
            t2 = time.perf_counter()
            batch = ColumnBatch()
            for r in records:
                record_to_columns(r, batch, None, 1.0)
            t3 = time.perf_counter()
            if segment is None:
                segment = SegmentWriter(Path(folder) / "seg.h5", {"n_class": C}, batch)
            t4 = time.perf_counter()
            segment.append(batch)
            t5 = time.perf_counter()
            for name, took in zip(best, (t1 - t0, t2 - t1, t3 - t2, t5 - t4)):
                best[name] = min(best[name], took)
    finally:
        if segment is not None:
            segment.close()
        shutil.rmtree(folder, ignore_errors=True)
    raw = best["raw write"]
    print(
        f"{case}: one batch of {calls * B} images, best of {reps}: "
        + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items())
        + f"; raw/append {raw / best['append+flush']:.2f}, raw/(all three) "
        + f"{raw / (best['summary'] + best['rows'] + best['append+flush']):.2f}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    import argparse

    from benchmarks.environment import print_header

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--calls", type=int, default=None, help="calls per round (default: the case's)"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="print this many top lines of a cProfile of pyodlog's threads (all rounds)",
    )
    parser.add_argument(
        "--summary-thread",
        action="store_true",
        help="also time a store with WriterConfig(summary_thread=True) (summaries on a helper thread)",
    )
    parser.add_argument(
        "--compact",
        action="store_true",
        help="the store writes the logger's default compact records (the raw baseline: float32)",
    )
    parser.add_argument(
        "--steps",
        action="store_true",
        help="instead: each of the writer's steps for one batch alone (best of 12)",
    )
    args = parser.parse_args()
    print_header("pyodlog writer vs raw write() on tmpfs (benchmarks/bench_writer.py)")
    if args.steps:
        for name in CASES if args.case == "all" else [args.case]:
            _steps(name)
        sys.exit(0)
    for name in CASES if args.case == "all" else [args.case]:
        _paired(name, args.rounds, args.calls, args.profile, args.summary_thread, args.compact)
