"""What `log_images` adds to a logged call on the CPU, measured paired.

Two loggers on one model (each one's hooks act only inside its own calls), the same images:
one without and one with `log_images={"max_side": 256, "quality": 85}`, called in rotation
(drift cancels in the ratio). Also times the call's own thumbnail step alone
(`_attach_thumbnails`: a reference to the inputs on the CPU; the JPEG is made by the writer).

Usage: .venv/bin/python -m benchmarks.thumbnail_overhead [ROTATIONS] [BATCH]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import pyodlog
from benchmarks.environment import print_header
from pyodlog.io import HDF5Store


def main(rotations: int, batch: int) -> None:
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None
    ).eval()
    images = [torch.rand(3, 480, 640) for _ in range(batch)]
    folder = Path(tempfile.mkdtemp())
    plain = pyodlog.create_logger(model, "b", "plain", sink=HDF5Store(folder / "a"))
    thumbs = pyodlog.create_logger(
        model,
        "b",
        "thumbs",
        sink=HDF5Store(folder / "b"),
        log_images={"max_side": 256, "quality": 85},
    )
    times: dict[str, list[float]] = {"without": [], "with log_images": []}
    with torch.inference_mode():
        for logger in (plain, thumbs):  # warm-up
            logger(images)
        pair = [("without", plain), ("with log_images", thumbs)]
        for rotation in range(rotations):
            for name, logger in pair if rotation % 2 else pair[::-1]:  # alternating order
                start = time.perf_counter()
                logger(images)
                times[name].append(time.perf_counter() - start)
        record = pyodlog.CallRecord([], "x", None, 0.0, [], None)  # type: ignore[arg-type]
        step = []
        for _ in range(1000):
            start = time.perf_counter()
            thumbs._attach_thumbnails(record, images)
            step.append(time.perf_counter() - start)
    for logger in (plain, thumbs):
        logger.wait_for_save()
    base = statistics.median(times["without"])
    print(f"fasterrcnn_mobilenet_v3_large_320_fpn, batch {batch}, 480x640, {rotations} rotations")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<18} median {median * 1000:7.1f} ms  ratio {median / base:.3f}")
    print(f"  the call's thumbnail step alone: median {statistics.median(step) * 1e6:.1f} us")
    written = pyodlog.open_result(thumbs.sink.directory)  # type: ignore[attr-defined]
    print(
        f"  thumbnails written by the writer thread: {sum(written.thumbnail(i) is not None for i in range(len(written)))} of {len(written)}"
    )
    plain.close()
    thumbs.close()


if __name__ == "__main__":
    print_header("benchmarks.thumbnail_overhead")
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 20, int(sys.argv[2]) if len(sys.argv) > 2 else 2
    )
