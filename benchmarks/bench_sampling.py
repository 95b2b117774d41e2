"""Sampling, aggregates and compact records (issue 22): the figures of benchmarks/RESULTS.md.

1. Cost of a call: bare model vs a logged call (every call written) vs a sampled-out call
   (``Sampling(rate=1e-9)``: its aggregates counted, no rows), paired (one call of each in
   rotation), wall time and the process's CPU time over every thread (the writer's included).
2. The writer thread's work per call, by stage, on the same records: summary (every call),
   + rows (a kept call's ``record_to_columns``), + the segment append.
3. Bytes per detection and per image (100 detections) of each family, float32 vs the default
   storage; whether an HDF5 deflate filter would pay on the compact columns.
4. Aggregate accuracy: counts against the full data, the embedding sketch against the full
   data's projection, the JL error of the default projection (128 dimensions).

Usage: .venv/bin/python -m benchmarks.bench_sampling [ROTATIONS]
"""

from __future__ import annotations

import resource
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import torch

import pyodlog
from benchmarks.bench_overhead import _make
from benchmarks.environment import print_header
from pyodlog.io import HDF5Store
from pyodlog.io.aggregates import SKETCH_DIM, SKETCH_SEED, Aggregates, summarize_call
from pyodlog.io.columns import ColumnBatch, record_to_columns
from pyodlog.io.writer import WriterConfig
from pyodlog.ops.compression import random_projection
from tests.helpers.records import open_store, synthetic_record

MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def call_costs(rotations: int, block: int = 4) -> None:
    """Blocks of ``block`` calls per variant in rotation; a logger's block ends with wait_for_save."""
    model = _make(MODEL)
    images = [torch.rand(3, 480, 640, generator=torch.Generator().manual_seed(1))]
    folder = Path(tempfile.mkdtemp())
    logged = pyodlog.create_logger(model, "b", "logged", sink=HDF5Store(folder / "a"))
    sampled = pyodlog.create_logger(
        model,
        "b",
        "sampled",
        sink=HDF5Store(folder / "b"),
        # The rate alone (the default policy): with keep_near_misses=True every call of a
        # random-weight model has near-misses and is always kept: nothing would be sampled out.
        sampling=pyodlog.Sampling(1e-9),
    )
    hot = pyodlog.create_logger(model, "b", "hot", sink=pyodlog.InMemorySink(max_records=1))
    variants = {
        "bare": model,
        "logged (every call written)": logged,
        "sampled out (aggregates only)": sampled,
        "the call's own logging work only (InMemorySink)": hot,
    }
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for call in variants.values():
            call(images)
        logged.wait_for_save()
        sampled.wait_for_save()
        for _ in range(rotations):
            for key, call in variants.items():
                c0, t0 = cpu(), time.perf_counter()
                for _ in range(block):
                    call(images)
                if call in (logged, sampled):  # the writer's work for these calls is done too
                    call.wait_for_save()
                wall[key].append((time.perf_counter() - t0) / block)
                cpus[key].append((cpu() - c0) / block)
    print(
        f"\n## Cost of a call ({MODEL}, batch 1, 480x640, {rotations} rotations of "
        f"{block} calls per variant, HDF5 on disk)"
    )
    print("| variant | wall median | CPU median (all threads) | CPU over bare |")
    print("|---|---|---|---|")
    bare_cpu = statistics.median(cpus["bare"])
    for key in variants:
        w, c = statistics.median(wall[key]), statistics.median(cpus[key])
        print(f"| {key} | {w * 1e3:.1f} ms | {c * 1e3:.1f} ms | {(c - bare_cpu) * 1e3:+.1f} ms |")
    print(f"(written: {logged.stats()['written']}; sampled out: {sampled.stats()['sampled_out']})")
    for logger in (logged, sampled, hot):
        logger.close()
    seg = sorted((folder / "a").rglob("*.h5"))
    if seg:
        with h5py.File(seg[-1], "r") as f:
            n = f["images/det_count"].shape[0]
            det = sum(ds.size * ds.dtype.itemsize for ds in f["detections"].values())
            print(
                f"real {MODEL} detections/ bytes per image (default storage): {det / max(n, 1):.0f}"
            )


def writer_stages(n_calls: int = 200) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the writer's tensors are small: one thread, measured by thread_time
    records = [synthetic_record(s, 1, 100, 91, 1024) for s in range(n_calls)]
    for r in records:
        r.detections.counts[:] = 100
    storage = pyodlog.RecordStorage()
    timings = {}
    t0 = time.thread_time()
    for r in records:
        summarize_call(r, 91)
    timings["summary (every call; all a sampled-out call costs the writer)"] = (
        time.thread_time() - t0
    )
    t0 = time.thread_time()
    for r in records:
        summarize_call(r, 91)
        record_to_columns(r, ColumnBatch(), storage, 1.0)
    timings["summary + rows, default storage"] = time.thread_time() - t0
    t0 = time.thread_time()
    for r in records:
        summarize_call(r, 91)
        record_to_columns(r, ColumnBatch(), pyodlog.RecordStorage.full(), 1.0)
    timings["summary + rows, float32 storage"] = time.thread_time() - t0
    with tempfile.TemporaryDirectory() as tmp:
        config = WriterConfig(backpressure="block")  # default batching; nothing dropped
        store = open_store(Path(tmp), 91, config=config)
        t0 = cpu()
        for r in records:
            store.submit(r)
        store.wait_for_save()
        timings[
            "whole writer path incl. the HDF5 append and fsync (process CPU, default storage)"
        ] = cpu() - t0
        assert store.stats()["written"] == n_calls
        store.close()
    torch.set_num_threads(threads)
    print(f"\n## Writer work per call (1 image, 100 detections, C=91, E=1024; {n_calls} calls)")
    print("| stage | per call |")
    print("|---|---|")
    for key, t in timings.items():
        print(f"| {key} | {t / n_calls * 1e3:.2f} ms |")


