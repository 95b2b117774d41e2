"""batched_nms: pyodlog against torchvision.ops.batched_nms on the CPU (and CUDA when present).

Each group holds one baseline (torchvision) and pyodlog, measured in the same run;
benchmarks/report.py turns them into the ratios of RESULTS.md.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from pyodlog.ops import batched_nms
from tests.helpers.nms_cases import clustered_boxes, uniform_boxes

CLASSES = 80
CASES = [(make, n) for make in (uniform_boxes, clustered_boxes) for n in (100, 1000, 5000, 20000)]


def _run(benchmark, fn, group, role):
    benchmark.group = group
    benchmark.extra_info["role"] = role
    benchmark(fn)


@pytest.mark.parametrize("impl", ["torchvision", "pyodlog"])
@pytest.mark.parametrize(
    "make, n", CASES, ids=[f"{m.__name__.split('_')[0]}-{n}" for m, n in CASES]
)
def test_batched_nms_cpu(benchmark, make, n, impl):
    boxes, scores, idxs = make(n, CLASSES, seed=0)
    nms = torchvision.ops.batched_nms if impl == "torchvision" else batched_nms
    want = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
    assert set(nms(boxes, scores, idxs, 0.5).tolist()) == set(want.tolist())
    _run(
        benchmark,
        lambda: nms(boxes, scores, idxs, 0.5),
        f"batched_nms cpu {make.__name__.split('_')[0]} {n} boxes / {CLASSES} classes",
        "baseline" if impl == "torchvision" else "pyodlog",
    )


def _batch(make, images=8, n=5000):
    parts = [make(n, CLASSES, seed=i) for i in range(images)]
    boxes = torch.cat([p[0] for p in parts])
    scores = torch.cat([p[1] for p in parts])
    idxs = torch.cat([p[2] + i * CLASSES for i, p in enumerate(parts)])
    return parts, boxes, scores, idxs


@pytest.mark.parametrize("impl", ["torchvision", "pyodlog"])
@pytest.mark.parametrize("make", [uniform_boxes, clustered_boxes], ids=["uniform", "clustered"])
def test_batched_nms_cpu_batch_of_8(benchmark, make, impl):
    parts, boxes, scores, idxs = _batch(make)
    if impl == "torchvision":
        # What a user does for a batch: a loop over images.
        fn = lambda: [torchvision.ops.batched_nms(b, s, i, 0.5) for b, s, i in parts]
    else:
        # One call: categories are (image, class).
        fn = lambda: batched_nms(boxes, scores, idxs, 0.5)
    _run(
        benchmark,
        fn,
        f"batched_nms cpu 8 x 5000 boxes {make.__name__.split('_')[0]}",
        "baseline" if impl == "torchvision" else "pyodlog",
    )


CUDA = torch.cuda.is_available()


def _cuda_timed(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


def _per_class_loop(boxes, scores, idxs, thr):
    """torchvision's per-class path (_batched_nms_vanilla), forced on CUDA."""
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for class_id in torch.unique(idxs):
        curr = torch.where(idxs == class_id)[0]
        keep_mask[curr[torchvision.ops.nms(boxes[curr], scores[curr], thr)]] = True
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True)[1]]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU present")
@pytest.mark.parametrize("impl", ["torchvision offset", "torchvision per-class", "pyodlog"])
@pytest.mark.parametrize("n", [1000, 5000, 20000])
def test_batched_nms_cuda_batch_of_8(benchmark, n, impl):
    _, boxes, scores, idxs = _batch(clustered_boxes, n=n)
    boxes, scores, idxs = boxes.cuda(), scores.cuda(), idxs.cuda()
    fn = {
        "torchvision offset": lambda: torchvision.ops.boxes._batched_nms_coordinate_trick(
            boxes, scores, idxs, 0.5
        ),
        "torchvision per-class": lambda: _per_class_loop(boxes, scores, idxs, 0.5),
        "pyodlog": lambda: batched_nms(boxes, scores, idxs, 0.5),
    }[impl]
    _run(
        benchmark,
        _cuda_timed(fn),
        f"batched_nms cuda 8 x {n} boxes clustered",
        "baseline" if impl == "torchvision offset" else impl,
    )
