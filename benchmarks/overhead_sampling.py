"""Bare vs logged vs sampled-out calls, paired (issue 22: a sampled-out call costs a few percent of
a logged one).

One call of each variant per rotation (order alternating), as benchmarks/overhead_paired.py:
bare ``model(images)``; a logged call (every call written, default settings: near-misses,
uncertainty, embeddings); a sampled-out call (``Sampling(1e-9, keep_near_misses=False)``: its
draw fails before the model runs, so it records only what the always-on aggregates need). The
writer thread runs beside, as in production. Printed: per variant the median time, and the
overhead over bare of the sampled-out call as a fraction of the logged call's overhead; then,
measured in the same calls, the median time of each logger's own work after the model answered
(``_record_of_call`` and the submit, ``time.perf_counter`` around them): the part of the
overhead the model's run-to-run noise does not hide.

Usage: python -m benchmarks.overhead_sampling MODEL BATCH ROTATIONS [CLOCK]
  CLOCK: wall (default) or thread (the calling thread's CPU time, one intra-op thread; see
  benchmarks/overhead_paired.py).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import pyodlog
from benchmarks.environment import print_header
from benchmarks.overhead_paired import CLOCKS, setup
from pyodlog.demokit.timing import paired_rotation
from pyodlog.io import HDF5Store


def main(name: str, batch: int, rotations: int, clock: str = "wall") -> None:
    model, images, folder = setup(name, batch, clock)
    logged = pyodlog.create_logger(model, "b", "logged", sink=HDF5Store(folder / "a"))
    sampled = pyodlog.create_logger(
        model,
        "b",
        "sampled",
        sink=HDF5Store(folder / "b"),
        sampling=pyodlog.Sampling(1e-9, keep_near_misses=False),
    )
    variants = {"bare": model, "logged": logged, "sampled out": sampled}
    own: dict[str, list[float]] = {"logged": [], "sampled out": []}
    for key in own:
        logger = variants[key]
        for method in ("_record_of_call", "_submit_or_count"):
            setattr(logger, method, _timed(getattr(logger, method), own[key]))
    with torch.inference_mode():
        timed = paired_rotation(
            {key: (lambda call=call: call(images)) for key, call in variants.items()},
            rotations,
            warmup=1,
            clock=CLOCKS[clock],
        )
    logged.wait_for_save()
    sampled.wait_for_save()
    print(
        f"{name}, batch {batch}, {rotations} rotations (order alternating), clock {clock} "
        f"({torch.get_num_threads()} intra-op threads)"
    )
    bare = timed.median("bare")
    for key in variants:
        median = timed.median(key)
        print(
            f"{key:12s} median {median * 1e3:9.2f} ms  overhead {(median - bare) * 1e3:7.2f} ms  "
            f"paired {timed.ratio(key, 'bare')}"
        )
    for key, spent in own.items():
        per_call = [a + b for a, b in zip(spent[0::2], spent[1::2])]
        print(
            f"{key:12s} the logger's own work after the model answered: median "
            f"{statistics.median(per_call) * 1e3:.3f} ms per call ({len(per_call)} calls)"
        )
    over = {k: [r - 1 for r in timed.ratios(k, "bare")] for k in ("logged", "sampled out")}
    med = {k: sorted(v)[len(v) // 2] for k, v in over.items()}
    print(
        f"sampled-out overhead / logged overhead (medians of the paired ratios - 1): "
        f"{med['sampled out']:+.4f} / {med['logged']:+.4f}"
    )
    print(
        f"written {logged.stats()['written']} calls; sampled out {sampled.stats()['sampled_out']} "
        f"(written {sampled.stats()['written']})"
    )
    logged.close()
    sampled.close()


def _timed(method, spent: list[float]):
    """``method`` adding its wall time to ``spent`` at each call (``clock`` independent)."""

    def run(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    return run


if __name__ == "__main__":
    print_header("benchmarks.overhead_sampling")
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
