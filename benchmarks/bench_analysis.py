"""compare() and the report on a million logged detections: time, throughput and peak memory.

Writes two synthetic results through the real HDF5 store (tests/helpers/synthetic_results.py:
100 detections per image, 10 classes, 32-wide embeddings), reads them back, then times

- ``compare`` with the histogram signals only (``class_embedding_sample=0``): the drift
  statistics' throughput, target >= 1 million detections/s;
- ``compare`` with every signal (embedding reservoirs and MMD permutation tests included);
- ``report_numbers`` of one slice against the other (the ``pyodlog report --json`` work).

Every call reads 65,536 detections at a time (``chunk_detections``).

Memory: the analysis's own peak allocation (tracemalloc: numpy's buffers included; the result's
columns, read before, are not counted) on a tenth of the images and on all of them. A bounded
analysis has about the same peak on both. Run it (once, small machines: it writes ~400 MB to
/dev/shm or the temporary folder):

    PYTHONPATH=$PWD python -m benchmarks.bench_analysis --detections 1000000
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
import tracemalloc

import numpy as np

import pyodlog
from benchmarks.environment import print_header
from pyodlog.analysis import compare
from pyodlog.analysis.report import report_numbers
from tests.helpers.synthetic_results import write_synthetic_result

PER_IMAGE = 100


class Head:
    """The first ``n`` images of a result, as a ResultData-like view (no copy of the columns)."""

    def __init__(self, data, n: int) -> None:
        self.images = {k: v[:n] for k, v in data.images.items()}
        self.detections = data.detections
        self.manifest = data.manifest
        self.source = data.source


def _measure(label: str, fn) -> tuple[float, float]:
    tracemalloc.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"{label:<58} {seconds:8.2f} s   peak {peak / 2**20:7.1f} MiB")
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detections", type=int, default=1_000_000, help="per slice")
    args = parser.parse_args()
    n_images = max(args.detections // PER_IMAGE, 10)
    folder = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        start = time.perf_counter()
        common = dict(detections_per_image=PER_IMAGE, n_class=10, embed_dim=32)
        ref_dir = write_synthetic_result(folder, "reference", n_images, seed=1, **common)
        cur_dir = write_synthetic_result(
            folder, "current", n_images, seed=2, embed_shift=0.1, **common
        )
        print(
            f"wrote 2 x {n_images} images through HDF5Store in {time.perf_counter() - start:.1f} s"
        )
        start = time.perf_counter()
        ref, cur = pyodlog.open_result(ref_dir), pyodlog.open_result(cur_dir)
        n_ref, n_cur = len(ref.detections["scores"]), len(cur.detections["scores"])
        print(
            f"open_result: {n_ref:,} + {n_cur:,} detections in {time.perf_counter() - start:.1f} s"
        )
        total = n_ref + n_cur
        chunk = 1 << 16
        hist_only = dict(class_embedding_sample=0, chunk_detections=chunk)
        compare(Head(ref, 10), Head(cur, 10))  # imports (scipy, torch's kernels) out of the timings
        tenth = n_images // 10
        small = (Head(ref, tenth), Head(cur, tenth))
        n_small = sum(int(np.sum(s.images["det_count"])) for s in small)
        _, p_small = _measure(
            f"compare, histogram signals, {n_small:,} detections",
            lambda: compare(*small, **hist_only),
        )
        s_hist, p_hist = _measure(
            f"compare, histogram signals, {total:,} detections",
            lambda: compare(ref, cur, **hist_only),
        )
        _, p_all_small = _measure(
            f"compare, all signals, {n_small:,} detections",
            lambda: compare(*small, chunk_detections=chunk),
        )
        s_all, p_all = _measure(
            f"compare, all signals, {total:,} detections",
            lambda: compare(ref, cur, chunk_detections=chunk),
        )
        _measure(
            f"report_numbers(current, against=reference), {total:,}",
            lambda: report_numbers(cur, against=ref, chunk_detections=chunk),
        )
        print(
            f"drift statistics throughput: {total / s_hist / 1e6:.2f} M detections/s (histograms)"
        )
        print(f"all signals throughput:      {total / s_all / 1e6:.2f} M detections/s")
        print(
            f"peak memory of the analysis: {p_small / 2**20:.1f} MiB ({n_small:,} det) vs "
            f"{p_hist / 2**20:.1f} MiB ({total:,} det) histograms; {p_all_small / 2**20:.1f} vs "
            f"{p_all / 2**20:.1f} MiB all signals"
        )
        print(
            f"process peak RSS (the read columns included): "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    print_header("benchmarks.bench_analysis")
    main()
