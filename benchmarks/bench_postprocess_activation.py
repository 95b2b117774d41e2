"""The activation folded into the fused operator (issue 17 item 1): raw logits in, vs sigmoid first.

Paired rotation (each variant once per rotation, back to back), medians, on the CPU:

* ``op``: RetinaNet head of a batch of 8 (bench_postprocess's candidates, 91 classes): the
  logger's old path ``torch.sigmoid(logits)`` + ``postprocess_detections_near_miss`` against the
  operator fed the raw logits (``activation="sigmoid"``), K = 32. Two logit distributions: the
  benchmark's dense one (``randn - 3``: about half of the pairs pass 0.05, every anchor holds one:
  the worst case, nothing to skip) and a sparse one (``randn - 6``: about 1 pair in 1,000 passes,
  closer to a trained head).
* ``call``: RetinaNet ResNet-50 (random weights), batch 1, 480x640: bare ``model(images)``
  against a logged call whose logger activates every anchor in PyTorch (the old path) and one
  that hands the raw logits to the operators (the new path), both with ``near_miss=32``.
* ``parse``: the part of those logged calls that differs, alone: the logger's
  ``_parse_model_output`` on the state one call captured (match the returned detections to
  their anchors, logits, uncertainty, near-misses), old path against new, same call.

Usage: .venv/bin/python -m benchmarks.bench_postprocess_activation [OP_ROTATIONS] [CALL_ROTATIONS]
[--cpu-time]

``--cpu-time``: one intra-op thread, each call timed by the calling thread's CPU time
(``time.thread_time``) instead of the wall clock: on a shared, loaded machine it leaves out the
time the process waits for a core (what it keeps: cache and memory contention).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import pyodlog
from benchmarks.bench_overhead import _make
from benchmarks.bench_postprocess import _inputs
from benchmarks.environment import print_header
from pyodlog.io import HDF5Store
from pyodlog.models.torchvision_dense import RetinaNetLogger
from pyodlog.ops import postprocess_detections_near_miss

CLOCK: Callable[[], float] = time.perf_counter


def paired(variants: dict, rotations: int) -> dict[str, float]:
    """Medians of each variant, run once per rotation back to back (after one warm-up each)."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    for _ in range(rotations):
        for name, fn in variants.items():
            start = CLOCK()
            fn()
            times[name].append(CLOCK() - start)
    return {k: statistics.median(v) for k, v in times.items()}


class _SigmoidInPyTorch(RetinaNetLogger):
    """The old path: every anchor's logits activated in PyTorch before the operators."""

    activation = None


def op_times(shift: float, rotations: int) -> dict[str, float]:
    _, activate_decode, image_index, net, orig, kwargs = _inputs("retinanet")
    scores, boxes = activate_decode()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(scores.shape, generator=g) + shift
    floor = kwargs["score_thresh"] / 2
    nm = dict(near_miss=32, near_miss_floor=floor, **kwargs)
    old = postprocess_detections_near_miss(
        torch.sigmoid(logits), boxes, image_index, net, orig, **nm
    )
    new = postprocess_detections_near_miss(
        logits, boxes, image_index, net, orig, activation="sigmoid", **nm
    )
    for a, b in zip(old.detections, new.detections):
        assert torch.equal(a, b)
    passing = float((torch.sigmoid(logits) > kwargs["score_thresh"]).float().mean())
    print(f"  {logits.numel():,} logits, {passing:.4f} of the pairs above score_thresh")
    with torch.inference_mode():
        return paired(
            {
                "sigmoid + op": lambda: postprocess_detections_near_miss(
                    torch.sigmoid(logits), boxes, image_index, net, orig, **nm
                ),
                "op(activation)": lambda: postprocess_detections_near_miss(
                    logits, boxes, image_index, net, orig, activation="sigmoid", **nm
                ),
            },
            rotations,
        )


def call_times(rotations: int) -> dict[str, float]:
    model = _make("retinanet_resnet50_fpn")
    images = [torch.rand(3, 480, 640, generator=torch.Generator().manual_seed(1))]
    folder = Path(tempfile.mkdtemp())
    loggers = {
        "logged, sigmoid in PyTorch": _SigmoidInPyTorch(
            model, "b", "old", sink=HDF5Store(folder / "a"), log_embeddings=False, near_miss=32
        ),
        "logged, raw logits to the op": pyodlog.create_logger(
            model, "b", "new", sink=HDF5Store(folder / "b"), log_embeddings=False, near_miss=32
        ),
    }
    assert type(loggers["logged, raw logits to the op"]) is RetinaNetLogger
    with torch.inference_mode():
        times = paired(
            {
                "bare": lambda: model(images),
                **{k: (lambda lg=lg: lg(images)) for k, lg in loggers.items()},
            },
            rotations,
        )
        # The logger's own work on a call's captured state, old path against new: inside each
        # logged call its _parse_model_output runs 3 times, timed; the loggers alternate calls.
        parse_times: dict[str, list[float]] = {k: [] for k in loggers}
        results = {}
        for key, logger in loggers.items():
            original = logger._parse_model_output

            def timed(out, img_sizes, original=original, key=key):
                for _ in range(3):
                    start = CLOCK()
                    results[key] = original(out, img_sizes)
                    parse_times[key].append(CLOCK() - start)
                return results[key]

            logger._parse_model_output = timed  # type: ignore[method-assign]
        for _ in range(rotations):
            for logger in loggers.values():
                logger(images)
        old, new = results.values()
        assert torch.equal(old.candidate_index, new.candidate_index)
        assert torch.equal(old.near_misses.candidate_index, new.near_misses.candidate_index)
        times.update({f"parse: {k}": statistics.median(v) for k, v in parse_times.items()})
    for logger in loggers.values():
        logger.close()
    return times


def main(op_rotations: int = 20, call_rotations: int = 5) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for label, shift in (("dense (randn - 3)", -3.0), ("sparse (randn - 6)", -6.0)):
        print(f"op RetinaNet batch 8, {label}:")
        t = op_times(shift, op_rotations)
        old, new = t["sigmoid + op"], t["op(activation)"]
        print(
            f"  sigmoid + op {old * 1e3:.2f} ms, op(activation) {new * 1e3:.2f} ms, "
            f"ratio {new / old:.3f}"
        )
    t = call_times(call_rotations)
    bare = t.pop("bare")
    print(f"call retinanet_resnet50_fpn batch 1: bare {bare * 1e3:.1f} ms")
    for key, v in t.items():
        if not key.startswith("parse"):
            print(f"  {key}: {v * 1e3:.1f} ms, {v / bare:.3f}x bare")
    for key, v in t.items():
        if key.startswith("parse"):
            print(f"  {key}: {v * 1e3:.2f} ms")


if __name__ == "__main__":
    print_header("benchmarks.bench_postprocess_activation")
    if "--cpu-time" in sys.argv:
        torch.set_num_threads(1)
        CLOCK = time.thread_time
        print("timing: calling thread's CPU time, 1 intra-op thread")
    main(*(int(a) for a in sys.argv[1:] if not a.startswith("--")))
