"""Curves of a logged model call: overhead vs batch size and vs detections, host memory vs calls.

The companion of ``benchmarks/scaling.py`` (issue 17, item 4), for the call path instead of the
kernels:

* **batch**: a logged Faster R-CNN (mobilenet v3, 320 px, random weights) against the bare model at
  batch 1, 2, 4, 8, 16 (100 detections per image);
* **detections**: the same at batch 1 with 10 → 1,000 detections per image (score threshold 0.001 so
  random weights fill the quota; ``max_detections_per_image`` sets it, through the logger);
* **memory**: host memory (RSS) every ``--every`` calls over ``--soak-calls`` fully logged calls with
  the writer running (``benchmarks/memory_soak.py``'s setup), and the fitted growth in bytes per call;
* **sink**: at batch 1 and 10, 100, 1,000 detections, the same logger writing to HDF5 and to memory
  (no writer work), paired with the bare model: the writer thread's share of the overhead;
* ``--profile``: cProfile of the logger's own call path at a few (batch, detections) points.

Every point times the bare model and two loggers in paired rotation
(:func:`pyodlog.demokit.timing.paired_rotation`, as ``benchmarks/overhead_paired.py``): each rotation
calls every variant once, back to back, in alternating order; the ratio logged/bare is the median of
the per-rotation ratios (with its IQR). The writer thread runs during the timing, as in production.
Prints a markdown table per curve with the log-log slopes (1.00 = linear) of the bare time, the logged
time and the overhead (logged − bare), and writes a plot (``--png``, default ``scaling_calls.png``).

Usage: python -m benchmarks.scaling_calls [batch] [detections] [memory] [sink]
           [--rotations N] [--budget S] [--soak-calls N] [--every N] [--profile] [--png PATH]
       (no curve named: all of them)
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torchvision.models import detection

import pyodlog
from benchmarks.environment import print_header
from benchmarks.scaling import slope
from pyodlog.demokit.timing import RatioSummary, paired_rotation
from pyodlog.io import HDF5Store
from pyodlog.monitoring import ObjectDetectionTorchLogger

ROOT = Path(__file__).resolve().parent
MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"
FPN_LEVEL = "backbone.fpn.layer_blocks.0"  # the highest-resolution FPN output (as bench_overhead)
IMAGE = (3, 240, 320)  # the model resizes to 320 px on its short side anyway
SCORE_THRESH = 0.001  # random weights score every class about 1/91: the quota is always filled
BATCHES = [1, 2, 4, 8, 16]
DETECTIONS = [10, 30, 100, 300, 1_000]
LOGGED: dict[str, dict[str, Any]] = {
    "detections+logits": dict(log_embeddings=False),
    "+embeddings+FPN uint8": dict(
        target_layers={"fpn": {"path": FPN_LEVEL, "compression": "uint8"}}
    ),
}


@dataclass(frozen=True)
class Point:
    """One point of a call curve: median seconds per call of each variant and the paired ratios."""

    x: int
    detections: float  # mean detections per image the model returned
    seconds: dict[str, float]  # variant -> median seconds per call
    # logged variant -> median of the per-rotation (logged - bare) seconds
    overhead: dict[str, float]
    # variant -> its fastest call (the least disturbed one on a shared machine)
    fastest: dict[str, float]
    ratios: dict[str, RatioSummary]  # logged variant -> paired ratio to bare
    rotations: int
    written: dict[str, tuple[int, int]]  # logged variant -> (written, dropped) after the point


def _model(detections: int, min_size: int = 320) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(detection, MODEL)(
        weights=None,
        weights_backbone=None,
        box_score_thresh=SCORE_THRESH,
        box_detections_per_img=detections,
        min_size=min_size,
        max_size=2 * min_size,  # the 320 px model's own proportion (320/640)
    ).eval()


def _images(batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    return [torch.rand(*IMAGE, generator=g) for _ in range(batch)]


def _loggers(
    model: torch.nn.Module, folder: Path, detections: int
) -> dict[str, ObjectDetectionTorchLogger]:
    return {
        name: pyodlog.create_logger(
            model,
            "curves",
            f"v{i}",
            sink=HDF5Store(folder / name.replace("+", "p")),
            score_thresh=SCORE_THRESH,
            max_detections_per_image=detections,
            metrics=False,
            **options,
        )
        for i, (name, options) in enumerate(LOGGED.items())
    }


def measure_point(
    x: int,
    batch: int,
    detections: int,
    rotations: int,
    budget_s: float,
    model: torch.nn.Module | None = None,
) -> Point:
    """The bare model and every logged variant at one (batch, detections), in paired rotation."""
    model = _model(detections) if model is None else model
    images = _images(batch)
    folder = Path(tempfile.mkdtemp(prefix="pyodlog-curves-"))
    loggers = _loggers(model, folder, detections)
    variants: dict[str, Callable[[], object]] = {"bare": lambda: model(images)}
    variants.update({name: partial(lg, images) for name, lg in loggers.items()})
    try:
        with torch.inference_mode():
            returned = model(images)
            timed = paired_rotation(
                variants, rotations, warmup=1, min_rotations=3, time_budget_s=budget_s
            )
        written = {}
        for name, lg in loggers.items():
            lg.wait_for_save()
            stats = lg.stats()
            written[name] = (int(stats["written"]), int(stats["dropped"]))
    finally:
        for lg in loggers.values():
            lg.close()
        shutil.rmtree(folder, ignore_errors=True)
    return Point(
        x=x,
        detections=statistics.fmean(len(o["boxes"]) for o in returned),
        seconds={name: timed.median(name) for name in variants},
        fastest={name: min(timed.times[name]) for name in variants},
        overhead={
            name: statistics.median(a - b for a, b in zip(timed.times[name], timed.times["bare"]))
            for name in loggers
        },
        ratios={name: timed.ratio(name, "bare") for name in loggers},
        rotations=timed.rotations,
        written=written,
    )


def overhead_vs_batch(rotations: int, budget_s: float) -> list[Point]:
    """Batch 1 → 16 at 100 detections per image (one model: only the inputs change)."""
    model = _model(100)
    return [measure_point(b, b, 100, rotations, budget_s, model) for b in BATCHES]


def overhead_vs_detections(rotations: int, budget_s: float) -> list[Point]:
    """10 → 1,000 detections per image at batch 1 (the loggers set ``detections_per_img``)."""
    model = _model(100)
    return [measure_point(d, 1, d, rotations, budget_s, model) for d in DETECTIONS]


def writer_share(rotations: int, budget_s: float) -> str:
    """Whose cost the call overhead is: the same logger writing to HDF5 or to memory, paired.

    At batch 1 and 10, 100, 1,000 detections per image: the bare model, a detections+logits logger on
    an ``HDF5Store`` (the writer thread turns every record into rows and appends them) and one on an
    ``InMemorySink`` that keeps two records (no writer work at all). What the first costs more than
    the second is the writer thread's share of the call's time (GIL, cores); the rest is the call
    path itself. A markdown table.
    """
    from pyodlog.io.sink import InMemorySink

    lines = [
        "### the writer thread's share (detections+logits, batch 1)",
        "",
        "| detections | bare ms | to HDF5 ms | paired ratio (IQR) | overhead ms "
        "| in memory ms | paired ratio (IQR) | overhead ms | HDF5 − memory ms | rotations |",
        "|---" * 10 + "|",
    ]
    for d in (10, 100, 1_000):
        model = _model(d)
        images = _images(1)
        folder = Path(tempfile.mkdtemp(prefix="pyodlog-curves-"))
        options: dict[str, Any] = dict(
            score_thresh=SCORE_THRESH,
            max_detections_per_image=d,
            metrics=False,
            log_embeddings=False,
        )
        sinks = {"hdf5": HDF5Store(folder), "memory": InMemorySink(max_records=2)}
        loggers = {
            key: pyodlog.create_logger(model, "curves", key, sink=sink, **options)
            for key, sink in sinks.items()
        }
        calls: dict[str, Callable[[], object]] = {"bare": partial(model, images)}
        calls.update({key: partial(lg, images) for key, lg in loggers.items()})
        try:
            with torch.inference_mode():
                timed = paired_rotation(
                    calls, rotations, warmup=2, min_rotations=3, time_budget_s=budget_s
                )
            loggers["hdf5"].wait_for_save()
        finally:
            for lg in loggers.values():
                lg.close()
            shutil.rmtree(folder, ignore_errors=True)
        over = {
            key: statistics.median(a - b for a, b in zip(timed.times[key], timed.times["bare"]))
            for key in loggers
        }
        row = f"| {d:,} | {timed.median('bare') * 1e3:.1f} |"
        for key in loggers:
            r = timed.ratio(key, "bare")
            row += (
                f" {timed.median(key) * 1e3:.1f} | {r.median:.3f} ({r.q1:.3f}–{r.q3:.3f}) |"
                f" {over[key] * 1e3:+.2f} |"
            )
        lines.append(row + f" {(over['hdf5'] - over['memory']) * 1e3:+.2f} | {timed.rotations} |")
    return "\n".join(lines) + "\n"


def _overhead(point: Point, name: str) -> float:
    """The paired overhead: the median over rotations of (logged − bare) of the same rotation."""
    return point.overhead[name]


def _slope_or_none(xy: list[tuple[float, float]]) -> str:
    """The log-log slope, or a note where it has no meaning: fewer than two distinct x, or a value
    that is not positive (an overhead lost in the noise)."""
    if len({x for x, _ in xy}) < 2:
        return "n/a (fewer than two points)"
    if any(y <= 0 for _, y in xy):
        return "n/a (an overhead ≤ 0 at some point: within the noise)"
    return f"{slope(xy):.2f}"


def call_table(title: str, x_name: str, points: list[Point], per: str) -> str:
    """A markdown table of a call curve and its log-log slopes."""
    names = list(LOGGED)
    head = f"| {x_name} | detections/image | bare ms |"
    for name in names:
        head += (
            f" {name} ms | paired ratio (IQR) | fastest/fastest | overhead ms"
            f" | overhead µs per {per} |"
        )
    lines = [f"### {title}", "", head + " rotations |", "|---" * (4 + 5 * len(names)) + "|"]
    for p in points:
        units = p.x
        row = f"| {p.x:,} | {p.detections:,.0f} | {p.seconds['bare'] * 1e3:.1f} |"
        for name in names:
            r = p.ratios[name]
            over = _overhead(p, name)
            row += (
                f" {p.seconds[name] * 1e3:.1f} | {r.median:.3f} ({r.q1:.3f}–{r.q3:.3f}) |"
                f" {p.fastest[name] / p.fastest['bare']:.3f} |"
                f" {over * 1e3:+.2f} | {over / units * 1e6:+.1f} |"
            )
        lines.append(row + f" {p.rotations} |")
    lines.append("")
    slopes = [f"bare {_slope_or_none([(p.x, p.seconds['bare']) for p in points])}"]
    for name in names:
        slopes.append(f"{name} {_slope_or_none([(p.x, p.seconds[name]) for p in points])}")
        slopes.append(
            f"overhead of {name} {_slope_or_none([(p.x, _overhead(p, name)) for p in points])}"
        )
    lines.append("log-log slope vs " + x_name + ": " + ", ".join(slopes) + " (1.00 = linear)")
    kept = "; ".join(
        f"{name}: " + ", ".join(f"{p.written[name][0]}/{p.written[name][1]}" for p in points)
        for name in names
    )
    lines.append("")
    lines.append(f"records written/dropped per point — {kept}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Soak:
    """RSS samples of a memory soak and what the writer did."""

    samples: list[tuple[int, int]]  # (calls so far, RSS bytes)
    seconds: float
    written: int
    dropped: int

    def after_warmup(self) -> list[tuple[int, int]]:
        """The samples after the first fifth of the calls (lazy allocations, allocator warm-up)."""
        return self.samples[len(self.samples) // 5 :]

    def bytes_per_call(self) -> float:
        """Least-squares slope of RSS against calls after warm-up, in bytes per call."""
        pts = self.after_warmup()
        xs = [float(c) for c, _ in pts]
        ys = [float(r) for _, r in pts]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def memory_vs_calls(calls: int, every: int, min_size: int) -> Soak:
    """``memory_soak``'s full logging over ``calls`` calls, RSS sampled every ``every`` calls.

    The model runs at ``min_size`` px (128: about a sixth of the 320 px backbone's work, so that
    thousands of calls take a minute or two on 2 cores; what is logged per call is the same kind).
    """
    from benchmarks.memory_soak import soak

    start = time.perf_counter()
    samples, stats = soak(calls, every, _model(100, min_size))
    return Soak(samples, time.perf_counter() - start, stats["written"], stats["dropped"])


def memory_table(soak: Soak, every: int) -> str:
    """A markdown table of the soak (every fifth sample) and the fitted growth per call."""
    step = max(1, len(soak.samples) // 10)
    lines = [
        "### host memory vs logged calls (detections+logits+embeddings+FPN uint8, batch 1)",
        "",
        "| calls | RSS MiB |",
        "|---|---|",
    ]
    shown = soak.samples[::step]
    if shown[-1] != soak.samples[-1]:
        shown.append(soak.samples[-1])
    lines += [f"| {c:,} | {r / 2**20:.1f} |" for c, r in shown]
    rest = [r for _, r in soak.after_warmup()]
    total = soak.samples[-1][0]
    lines += [
        "",
        f"{total:,} calls in {soak.seconds:.0f} s, RSS sampled every {every} calls; records written "
        f"{soak.written}, dropped {soak.dropped}. After the first fifth: min {min(rest) / 2**20:.1f}, "
        f"max {max(rest) / 2**20:.1f} MiB (spread {(max(rest) - min(rest)) / 2**20:.1f} MiB); "
        f"fitted growth {soak.bytes_per_call():+,.0f} bytes per call "
        f"({soak.bytes_per_call() * 1e6 / 2**30:+.2f} GiB per million calls).",
    ]
    return "\n".join(lines) + "\n"


# The logger's own functions on the call path (cProfile names), in the order of the call.
PROFILED = {
    "in the model's hooks": ("tracer.py", "guarded"),
    "after the model (record of the call)": ("detection_logger.py", "_record_of_call"),
    "  match_detections": ("common.py", "match_detections"),
    "  near_misses_of": ("common.py", "near_misses_of"),
    "  gather_rows (logits, embeddings)": ("common.py", "gather_rows"),
    "  with_uncertainty": ("common.py", "with_uncertainty"),
    "  submit to the writer": ("writer.py", "submit"),
}
PROFILE_POINTS = [(1, 10), (1, 100), (1, 1_000), (4, 100), (16, 100)]  # (batch, detections)


def profile_points(
    points: list[tuple[int, int]] = PROFILE_POINTS, min_size: int = 320
) -> dict[str, list[float]]:
    """cProfile of the fully logged call at each (batch, detections): seconds of the logger's parts.

    For each :data:`PROFILED` function, its cumulative time at each point (torch operators it calls
    included) in one logged call: each call is profiled on its own
    and the fastest call's figure is kept, as robust to other load as a shared machine allows.
    cProfile adds its own cost per Python call, the same at every point; the model's run is in no
    function's figure. The output is parsed on the call (``defer_parse = False``) so that its parts
    show.
    """
    rows: dict[str, list[float]] = {label: [] for label in PROFILED}
    for batch, detections in points:
        model = _model(detections, min_size)
        images = _images(batch)
        folder = Path(tempfile.mkdtemp(prefix="pyodlog-curves-"))
        lg = _loggers(model, folder, detections)["+embeddings+FPN uint8"]
        # The parse on the calling thread, where cProfile sees it (by default the writer thread
        # parses a CPU call: the same functions, off the call's latency but not off the machine).
        lg.defer_parse = False
        best = {label: float("inf") for label in PROFILED}
        try:
            with torch.inference_mode():
                lg(images)  # warm-up
                for _ in range(max(2, 8 // batch)):
                    profiler = cProfile.Profile()
                    profiler.enable()
                    lg(images)
                    profiler.disable()
                    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
                    for label, (file, name) in PROFILED.items():
                        cumulative = sum(
                            ct
                            for (path, _, fn), (_, _, _, ct, _) in stats.items()
                            if fn == name and path.endswith(file) and "pyodlog" in path
                        )
                        best[label] = min(best[label], cumulative)
            lg.wait_for_save()
        finally:
            lg.close()
            shutil.rmtree(folder, ignore_errors=True)
        for label, seconds in best.items():
            rows[label].append(seconds)
    return rows


def profile_table(
    rows: dict[str, list[float]], points: list[tuple[int, int]] = PROFILE_POINTS
) -> str:
    """:func:`profile_points` as a markdown table, with each row's log-log slope against the batch
    (at 100 detections per image) and against the detections per image (at batch 1)."""
    head = "| ms per logged call | " + " | ".join(f"batch {b}, {d} det." for b, d in points)
    lines = [
        "### where the logger's call-path time goes (cProfile, fully logged call)",
        "",
        head + " | log-log slope vs batch (100 det.) | vs detections (batch 1) |",
        "|---" * (len(points) + 3) + "|",
    ]
    for label, values in rows.items():
        by_batch = [(float(b), v) for (b, d), v in zip(points, values) if d == 100]
        by_dets = [(float(d), v) for (b, d), v in zip(points, values) if b == 1]
        lines.append(
            f"| {label} | "
            + " | ".join(f"{v * 1e3:.2f}" for v in values)
            + f" | {_slope_or_none(by_batch)} | {_slope_or_none(by_dets)} |"
        )
    return "\n".join(lines) + "\n"


def plot(
    batch: list[Point] | None,
    dets: list[Point] | None,
    soak: Soak | None,
    profile: dict[str, list[float]] | None,
    path: Path,
) -> None:
    """Log-log panels of the call curves (time and paired overhead), a linear panel of RSS vs calls
    and a log-log panel of the logger's call-path time (cProfile) vs detections per call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (batch, dets, soak, profile) if p is not None]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    ax_iter = iter(axes[0])
    for points, x_name, title in (
        (batch, "batch size (images per call)", "call time vs batch (100 det./image)"),
        (dets, "detections per image", "call time vs detections (batch 1)"),
    ):
        if points is None:
            continue
        ax = next(ax_iter)
        xs = [p.x for p in points]
        ax.loglog(xs, [p.seconds["bare"] for p in points], marker="o", label="bare")
        for name in LOGGED:
            ax.loglog(xs, [p.seconds[name] for p in points], marker="o", label=f"logged: {name}")
            over = [(p.x, _overhead(p, name)) for p in points]
            kept = [(x, y) for x, y in over if y > 0]
            if kept:
                omitted = " (points ≤ 0: noise, omitted)" if len(kept) < len(over) else ""
                ax.loglog(
                    *zip(*kept), marker="x", linestyle="--", label=f"overhead: {name}{omitted}"
                )
        ax.set_title(title)
        ax.set_xlabel(x_name)
        ax.set_ylabel("seconds per call (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if soak is not None:
        ax = next(ax_iter)
        ax.plot([c for c, _ in soak.samples], [r / 2**20 for _, r in soak.samples], marker=".")
        ax.set_title(f"host RSS vs logged calls ({soak.bytes_per_call():+,.0f} B/call)")
        ax.set_xlabel("logged calls")
        ax.set_ylabel("RSS MiB")
        mib = [r / 2**20 for _, r in soak.samples]
        ax.set_ylim(min(mib) - 64, max(mib) + 64)  # flat at the scale of a leak, not of a page
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.grid(True, alpha=0.3)
    if profile is not None:
        ax = next(ax_iter)
        for label in (
            "after the model (record of the call)",
            "  match_detections",
            "  near_misses_of",
        ):
            for axis, keep, style in (("batch", 100, "-"), ("detections", 1, ":")):
                xy = [
                    (b * d, v)
                    for (b, d), v in zip(PROFILE_POINTS, profile[label])
                    if (d if axis == "batch" else b) == keep
                ]
                ax.loglog(
                    *zip(*xy), marker="o", linestyle=style, label=f"{label.strip()}, vs {axis}"
                )
        guide = [1e1, 1.6e3]
        ax.loglog(
            guide, [1e-3 * x / guide[0] for x in guide], color="grey", alpha=0.5, label="slope 1"
        )
        ax.set_title("logger call path (cProfile) vs detections per call")
        ax.set_xlabel("detections per call (batch × detections per image)")
        ax.set_ylabel("seconds per call (fastest profiled call)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


CURVES = ("batch", "detections", "memory", "sink")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("curves", nargs="*", help=f"any of {', '.join(CURVES)}")
    parser.add_argument("--rotations", type=int, default=20, help="most rotations per point")
    parser.add_argument(
        "--budget",
        type=float,
        default=5.0,
        help="seconds of timed calls per point (at least 3 rotations)",
    )
    parser.add_argument("--soak-calls", type=int, default=2000)
    parser.add_argument("--every", type=int, default=50, help="RSS sampled every N calls")
    parser.add_argument(
        "--soak-min-size", type=int, default=128, help="the soak model's input size (px)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the call path at a few points"
    )
    parser.add_argument("--png", type=Path, default=ROOT / "scaling_calls.png")
    args = parser.parse_args()
    chosen = args.curves or list(CURVES)
    unknown = [c for c in chosen if c not in CURVES]
    if unknown:
        parser.error(f"unknown curve(s) {unknown}: choose from {', '.join(CURVES)}")
    print(
        f"{MODEL}, random weights, images {IMAGE}, score threshold {SCORE_THRESH}; up to "
        f"{args.rotations} rotations or {args.budget:g} s of timed calls per point; "
        f"torch threads {torch.get_num_threads()}\n",
        flush=True,
    )
    batch = dets = soak = None
    if "batch" in chosen:
        batch = overhead_vs_batch(args.rotations, args.budget)
        print(
            call_table(
                "call overhead vs batch size (100 detections/image)", "batch", batch, "image"
            ),
            flush=True,
        )
    if "detections" in chosen:
        dets = overhead_vs_detections(args.rotations, args.budget)
        print(
            call_table(
                "call overhead vs detections per image (batch 1)", "detections", dets, "detection"
            ),
            flush=True,
        )
    if "memory" in chosen:
        soak = memory_vs_calls(args.soak_calls, args.every, args.soak_min_size)
        print(memory_table(soak, args.every), flush=True)
    profile = None
    if args.profile:
        profile = profile_points()
        print(profile_table(profile), flush=True)
    if "sink" in chosen:
        print(writer_share(args.rotations, args.budget), flush=True)
    if any(curve is not None for curve in (batch, dets, soak, profile)):
        plot(batch, dets, soak, profile, args.png)
        print(f"plot: {args.png}")


if __name__ == "__main__":
    print_header("benchmarks.scaling_calls")
    main()
