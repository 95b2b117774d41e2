"""Curves, not points: how pyodlog's costs grow with the size of the work (issue 17, item 4).

Each curve is measured in one run, pyodlog beside its baseline at every point, with the variants
interleaved point by point (so slow drift of a shared machine lands in both). Times are the fastest of
``--repeats`` calls after one warm-up (robust to other load on a shared machine). Prints a markdown table per curve and the fitted log-log slope
(1.0 = linear; above 1 grows faster than linear), and writes a log-log plot PNG.

Usage: python -m benchmarks.scaling [nms-boxes] [nms-classes] [writer] [--repeats N] [--png PATH]
       (no curve named: all of them)
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torchvision

from benchmarks.environment import print_header
from pyodlog.ops import batched_nms
from tests.helpers.nms_cases import clustered_boxes

ROOT = Path(__file__).resolve().parent
Curve = dict[str, list[tuple[float, float]]]  # variant -> [(x, seconds)]


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls after a warm-up: on a shared machine the minimum is the run that
    other processes did not disturb, which is what a growth curve needs (a median mixes in their load)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _paired(
    points: list[float], variants: dict[str, Callable[[float], Callable[[], object]]], repeats
):
    curve: Curve = {name: [] for name in variants}
    for x in points:
        for name, make in variants.items():
            curve[name].append((x, _best_time(make(x), repeats)))
    return curve


def nms_vs_boxes(repeats: int) -> Curve:
    """Batched NMS time against the number of boxes (80 classes, clustered like a detector's head)."""
    cases = {}

    def case(n: float):
        if n not in cases:
            cases[n] = clustered_boxes(int(n), 80, seed=0)
        return cases[n]

    return _paired(
        [1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000],
        {
            "torchvision.ops.batched_nms": lambda n: (
                lambda: torchvision.ops.batched_nms(*case(n), 0.5)
            ),
            "pyodlog batched_nms": lambda n: lambda: batched_nms(*case(n), 0.5),
        },
        repeats,
    )


def nms_vs_classes(repeats: int) -> Curve:
    """Batched NMS time against the number of classes (20,000 clustered boxes)."""
    cases = {}

    def case(c: float):
        if c not in cases:
            cases[c] = clustered_boxes(20_000, int(c), seed=0)
        return cases[c]

    return _paired(
        [1, 3, 10, 30, 80, 300, 1_000],
        {
            "torchvision.ops.batched_nms": lambda c: (
                lambda: torchvision.ops.batched_nms(*case(c), 0.5)
            ),
            "pyodlog batched_nms": lambda c: lambda: batched_nms(*case(c), 0.5),
        },
        repeats,
    )


def writer_vs_record_size(repeats: int) -> Curve:
    """Writer throughput against record size: bytes per call from ~10 KB to ~10 MB (tmpfs)."""
    from benchmarks.bench_writer import _blobs, _records
    from pyodlog.io import HDF5Store, WriterConfig

    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    curve: Curve = {"raw write()": [], "pyodlog HDF5Store": []}
    for heavy, n_calls in ((False, 8), (False, 32), (True, 4), (True, 8)):
        records = _records(n_calls, heavy)
        blobs = _blobs(records)
        nbytes = sum(len(b) for b in blobs)

        def raw(blobs=blobs) -> None:
            folder = Path(tempfile.mkdtemp(dir=base))
            with open(folder / "raw.bin", "wb") as f:
                for blob in blobs:
                    f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            shutil.rmtree(folder)

        sink = HDF5Store(
            tempfile.mkdtemp(dir=base), config=WriterConfig(flush_interval=1.0, batch_images=256)
        )
        sink.open_result("bench", "v1", "r", {"n_class": 91}, False)

        def store(records=records, sink=sink) -> None:
            for record in records:
                sink.submit(record)
            sink.wait_for_save()

        curve["raw write()"].append((nbytes, _best_time(raw, repeats)))
        curve["pyodlog HDF5Store"].append((nbytes, _best_time(store, repeats)))
        sink.close()
    return curve


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(time) against log(x): the growth exponent."""
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(max(t, 1e-9)) for _, t in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def table(title: str, x_name: str, curve: Curve) -> str:
    names = list(curve)
    baseline = names[0]
    lines = [
        f"### {title}",
        "",
        f"| {x_name} | " + " | ".join(names) + f" | {baseline} / {names[-1]} |",
    ]
    lines.append("|---" * (len(names) + 2) + "|")
    for i, (x, _) in enumerate(curve[baseline]):
        cells = [f"{curve[n][i][1] * 1e3:.3f} ms" for n in names]
        ratio = curve[baseline][i][1] / curve[names[-1]][i][1]
        lines.append(f"| {x:,.0f} | " + " | ".join(cells) + f" | {ratio:.1f}× |")
    lines.append("")
    lines.append(
        "log-log slope: "
        + ", ".join(f"{n} {slope(curve[n]):.2f}" for n in names)
        + " (1.00 = linear)"
    )
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, tuple[str, Curve]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, (title, (x_name, curve)) in zip(axes[0], curves.items()):
        for name, points in curve.items():
            ax.loglog([x for x, _ in points], [t for _, t in points], marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel(x_name)
        ax.set_ylabel("seconds (best of repeats)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


CURVES = {
    "nms-boxes": ("batched NMS vs boxes (80 classes)", "boxes", nms_vs_boxes),
    "nms-classes": ("batched NMS vs classes (20,000 boxes)", "classes", nms_vs_classes),
    "writer": ("writer vs bytes per run (tmpfs, fsynced)", "bytes", writer_vs_record_size),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("curves", nargs="*", help=f"any of {', '.join(CURVES)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--png", type=Path, default=ROOT / "scaling.png")
    args = parser.parse_args()
    chosen = args.curves or list(CURVES)
    unknown = [c for c in chosen if c not in CURVES]
    if unknown:
        parser.error(f"unknown curve(s) {unknown}: choose from {', '.join(CURVES)}")
    measured = {}
    for key in chosen:
        title, x_name, fn = CURVES[key]
        curve = fn(args.repeats)
        measured[title] = (x_name, curve)
        print(table(title, x_name, curve), flush=True)
    plot(measured, args.png)
    print(f"plot: {args.png}")


if __name__ == "__main__":
    print_header("benchmarks.scaling")
    main()
