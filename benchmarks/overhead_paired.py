"""The overhead benchmark's variants measured paired: one call of each in rotation, N rotations.

pytest-benchmark (bench_overhead.py) times each variant in its own test, one
after the other, so slow drift of the machine lands between variants; here
every rotation runs all four back to back, so drift cancels in the ratios.
The loggers' hooks all sit on the one model; each logger's hooks act only
inside its own calls (the naive logger's hook only stores a reference).

Usage: .venv/bin/python -m benchmarks.overhead_paired MODEL BATCH ROTATIONS
  e.g. .venv/bin/python -m benchmarks.overhead_paired fasterrcnn_mobilenet_v3_large_320_fpn 1 40
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import pyodlog
from benchmarks.bench_overhead import FPN_LEVEL, NaiveLogger, _make
from benchmarks.environment import print_header
from pyodlog.io import HDF5Store


def main(name: str, batch: int, rotations: int) -> None:
    model = _make(name)
    images = [
        torch.rand(3, 480, 640, generator=torch.Generator().manual_seed(batch))
        for _ in range(batch)
    ]
    folder = Path(tempfile.mkdtemp())
    variants = {
        "bare": model,
        "pyodlog detections+logits": pyodlog.create_logger(
            model, "b", "v1", sink=HDF5Store(folder / "a"), log_embeddings=False
        ),
        "pyodlog +embeddings+FPN uint8": pyodlog.create_logger(
            model,
            "b",
            "v2",
            sink=HDF5Store(folder / "b"),
            target_layers={"fpn": {"path": FPN_LEVEL, "compression": "uint8"}},
        ),
        "naive h5py logger": NaiveLogger(model, folder / "naive.h5", FPN_LEVEL),
    }
    times = {k: [] for k in variants}
    with torch.inference_mode():
        for call in variants.values():
            call(images)
        for _ in range(rotations):
            for key, call in variants.items():
                start = time.perf_counter()
                call(images)
                times[key].append(time.perf_counter() - start)
    bare = statistics.median(times["bare"])
    print(f"{name}, batch {batch}, {rotations} rotations")
    for key, t in times.items():
        median = statistics.median(t)
        print(
            f"{key:30s} median {median * 1e3:9.2f} ms  {median / bare:.3f}x bare  "
            f"overhead {(median - bare) * 1e3:7.2f} ms  {batch / median:6.1f} images/s"
        )
    for call in variants.values():
        if hasattr(call, "close"):
            call.close()


if __name__ == "__main__":
    print_header("benchmarks.overhead_paired")
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