FAMILIES = {
    "Faster R-CNN (ResNet-50 FPN, v2), Mask/Keypoint R-CNN": (91, 1024),
    "Faster R-CNN MobileNet v3": (91, 1024),
    "RetinaNet, FCOS": (91, 256),
    "SSD, SSDlite (no embedding)": (91, None),
    "DETR (ResNet-50), Deformable DETR": (92, 256),
    "YOLOv8n": (80, 448),
}


def bytes_per_family() -> None:
    print("\n## Bytes per detection and per image (100 detections), float32 vs default storage")
    print("| family (C, E) | float32 B/det | default B/det | ratio | default KB/image |")
    print("|---|---|---|---|---|")
    for name, (c, e) in FAMILIES.items():
        full = 36 + 4 * c + (0 if e is None else 4 * e)
        compact = 36 + 2 * c + (0 if e is None else min(e, 128) + 8)
        print(
            f"| {name} ({c}, {e}) | {full} | {compact} | {compact / full:.3f} | {compact * 100 / 1e3:.1f} |"
        )
    # Would deflate pay on the compact columns? Real rows of a compact store.
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp), 91)
        for s in range(20):
            store.submit(synthetic_record(s, 4, 100, 91, 1024))
        store.close()
        (path,) = Path(tmp).rglob("*.h5")
        with h5py.File(path, "r") as f:
            print("| column | bytes | deflate-1 ratio | deflate-1 MB/s (one core) |")
            print("|---|---|---|---|")
            for name in ("detections/logits", "detections/embeddings", "detections/boxes"):
                raw = f[name][()].tobytes()
                t0 = time.perf_counter()
                packed = zlib.compress(raw, 1)
                dt = time.perf_counter() - t0
                print(
                    f"| {name} | {len(raw)} | {len(packed) / len(raw):.3f} | {len(raw) / dt / 1e6:.0f} |"
                )
    print("(random-weight logits and Gaussian embeddings: real ones may compress a little better)")


def aggregate_accuracy() -> None:
    records = [
        synthetic_record(s, 4, 50, 91, 1024, dataset_type=("ref", "cur")[s % 2]) for s in range(40)
    ]
    for r in records[1::2]:
        r.detections.embeddings = r.detections.embeddings + 0.1
    agg = Aggregates(91)
    for r in records:
        agg.add(summarize_call(r, 91), kept=False)
    dets = sum(int(r.detections.counts.sum()) for r in records)
    t = agg.totals()
    print("\n## Aggregate accuracy (synthetic: 40 calls x 4 images, C=91, E=1024)")
    print(
        f"calls {t['calls']} (40), images {t['images']} (160), detections {t['detections']} ({dets}), "
        f"score histogram sum {sum(t['score'])} ({dets})"
    )

    def rows(rs):
        out = []
        for r in rs:
            m = torch.arange(50)[None] < r.detections.counts[:, None]
            out.append(r.detections.embeddings[m])
        return torch.cat(out).double()

    ref, cur = rows(records[0::2]), rows(records[1::2])
    p = random_projection(1024, SKETCH_DIM, SKETCH_SEED).double()
    sketch_ref, sketch_cur = (
        agg.totals("ref")["embedding_mean"],
        agg.totals("cur")["embedding_mean"],
    )
    exact = float(((ref @ p).mean(0) - torch.from_numpy(sketch_ref)).abs().max())
    shift_full = float((cur.mean(0) - ref.mean(0)).norm())
    shift_sketch = float(np.linalg.norm(sketch_cur - sketch_ref))
    print(f"sketch mean vs the full data's projection: max abs difference {exact:.2e}")
    print(
        f"mean shift ||mu_cur - mu_ref||: full 1024-d {shift_full:.4f}, sketch ({SKETCH_DIM}-d) {shift_sketch:.4f} "
        f"(relative error {abs(shift_sketch / shift_full - 1):.3f}; JL std ~ sqrt(1/(2*{SKETCH_DIM})) = {(1 / 32) ** 0.5:.3f})"
    )
    g = torch.Generator().manual_seed(0)
    print("| projection | mean of d'/d | std of d'/d | 99th pct of abs(d'/d - 1) |")
    print("|---|---|---|---|")
    for width in (1024, 448, 256):
        x = torch.randn(1000, width, generator=g)
        y = x @ random_projection(width, 128, 0)
        i, j = (
            torch.randint(0, 1000, (5000,), generator=g),
            torch.randint(0, 1000, (5000,), generator=g),
        )
        keep = i != j
        ratio = (y[i] - y[j]).norm(dim=1)[keep] / (x[i] - x[j]).norm(dim=1)[keep]
        q = float((ratio - 1).abs().quantile(0.99))
        print(
            f"| {width} -> 128 | {float(ratio.mean()):.4f} | {float(ratio.std()):.4f} | {q:.4f} |"
        )


def main(rotations: int) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bytes_per_family()
    aggregate_accuracy()
    writer_stages()
    call_costs(rotations)


if __name__ == "__main__":
    print_header("benchmarks.bench_sampling")
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
