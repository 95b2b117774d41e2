"""Throughput of one model shared by 1, 2 and 4 threads: bare vs one shared pyodlog logger.

Each round runs ``CALLS`` calls (batch 1) split evenly over ``threads`` threads
of a persistent pool, all on one model (and, logged, one logger with the HDF5
store: its writer thread runs during the timing, on the same cores). What
matters is the logged/bare ratio at each thread count, measured in the same
run: on the 2-core machine absolute times are noise. Each thread runs the
model with one intra-op thread (``torch.set_num_threads(1)``, what a server
with a thread pool does), so the threads, not PyTorch's intra-op pool, use the
cores. Random weights with a 0.01 score threshold: 100 detections per image.

On a shared machine drift between one test and the next is larger than the
effect; ``python -m benchmarks.bench_threads ROTATIONS`` alternates bare and
logged rounds at each thread count and prints the ratios (the figures in
``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torchvision.models import detection

import pyodlog
from benchmarks.environment import print_header
from pyodlog.io import HDF5Store

CALLS = 16  # per round, over all threads
ROUNDS = 3
SIZE = (240, 320)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.01
    ).eval()


@pytest.mark.parametrize("variant", ["bare", "logged"])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_thread_throughput(benchmark, model, threads, variant):
    g = torch.Generator().manual_seed(0)
    images = [[torch.rand(3, *SIZE, generator=g)] for _ in range(CALLS)]
    folder = Path(tempfile.mkdtemp())
    logger = None
    call = model
    if variant == "logged":
        logger = call = pyodlog.create_logger(model, "bench", "v1", sink=HDF5Store(folder))
    per_thread = [images[t::threads] for t in range(threads)]
    intra_op = torch.get_num_threads()

    def work(batches):
        torch.set_num_threads(1)
        with torch.inference_mode():
            for batch in batches:
                call(batch)

    pool = ThreadPoolExecutor(threads)

    def run():
        for future in [pool.submit(work, batches) for batches in per_thread]:
            future.result()

    benchmark.group = f"threads {threads}"
    benchmark.extra_info["role"] = "baseline" if variant == "bare" else variant
    benchmark.extra_info["images"] = CALLS
    try:
        torch.set_num_threads(1)
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
        if logger is not None:
            logger.wait_for_save()
            assert logger.sink.stats()["written"] == CALLS * (ROUNDS + 1)
    finally:
        torch.set_num_threads(intra_op)
        pool.shutdown()
        if logger is not None:
            logger.close()
        shutil.rmtree(folder, ignore_errors=True)


class _Runner:
    """``threads`` persistent threads running ``call`` over ``images``, one round at a time."""

    def __init__(self, call, images, threads: int) -> None:
        self.call, self.threads = call, threads
        self.per_thread = [images[t::threads] for t in range(threads)]
        self.pool = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))

    def _work(self, batches) -> None:
        with torch.inference_mode():
            for batch in batches:
                self.call(batch)

    def round(self) -> float:
        start = time.perf_counter()
        for future in [self.pool.submit(self._work, b) for b in self.per_thread]:
            future.result()
        return time.perf_counter() - start


def paired(rotations: int) -> None:
    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.01
    ).eval()
    g = torch.Generator().manual_seed(0)
    images = [[torch.rand(3, *SIZE, generator=g)] for _ in range(CALLS)]
    folder = Path(tempfile.mkdtemp())
    logger = pyodlog.create_logger(model, "bench", "v1", sink=HDF5Store(folder))
    try:
        print(f"{CALLS} calls a round, batch 1, {SIZE[0]}x{SIZE[1]}, {rotations} rotations")
        for threads in (1, 2, 4):
            bare, logged = _Runner(model, images, threads), _Runner(logger, images, threads)
            bare.round(), logged.round()  # warm-up
            ratios, bare_rates = [], []
            for _ in range(rotations):
                t_bare, t_logged = bare.round(), logged.round()
                ratios.append(t_bare / t_logged)
                bare_rates.append(CALLS / t_bare)
            print(
                f"{threads} thread(s): bare {statistics.median(bare_rates):.1f} calls/s; "
                f"logged/bare throughput median {statistics.median(ratios):.3f} "
                f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
            )
            bare.pool.shutdown(), logged.pool.shutdown()
        logger.wait_for_save()
        stats = logger.sink.stats()
        print(f"logged calls written: {stats['written']}, dropped: {stats['dropped']}")
    finally:
        logger.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    print_header("benchmarks.bench_threads")
    paired(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
