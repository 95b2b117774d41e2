"""The overhead benchmark's variants measured paired: one call of each in rotation, N rotations.

pytest-benchmark (bench_overhead.py) times each variant in its own test, one
after the other, so slow drift of the machine lands between variants; here
every rotation runs all four back to back (in alternating order), so drift cancels in
the ratios: the per-rotation (paired) ratio to bare is printed as its median and IQR.
The timing itself is pyodlog.demokit.timing.paired_rotation, which `make demo` uses too.
The loggers' hooks all sit on the one model; each logger's hooks act only
inside its own calls (the naive logger's hook only stores a reference).

Usage: .venv/bin/python -m benchmarks.overhead_paired MODEL BATCH ROTATIONS [CLOCK [on-call]]
  e.g. .venv/bin/python -m benchmarks.overhead_paired fasterrcnn_mobilenet_v3_large_320_fpn 1 40

``on-call`` adds the two pyodlog variants with ``defer_parse = False``: every call parsed on the
call path, as before deferall (by default a CPU call is parsed on the store's writer thread).

CLOCK: ``wall`` (default: ``time.perf_counter``, torch's default threads, the writer thread
running beside) or ``thread``: the calling thread's CPU time (``time.thread_time``) with one
intra-op thread, so the model and the logger's call path both run on the calling thread and
are counted whole, while the writer thread and other processes' load are not: on a shared
machine whose load moves the wall time by tens of percent, this is the call path's cost.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

import pyodlog
from benchmarks.bench_overhead import FPN_LEVEL, NaiveLogger, _make
from benchmarks.environment import print_header
from pyodlog.demokit.timing import paired_rotation
from pyodlog.io import HDF5Store

CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def setup(name: str, batch: int, clock: str) -> tuple[torch.nn.Module, list[torch.Tensor], Path]:
    """The model (one intra-op thread for the thread clock), ``batch`` 480x640 images and a fresh
    folder for the loggers' data: what every paired overhead script measures on."""
    if clock == "thread":
        torch.set_num_threads(1)
    model = _make(name)
    images = [
        torch.rand(3, 480, 640, generator=torch.Generator().manual_seed(batch))
        for _ in range(batch)
    ]
    return model, images, Path(tempfile.mkdtemp())


def main(name: str, batch: int, rotations: int, clock: str = "wall", *compare: str) -> None:
    model, images, folder = setup(name, batch, clock)
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
    if "on-call" in compare:
        for key, version in (
            ("pyodlog detections+logits", "v3"),
            ("pyodlog +embeddings+FPN uint8", "v4"),
        ):
            before = variants[key]
            logger = pyodlog.create_logger(
                model,
                "b",
                version,
                sink=HDF5Store(folder / version),
                log_embeddings=before.log_embeddings,
                target_layers={"fpn": {"path": FPN_LEVEL, "compression": "uint8"}}
                if before.log_embeddings
                else None,
            )
            logger.defer_parse = False
            variants[f"{key[8:]}, on call"] = logger
    with torch.inference_mode():
        timed = paired_rotation(
            {key: (lambda call=call: call(images)) for key, call in variants.items()},
            rotations,
            warmup=1,
            clock=CLOCKS[clock],
        )
    bare = timed.median("bare")
    print(
        f"{name}, batch {batch}, {rotations} rotations (order alternating), clock {clock} "
        f"({torch.get_num_threads()} intra-op threads)"
    )
    for key in variants:
        median = timed.median(key)
        print(
            f"{key:30s} median {median * 1e3:9.2f} ms  {median / bare:.3f}x bare  "
            f"overhead {(median - bare) * 1e3:7.2f} ms  {batch / median:6.1f} images/s  "
            f"paired {timed.ratio(key, 'bare')}"
        )
    for call in variants.values():
        if hasattr(call, "close"):
            call.close()


if __name__ == "__main__":
    print_header("benchmarks.overhead_paired")
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
