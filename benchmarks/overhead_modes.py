"""Logging overhead per execution mode (issue 21): the logged call's median time over the bare call's,
both in the same mode, measured paired (bare and logged calls alternate) in one process.

    python -m benchmarks.overhead_modes [--calls 20] [--modes eager,bf16,compile]

SSDlite (random weights, 2 images of 240x320, CPU), records to an in-memory sink (the call path
only; the writer's cost is bench_writer's). ``compile``: ``torch.compile(model)`` (inductor), the
logger created before the first call; the first calls (compilation) are not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torchvision.models import detection

import pyodlog
from benchmarks.environment import print_header


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(mode: str, calls: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    images = [torch.rand(3, 240, 320), torch.rand(3, 240, 320)]
    context = contextlib.nullcontext
    if mode == "bf16":
        context = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    run = torch.compile(model) if mode == "compile" else model
    logger = pyodlog.create_logger(run, "bench", mode, sink=pyodlog.InMemorySink())
    bare, logged = [], []
    with torch.inference_mode(), context():
        for _ in range(6):  # warm-up (compilation of both paths, then steady state)
            run(images)
            logger(images)
        for _ in range(calls):
            bare.append(timed(run, images))
            logged.append(timed(logger, images))
    assert logger.stats()["logging_errors"] == 0, logger.stats()["last_logging_error"]
    logger.close()
    return statistics.median(bare), statistics.median(logged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--modes", default="eager,bf16,compile")
    args = parser.parse_args()
    print("| mode | bare median | logged median | overhead |")
    print("|---|---|---|---|")
    for mode in args.modes.split(","):
        bare, logged = measure(mode, args.calls)
        print(
            f"| {mode} | {bare * 1e3:.1f} ms | {logged * 1e3:.1f} ms | "
            f"{(logged / bare - 1) * 100:+.0f}% |",
            flush=True,
        )


if __name__ == "__main__":
    print_header("benchmarks.overhead_modes")
    main()
