"""Peak host memory of full logging (detections + logits + embeddings + one FPN level in uint8) over many calls.

Logs ``fasterrcnn_mobilenet_v3_large_320_fpn`` at batch 1 through the HDF5
store and samples the process's resident memory (psutil) every 50 calls: the
curve must be flat after warm-up (no leak across calls; the writer's queue and
the copier's pinned pool bound what is in flight).

Usage: .venv/bin/python -m benchmarks.memory_soak [CALLS]   (default 1000)
"""

from __future__ import annotations

import sys
import tempfile
import time

import psutil
import torch

import pyodlog
from benchmarks.bench_overhead import FPN_LEVEL, _make
from benchmarks.environment import print_header
from pyodlog.io import HDF5Store


def soak(
    calls: int, every: int = 50, model: torch.nn.Module | None = None
) -> tuple[list[tuple[int, int]], dict]:
    """Logs ``calls`` calls; returns ``(calls so far, RSS bytes)`` every ``every`` calls and the sink's stats.

    ``model``: a Faster R-CNN with an FPN (default ``fasterrcnn_mobilenet_v3_large_320_fpn`` as
    ``bench_overhead`` makes it). Also used by ``benchmarks/scaling_calls.py`` (memory vs calls).
    """
    process = psutil.Process()
    model = _make("fasterrcnn_mobilenet_v3_large_320_fpn") if model is None else model
    images = [torch.rand(3, 480, 640)]
    logger = pyodlog.create_logger(
        model,
        "soak",
        "v1",
        sink=HDF5Store(tempfile.mkdtemp()),
        target_layers={"fpn": {"path": FPN_LEVEL, "compression": "uint8"}},
    )
    samples = []
    with torch.inference_mode():
        for i in range(1, calls + 1):
            logger(images)
            if i % every == 0:
                samples.append((i, process.memory_info().rss))
    logger.wait_for_save()
    stats = logger.sink.stats()
    logger.close()
    return samples, stats


def main(calls: int) -> None:
    start = time.perf_counter()
    samples, stats = soak(calls)
    elapsed = time.perf_counter() - start
    mib = [rss / 2**20 for _, rss in samples]
    print(
        f"{calls} calls in {elapsed:.1f} s; written {stats['written']}, dropped {stats['dropped']}"
    )
    print("RSS MiB every 50 calls:", " ".join(f"{m:.0f}" for m in mib))
    after_warmup = mib[len(mib) // 5 :]
    print(
        f"peak {max(mib):.0f} MiB; after the first fifth: min {min(after_warmup):.0f}, max {max(after_warmup):.0f} "
        f"(spread {max(after_warmup) - min(after_warmup):.0f} MiB)"
    )


if __name__ == "__main__":
    print_header("benchmarks.memory_soak")
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
