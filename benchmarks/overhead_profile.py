"""Where a logged call's own time goes: cProfile of the logger's work after the model answered.

Runs ``CALLS`` logged calls of MODEL (batch BATCH, random weights, the settings of
bench_overhead.py) with cProfile switched on only around the logger's work after the model
answered (``_record_of_call``: the parse, the match, the record; and the submit), on the
calling thread (the writer thread is off the call's path and not profiled), and prints that
work's time per call and the functions with the most own time in it.

Usage: python -m benchmarks.overhead_profile MODEL BATCH CALLS [embeddings]
  e.g. python -m benchmarks.overhead_profile retinanet_resnet50_fpn 1 3
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

import pyodlog
from benchmarks.bench_overhead import FPN_LEVEL, _make
from benchmarks.environment import print_header
from pyodlog.io import HDF5Store

TOP = 15
SORT = "tottime"


def main(name: str, batch: int, calls: int, full: bool) -> None:
    model = _make(name)
    images = [
        torch.rand(3, 480, 640, generator=torch.Generator().manual_seed(batch))
        for _ in range(batch)
    ]
    folder = Path(tempfile.mkdtemp())
    logger = pyodlog.create_logger(
        model,
        "b",
        "profile",
        sink=HDF5Store(folder),
        log_embeddings=full,
        target_layers={"fpn": {"path": FPN_LEVEL, "compression": "uint8"}} if full else None,
    )
    profile = cProfile.Profile()
    spent = [0.0]

    def profiled(method):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            profile.enable()
            try:
                return method(*args, **kwargs)
            finally:
                profile.disable()
                spent[0] += time.perf_counter() - t0

        return run

    with torch.inference_mode():
        logger(images)  # warm-up
        logger.wait_for_save()
        logger._record_of_call = profiled(logger._record_of_call)  # type: ignore[method-assign]
        logger._submit_or_count = profiled(logger._submit_or_count)  # type: ignore[method-assign]
        for _ in range(calls):
            logger(images)
        logger.wait_for_save()
    logger.close()
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats(SORT)
    print(
        f"{name}, batch {batch}, {calls} calls, "
        f"{'embeddings + FPN uint8' if full else 'detections + logits'}: the logger's work after "
        f"the model answered (parse, match, record, submit; under the profiler) "
        f"{spent[0] / calls * 1e3:.2f} ms per call"
    )
    stats.print_stats(TOP)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print("\n".join(lines[start : start + TOP + 1]))


if __name__ == "__main__":
    print_header("benchmarks.overhead_profile")
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), len(sys.argv) > 4)
