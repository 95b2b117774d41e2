"""What a sampled-out call costs with the Ultralytics YOLO wrapper (issue 22), as the ``cpu`` mode
of benchmarks/overhead_sampling.py measures it for torchvision: per call, the CPU a logger adds
over bare ``yolo.predict``, logged vs sampled out (``Sampling(1e-9)``, its draw made before
predict) with ``sampled_out_aggregates="all"`` (parsed) and ``"output"`` (not parsed).

One intra-op thread. Added CPU per call = the logger's own work on the calling thread (its CPU
time, ``time.thread_time``, outside ``yolo.predict`` plus inside the callbacks the logger adds to
predict: what ``predict`` itself spends, letterbox and Ultralytics' NMS included, is the bare
call's and varies by more than the logger's share) median over paired rotations (order
alternating), plus the CPU of the logger's store threads over the run per call. YOLOv8n with
random weights scaled as in tests/test_family_yolo.py (class bias -7: 300 detections per image at
``conf=0.25``, the logger's worst case), 480x640 images at ``imgsz=640``.

Usage: python -m benchmarks.overhead_sampling_yolo BATCH ROTATIONS [CLASS_BIAS]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import pyodlog
from benchmarks.bench_family_yolo import PREDICT, _images
from benchmarks.environment import print_header
from benchmarks.overhead_sampling import _thread_cpu, loggers_thread_cpu
from pyodlog.io import HDF5Store
from tests.test_family_yolo import build_yolo


def main(batch: int, rotations: int, class_bias: float = -7.0) -> None:
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp())
    images = _images(batch)
    ids = [f"img-{i}" for i in range(batch)]

    models = []

    def logger(name: str, sampling: pyodlog.Sampling | None):
        yolo = build_yolo(0, class_bias)
        models.append(yolo)
        return pyodlog.create_logger(
            yolo,
            "bench",
            name,
            sink=HDF5Store(folder / name),
            sampling=sampling,
            metrics=False,
        )

    loggers = {
        "logged": logger("logged", None),
        "sampled out, all": logger("all", pyodlog.Sampling(1e-9)),
        "sampled out, output": logger(
            "output", pyodlog.Sampling(1e-9, sampled_out_aggregates="output")
        ),
    }
    calls = {
        key: (lambda lg=lg: lg(images, input_ids=ids, batch=batch, **PREDICT))
        for key, lg in loggers.items()
    }
    inside: list[float] = []  # thread CPU inside predict, less the logger's callbacks there

    def timed(fn, sign: float):
        def run(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                inside.append(sign * (time.thread_time() - t0))

        return run

    for yolo, lg in zip(models, loggers.values()):
        yolo.predict = timed(yolo.predict, 1.0)
        # The head's detections, computed in predict's postprocess callback: the logger's work.
        lg._collect_batch = timed(lg._collect_batch, -1.0)
    own: dict[str, list[float]] = {key: [] for key in calls}

    def run(key: str) -> None:
        inside.clear()
        t0 = time.thread_time()
        calls[key]()
        own[key].append(time.thread_time() - t0 - sum(inside))

    keys = list(calls)
    for key in keys:  # warm-up
        run(key)
    for lg in loggers.values():
        lg.wait_for_save()
    for values in own.values():
        values.clear()
    before = _thread_cpu()
    for i in range(rotations):
        for key in keys if i % 2 == 0 else keys[::-1]:
            run(key)
    for lg in loggers.values():
        lg.wait_for_save()
    after = _thread_cpu()
    threads, _ = loggers_thread_cpu(before, after, loggers)
    print(
        f"yolov8n 640, batch {batch}, {rotations} rotations, class bias {class_bias}: the "
        "logger's own CPU per call (calling thread, outside predict and in its callbacks)"
    )
    added = {}
    for key, lg in loggers.items():
        path = statistics.median(own[key])
        other = threads[key] / rotations
        added[key] = path + other
        stats = lg.stats()
        print(
            f"{key:20s} call path {path * 1e3:7.3f} ms  store threads {other * 1e3:7.3f} ms  "
            f"added {added[key] * 1e3:7.3f} ms  (sampled out {stats['calls_sampled_out']}, "
            f"written {stats['written']})"
        )
    for key in ("sampled out, all", "sampled out, output"):
        print(f"({key}) / (logged), added CPU per call: {added[key] / added['logged']:.4f}")
    for lg in loggers.values():
        lg.close()


if __name__ == "__main__":
    print_header("benchmarks.overhead_sampling_yolo")
    main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else -7.0)
