"""Near-miss logging: the fused operator with vs without near-misses, and a logged call's overhead.

Paired rotation (each variant once per rotation, back to back, so that drift of a shared machine
cancels in the ratios), medians:

* ``op``: ``postprocess_detections`` (the detections alone) against
  ``postprocess_detections_near_miss`` with K = 32 (default floor: half the score threshold) on
  the same batch-of-8 candidates of a real Faster R-CNN and RetinaNet (benchmarks/bench_postprocess.py).
* ``call``: bare ``model(images)`` against a logged call with ``near_miss=0`` and with the default
  ``near_miss`` (detections + logits, uncertainty on), batch 1, 480x640 images.
* storage: bytes per image of the detections and near-miss rows of the logged call.

Usage: .venv/bin/python -m benchmarks.bench_near_miss [OP_ROTATIONS] [CALL_ROTATIONS] [--cpu-time] [--densities]

``CALL_ROTATIONS`` 0 skips the calls. ``--cpu-time``: one intra-op thread, each run timed by the
calling thread's CPU time (``time.thread_time``): on a shared, loaded machine the wall clock of
a 2-thread run measures mostly the wait for a core (and OpenMP's barriers), this does not.
``--densities``: also the operator's ratio on the Faster R-CNN head made sparser and sparser
(the background logit raised, as in a trained head): :func:`op_ratio_by_density`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import pyodlog
from benchmarks.bench_overhead import _make
from benchmarks.bench_postprocess import _inputs
from benchmarks.environment import print_header
from pyodlog.io import HDF5Store
from pyodlog.monitoring.detection_logger import DEFAULT_NEAR_MISS
from pyodlog.ops import postprocess_detections, postprocess_detections_near_miss

CLOCK = time.perf_counter


def _time(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def paired(variants: dict, rotations: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(rotations):
        for name, fn in variants.items():
            times[name].append(_time(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def _with_vs_without(
    scores, boxes, image_index, net, orig, kwargs, rotations: int
) -> dict[str, float]:
    """The operator on these candidates without near-misses and with K = DEFAULT_NEAR_MISS
    (floor: half the score threshold), paired."""
    floor = kwargs["score_thresh"] / 2
    return paired(
        {
            "without": lambda: postprocess_detections(
                scores, boxes, image_index, net, orig, **kwargs
            ),
            "with": lambda: postprocess_detections_near_miss(
                scores,
                boxes,
                image_index,
                net,
                orig,
                near_miss=DEFAULT_NEAR_MISS,
                near_miss_floor=floor,
                **kwargs,
            ),
        },
        rotations,
    )


def op_ratio(family: str, rotations: int) -> dict[str, float]:
    _, activate_decode, image_index, net, orig, kwargs = _inputs(family)
    scores, boxes = activate_decode()
    return _with_vs_without(scores, boxes, image_index, net, orig, kwargs, rotations)


# Background-logit offsets for the density sweep: 0 is the benchmark's random head (about 1,500
# pairs above the threshold per image); the larger, the fewer pairs pass, as in a trained head.
DENSITY_OFFSETS = (0.0, 7.0, 9.0, 11.0, 13.0)


def op_ratio_by_density(rotations: int) -> list[tuple[float, float, float, dict[str, float]]]:
    """The Faster R-CNN head's operator, with vs without near-misses, as the head grows sparse.

    The class logits are redrawn (seeded) with ``offset`` added to the background class, so
    that fewer (candidate, class) pairs pass the score threshold and the floor; boxes, proposals
    and sizes stay the benchmark's. Returns (offset, pairs above the threshold per image, pairs
    between floor and threshold per image, median times).
    """
    _, activate_decode, image_index, net, orig, kwargs = _inputs("fasterrcnn")
    probabilities, boxes = activate_decode()
    n_images = int(image_index.max()) + 1
    thresh = kwargs["score_thresh"]
    floor = thresh / 2
    out = []
    for offset in DENSITY_OFFSETS:
        logits = torch.randn(probabilities.shape, generator=torch.Generator().manual_seed(1)) * 2
        logits[:, 0] += offset
        scores = torch.softmax(logits, -1)
        foreground = scores[:, 1:]
        above = float((foreground > thresh).sum()) / n_images
        below = float(((foreground > floor) & (foreground <= thresh)).sum()) / n_images
        times = _with_vs_without(scores, boxes, image_index, net, orig, kwargs, rotations)
        out.append((offset, above, below, times))
    return out


def call_ratio(name: str, rotations: int) -> tuple[dict[str, float], dict[str, float]]:
    model = _make(name)
    images = [torch.rand(3, 480, 640, generator=torch.Generator().manual_seed(1))]
    folder = Path(tempfile.mkdtemp())
    loggers = {
        "near_miss=0": pyodlog.create_logger(
            model, "b", "nm0", sink=HDF5Store(folder / "a"), log_embeddings=False, near_miss=0
        ),
        f"near_miss={DEFAULT_NEAR_MISS}": pyodlog.create_logger(
            model, "b", "nm", sink=HDF5Store(folder / "b"), log_embeddings=False
        ),
    }
    with torch.inference_mode():
        times = paired(
            {
                "bare": lambda: model(images),
                **{k: (lambda lg=lg: lg(images)) for k, lg in loggers.items()},
            },
            rotations,
        )
    sizes = {}
    for key, logger in loggers.items():
        data = pyodlog.open_result(logger.export(folder / key))
        logger.close()
        n = len(data)
        det = sum(v.nbytes for v in data.detections.values()) / n
        nm = sum(v.nbytes for v in data.near_misses.values()) / n
        sizes[key] = (det, nm, float(np.mean(data.images["det_count"])))
    return times, sizes


def main(op_rotations: int = 30, call_rotations: int = 10) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for family in ("fasterrcnn", "retinanet"):
        t = op_ratio(family, op_rotations)
        print(
            f"op {family} batch 8: without {t['without'] * 1e3:.2f} ms, with K={DEFAULT_NEAR_MISS} "
            f"{t['with'] * 1e3:.2f} ms, ratio {t['with'] / t['without']:.3f}"
        )
    if "--densities" in sys.argv:
        for offset, above, below, t in op_ratio_by_density(op_rotations):
            print(
                f"op fasterrcnn batch 8, background +{offset:g}: {above:.0f} pairs/image above the "
                f"threshold, {below:.0f} between floor and threshold: without "
                f"{t['without'] * 1e3:.3f} ms, with {t['with'] * 1e3:.3f} ms, ratio "
                f"{t['with'] / t['without']:.3f}, +{(t['with'] - t['without']) / 8 * 1e6:.1f} us/image"
            )
    for name in ("fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn"):
        if call_rotations <= 0:
            break
        times, sizes = call_ratio(name, call_rotations)
        bare = times.pop("bare")
        print(f"call {name} batch 1: bare {bare * 1e3:.1f} ms")
        for key, t in times.items():
            det, nm, n_det = sizes[key]
            print(
                f"  {key}: {t * 1e3:.1f} ms, {t / bare:.3f}x bare; per image {n_det:.0f} detections "
                f"{det:.0f} B, near-misses {nm:.0f} B"
            )


if __name__ == "__main__":
    print_header("benchmarks.bench_near_miss")
    if "--cpu-time" in sys.argv:
        torch.set_num_threads(1)
        CLOCK = time.thread_time
        print("timing: calling thread's CPU time, 1 intra-op thread")
    main(*(int(a) for a in sys.argv[1:] if not a.startswith("--")))
