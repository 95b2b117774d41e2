"""Overhead of logging an Ultralytics YOLOv8n: ``yolo.predict`` bare vs through pyodlog.

Both variants run ``predict`` on the same 480x640 images at ``imgsz=640``
(letterboxed to 480x640, ``rect``), batch 1 and 8 (``batch=`` of predict, one
forward per call). The logged variant records detections, pre-sigmoid logits
and the RoIAlign embeddings (``log_embeddings=True``) into an HDF5 store whose
writer thread runs during the timing. Random weights scaled as in
tests/test_family_yolo.py (Ultralytics' initialisation gives no detection, which
would time nothing): with the class bias at -7 every image has the ``max_det``
cap of 300 detections at ``conf=0.25`` (the worst case for the logger); at -10
about 8 (closer to a trained model on a real image).

Two ways to run it:

* pytest-benchmark (one test per variant, like bench_overhead.py)::

      pytest benchmarks/bench_family_yolo.py --benchmark-only

* paired rotation (the reliable ratio on a shared machine: each rotation calls
  bare, logits only and logits+embeddings back to back, three YOLO objects with
  the same weights)::

      python -m benchmarks.bench_family_yolo BATCH ROTATIONS [CLASS_BIAS]
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import pyodlog
from benchmarks.environment import print_header
from pyodlog.io import HDF5Store
from tests.test_family_yolo import build_yolo

PREDICT = dict(imgsz=640, conf=0.25, verbose=False)
ROUNDS = {1: 10, 8: 3}


def _images(batch: int) -> list[np.ndarray]:
    rng = np.random.default_rng(batch)
    return [(rng.random((480, 640, 3)) * 255).astype(np.uint8) for _ in range(batch)]


def _logger(yolo, folder: Path, log_embeddings: bool = True):
    return pyodlog.create_logger(
        yolo, "bench", "v1", sink=HDF5Store(folder), log_embeddings=log_embeddings
    )


@pytest.mark.parametrize("variant", ["bare", "pyodlog logits+embeddings"])
@pytest.mark.parametrize("batch", [1, 8])
def test_yolo_logging_overhead(benchmark, batch, variant):
    yolo = build_yolo(0)
    images = _images(batch)
    folder = Path(tempfile.mkdtemp())
    logger = _logger(yolo, folder) if variant != "bare" else None
    call = logger if logger is not None else yolo.predict

    def run():
        call(images, batch=batch, **PREDICT)

    benchmark.group = f"overhead yolov8n 640 batch {batch}"
    benchmark.extra_info["role"] = "baseline" if variant == "bare" else variant
    benchmark.extra_info["images"] = batch
    try:
        benchmark.pedantic(run, rounds=ROUNDS[batch], warmup_rounds=1)
        if logger is not None:
            logger.wait_for_save()
            assert logger.sink.stats()["written"] == ROUNDS[batch] + 1
    finally:
        if logger is not None:
            logger.close()
        shutil.rmtree(folder, ignore_errors=True)


def _timed(fn, spent: list[float]):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    return timed


def main(batch: int, rotations: int, class_bias: float = -7.0) -> None:
    images = _images(batch)
    folder = Path(tempfile.mkdtemp())
    bare_yolo = build_yolo(0, class_bias)
    loggers = {
        "pyodlog logits only": _logger(build_yolo(0, class_bias), folder / "a", False),
        "pyodlog logits+embeddings": _logger(build_yolo(0, class_bias), folder / "b"),
    }
    variants = {"bare": bare_yolo.predict, **loggers}
    # The logger's own work on the call path (detections + handing the record to
    # the sink), timed inside the calls: less exposed to other jobs' load than
    # the difference of two medians.
    own: dict[str, list[float]] = {k: [] for k in loggers}
    for key, logger in loggers.items():
        for name in ("_detections", "_submit"):
            setattr(logger, name, _timed(getattr(logger, name), own[key]))
    times: dict[str, list[float]] = {k: [] for k in variants}
    n_detections = sum(len(r) for r in bare_yolo.predict(images, batch=batch, **PREDICT))
    for call in variants.values():
        call(images, batch=batch, **PREDICT)  # warm-up: builds each predictor
    for spent in own.values():
        spent.clear()
    for _ in range(rotations):
        for key, call in variants.items():
            start = time.perf_counter()
            call(images, batch=batch, **PREDICT)
            times[key].append(time.perf_counter() - start)
    for logger in loggers.values():
        logger.wait_for_save()
        logger.close()
    shutil.rmtree(folder, ignore_errors=True)
    bare = statistics.median(times["bare"])
    print(
        f"yolov8n 640 (480x640 input), batch {batch}, {rotations} rotations, "
        f"{n_detections / batch:.0f} detections per image"
    )
    for key, t in times.items():
        median = statistics.median(t)
        print(
            f"{key:28s} median {median * 1e3:9.2f} ms  {median / bare:.3f}x bare  "
            f"overhead {(median - bare) * 1e3:7.2f} ms  {batch / median:6.1f} images/s"
        )
    for key, spent in own.items():
        per_call = [sum(spent[i : i + 2]) for i in range(0, len(spent), 2)]
        median = statistics.median(per_call)
        print(
            f"{key:28s} logger's own work on the call path: median {median * 1e3:.2f} ms "
            f"= {median / bare:.3f} of the bare call"
        )


if __name__ == "__main__":
    print_header("benchmarks.bench_family_yolo")
    main(int(sys.argv[1]), int(sys.argv[2]), *(float(v) for v in sys.argv[3:4]))
