"""The GPU figures of issue 18, measured in one short run on a CUDA machine.

GPU time is scarce (minutes), so one script measures every headline figure in a
fixed order and within a time budget, and writes what it found as it goes (a
section that fails is recorded with its error; the others still run):

1. ``nms``: pyodlog's batched NMS against torchvision's CUDA ``batched_nms``, both its
   paths forced (the coordinate-offset trick and the per-class loop), at 5k and
   20k boxes x 80 classes and a batch of 8 x 5k (categories = image x class).
2. ``postprocess``: the fused post-processing operator against torchvision's own
   post-processing, batch of 8 (bench_postprocess.py's inputs, on the GPU).
3. ``quantize``: uint8 quantisation of a [8, 256, 200, 200] float32 activation in GB/s,
   against a device-to-device ``copy_`` measured in the same run (the card's
   practical memory bandwidth) and the datasheet peak.
4. ``host_syncs``: every synchronising CUDA call a logged call makes on the
   inference thread beyond the bare model's (``torch.cuda.set_sync_debug_mode``).
5. ``copier``: a torch.profiler trace of logged calls: on which streams the
   device-to-host copies run and how much of their time overlaps computation on
   other streams (the trace is written beside the JSON, gzipped).
6. ``end_to_end``: Faster R-CNN ResNet-50 FPN v2 and RetinaNet ResNet-50 FPN at
   800 px, batch 8, paired rotation: bare vs detections+logits vs
   +embeddings+FPN uint8 vs a naive synchronous logger; then a model whose
   backbone is ``torch.compile``d, bare vs logged.

Timing: wall clock of the call until the *caller's* stream has finished (what a
caller that uses the outputs waits for); the logger's side-stream copies are not
waited for, as in production. Random weights with a low score threshold, so every
image has its full quota of detections (100 for Faster R-CNN, 300 for RetinaNet).

Usage: python -m benchmarks.gpu_truth OUT_DIR [BUDGET_SECONDS]
  (GPU_TRUTH_SECTIONS=postprocess,end_to_end runs those sections only; GPU_TRUTH_MODELS=
  retinanet_resnet50_fpn the end-to-end models named only; GPU_TRUTH_ROTATIONS the rotations.)
  (GPU_TRUTH_DRY=1 runs every section on the CPU at toy sizes: a check of the script itself,
  so that minutes of GPU time are not lost to a typo; its figures mean nothing.)
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
import torchvision
from torchvision.models import detection

import pyodlog
from benchmarks.environment import describe, print_header
from pyodlog.io import HDF5Store

DATASHEET_BANDWIDTH_TBS = {"H200": 4.8, "H100": 3.35}
FPN_LEVEL = "backbone.fpn.layer_blocks.0"
DRY = os.environ.get("GPU_TRUTH_DRY") == "1"
DEVICE = "cpu" if DRY else "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.current_stream().synchronize()


def _timed(fn, reps: int, warmup: int = 3) -> dict[str, float]:
    """Median and quartiles (ms) of ``fn`` timed until the caller's stream is idle."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times) * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3}


def _profile_table(fn, path: Path, reps: int = 3, stacks: bool = False) -> None:
    """Writes torch.profiler's table (top ops by device time, then by host time) of ``reps`` calls;
    with ``stacks``, also grouped by the Python lines that called them (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if DEVICE == "cuda":
        activities.append(ProfilerActivity.CUDA)
    fn()
    _sync()
    with profile(activities=activities, with_stack=stacks) as prof:
        for _ in range(reps):
            fn()
        _sync()
    table = prof.key_averages()
    if stacks:
        path.with_suffix(".stacks.txt").write_text(
            prof.key_averages(group_by_stack_n=6).table(sort_by="cpu_time_total", row_limit=40)
        )
    by_device = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
    path.write_text(
        f"# {reps} calls, by device time\n"
        + table.table(sort_by=by_device, row_limit=25)
        + f"\n# {reps} calls, by host time\n"
        + table.table(sort_by="cpu_time_total", row_limit=25)
    )


def _events_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median device time (ms) between CUDA events around ``fn`` (no host time)."""
    if DEVICE != "cuda":
        return _timed(fn, reps, warmup)["median_ms"]
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# -- 1. batched NMS -------------------------------------------------------------------------------


def _nms_impls(batched_nms, boxes, scores, idxs) -> dict:
    from torchvision.ops.boxes import _batched_nms_coordinate_trick, _batched_nms_vanilla

    return {
        "torchvision offset trick": lambda: _batched_nms_coordinate_trick(boxes, scores, idxs, 0.5),
        "torchvision per-class loop": lambda: _batched_nms_vanilla(boxes, scores, idxs, 0.5),
        "pyodlog": lambda: batched_nms(boxes, scores, idxs, 0.5),
    }


def section_nms() -> dict:
    from pyodlog.ops import batched_nms
    from tests.helpers.nms_cases import clustered_boxes, uniform_boxes

    out = {}
    cases = [
        ("clustered 5k x 80", clustered_boxes, 5000, 1),
        ("clustered 20k x 80", clustered_boxes, 20000, 1),
        ("uniform 20k x 80", uniform_boxes, 20000, 1),
        ("clustered 8 x 5k (image x class)", clustered_boxes, 5000, 8),
    ]
    if DRY:
        cases = [(label, make, n // 20, images) for label, make, n, images in cases]
    for label, make, n, images in cases:
        parts = [make(n, 80, seed=i) for i in range(images)]
        boxes = torch.cat([p[0] for p in parts]).to(DEVICE)
        scores = torch.cat([p[1] for p in parts]).to(DEVICE)
        idxs = torch.cat([p[2] + i * 80 for i, p in enumerate(parts)]).to(DEVICE)
        impls = _nms_impls(batched_nms, boxes, scores, idxs)
        want = impls["torchvision offset trick"]()
        got = impls["pyodlog"]()
        exact = impls["torchvision per-class loop"]()
        on_cpu = batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.5)
        row = {
            # The offset trick shifts boxes by category x (max coordinate + 1): with many
            # categories float32 loses the low bits, so its IoUs (and kept sets) can differ.
            "same kept set as torchvision": set(got.tolist()) == set(want.tolist()),
            "same kept set as torchvision's per-class loop": set(got.tolist())
            == set(exact.tolist()),
            "offset trick same set as per-class loop": set(want.tolist()) == set(exact.tolist()),
            "same as pyodlog on the CPU": torch.equal(got.cpu(), on_cpu),
            "same order": torch.equal(got, want),
            "kept": len(got),
        }
        for name, fn in impls.items():
            row[name] = _timed(fn, reps=30)
        pyo = row["pyodlog"]["median_ms"]
        row["speedup vs offset trick"] = row["torchvision offset trick"]["median_ms"] / pyo
        row["speedup vs per-class loop"] = row["torchvision per-class loop"]["median_ms"] / pyo
        out[label] = row
        per_class_same = row["same kept set as torchvision's per-class loop"]
        print(
            f"nms {label:36s} pyodlog {pyo:7.3f} ms  offset x{row['speedup vs offset trick']:.2f}  "
            f"per-class x{row['speedup vs per-class loop']:.2f}  same set: offset "
            f"{row['same kept set as torchvision']} per-class {per_class_same} "
            f"cpu {row['same as pyodlog on the CPU']}",
            flush=True,
        )
    return out


# -- 2. fused post-processing ---------------------------------------------------------------------


def _postprocess_family(inputs, profile_to: Path | None = None) -> dict:
    from pyodlog.ops import postprocess_detections

    torchvision_post, activate_decode, image_index, net, orig, kwargs = inputs(DEVICE)
    with torch.inference_mode():
        scores, boxes = activate_decode()
        got = postprocess_detections(scores, boxes, image_index, net, orig, **kwargs)
        want = torchvision_post()
        equal = all(
            torch.equal(got.boxes[b, : int(got.counts[b])], w["boxes"])
            and torch.equal(got.scores[b, : int(got.counts[b])], w["scores"])
            for b, w in enumerate(want)
        )
        row = {
            "equal to torchvision": equal,
            "torchvision": _timed(torchvision_post, reps=30),
            "pyodlog op": _timed(
                lambda: postprocess_detections(scores, boxes, image_index, net, orig, **kwargs),
                reps=30,
            ),
            "pyodlog end-to-end (activation + decode + op)": _timed(
                lambda: postprocess_detections(
                    *activate_decode(), image_index, net, orig, **kwargs
                ),
                reps=30,
            ),
        }
        if profile_to is not None:
            _profile_table(
                lambda: postprocess_detections(scores, boxes, image_index, net, orig, **kwargs),
                profile_to,
            )
    base = row["torchvision"]["median_ms"]
    row["speedup op"] = base / row["pyodlog op"]["median_ms"]
    row["speedup end-to-end"] = (
        base / row["pyodlog end-to-end (activation + decode + op)"]["median_ms"]
    )
    return row


def section_postprocess(out_dir: Path) -> dict:
    from benchmarks.bench_postprocess import faster_rcnn_inputs, retinanet_inputs

    out = {}
    for family, inputs in (("fasterrcnn", faster_rcnn_inputs), ("retinanet", retinanet_inputs)):
        row = out[family] = _postprocess_family(inputs, out_dir / f"profile_op_{family}.txt")
        print(
            f"postprocess {family:10s} torchvision {row['torchvision']['median_ms']:7.3f} ms  "
            f"op x{row['speedup op']:.2f}  end-to-end x{row['speedup end-to-end']:.2f}  "
            f"equal {row['equal to torchvision']}",
            flush=True,
        )
    return out


# -- 3. quantisation bandwidth --------------------------------------------------------------------


def section_quantize() -> dict:
    from pyodlog.ops import quantize_uint8

    shape = (1, 16, 50, 50) if DRY else (8, 256, 200, 200)
    x = torch.randn(shape, device=DEVICE)
    n = x.numel()
    copy_dst = torch.empty_like(x)
    rows = shape[0] * shape[1]
    q = (
        torch.empty(shape, dtype=torch.uint8, device=DEVICE),
        torch.empty(rows, device=DEVICE),
        torch.empty(rows, device=DEVICE),
    )
    copy_ms = _events_ms(lambda: copy_dst.copy_(x), reps=20)
    quant_ms = _events_ms(lambda: quantize_uint8(x, q), reps=20)
    half_dst = torch.empty_like(x, dtype=torch.float16)
    half_ms = _events_ms(lambda: half_dst.copy_(x), reps=20)
    copy_gbs = n * 8 / copy_ms / 1e6  # read 4 + write 4 bytes per element
    quant_gbs = n * 5 / quant_ms / 1e6  # read 4 + write 1 (the bytes it must move)
    half_gbs = n * 6 / half_ms / 1e6
    name = _device_name()
    peak = next((v for k, v in DATASHEET_BANDWIDTH_TBS.items() if k in name), None)
    row = {
        "shape": list(shape),
        "copy_ ms": copy_ms,
        "copy_ GB/s": copy_gbs,
        "quantize_uint8 ms": quant_ms,
        "quantize_uint8 GB/s (4+1 bytes/element)": quant_gbs,
        "float16 cast GB/s": half_gbs,
        "quantize / copy_ bandwidth": quant_gbs / copy_gbs,
        "datasheet peak TB/s": peak,
        "quantize / datasheet peak": quant_gbs / (peak * 1e3) if peak else None,
    }
    print(
        f"quantize {shape}: {quant_gbs:8.1f} GB/s  copy_ {copy_gbs:8.1f} GB/s  "
        f"ratio {row['quantize / copy_ bandwidth']:.2f}  of datasheet {row['quantize / datasheet peak']}",
        flush=True,
    )
    return row


# -- models ---------------------------------------------------------------------------------------

MODELS = {
    "fasterrcnn_resnet50_fpn_v2": dict(box_score_thresh=0.005),
    "retinanet_resnet50_fpn": dict(score_thresh=0.005),
}


def _models() -> list[str]:
    """The end-to-end models: all of MODELS, or those GPU_TRUTH_MODELS names (comma-separated)."""
    wanted = os.environ.get("GPU_TRUTH_MODELS")
    return [m for m in MODELS if not wanted or m in wanted.split(",")]


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"


def _model(name: str):
    torch.manual_seed(0)
    sizes = dict(min_size=160, max_size=200) if DRY else {}
    return (
        getattr(detection, name)(weights=None, weights_backbone=None, **MODELS[name], **sizes)
        .eval()
        .to(DEVICE)
    )


def _images(batch: int = 8):
    g = torch.Generator().manual_seed(0)
    if DRY:
        return [torch.rand(3, 160, 200, generator=g) for _ in range(1)]
    return [torch.rand(3, 800, 1067, generator=g).to(DEVICE) for _ in range(batch)]


def _logger(model, folder: Path, tag: str, full: bool):
    return pyodlog.create_logger(
        model,
        "gpu",
        tag,
        sink=HDF5Store(folder / tag),
        log_embeddings=full,
        target_layers={"fpn": {"path": FPN_LEVEL, "compression": "uint8"}} if full else None,
    )


def _empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# -- 4. host syncs --------------------------------------------------------------------------------


def _syncs_of(call) -> Counter:
    seen: Counter = Counter()

    def hook(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            seen[(threading.current_thread().name, f"{filename}:{lineno}")] += 1

    cuda = DEVICE == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.inference_mode():
                call()
            _sync()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    return seen


def _host_syncs_of_model(name: str, images, folder: Path) -> dict:
    model = _model(name)
    with torch.inference_mode():
        model(images)  # warm-up: cuDNN autotuning and allocator growth
    bare = _syncs_of(lambda: model(images))
    logger = _logger(model, folder, f"syncs-{name}", full=True)
    with torch.inference_mode():
        logger(images)
    logged = _syncs_of(lambda: logger(images))
    logger.wait_for_save()
    stats = logger.stats()
    logger.close()
    main = threading.main_thread().name
    added = {
        where: count - bare.get((thread, where), 0)
        for (thread, where), count in logged.items()
        if thread == main and count > bare.get((thread, where), 0)
    }
    return {
        "bare model syncs (inference thread)": sum(c for (t, _), c in bare.items() if t == main),
        "logged call syncs (inference thread)": sum(c for (t, _), c in logged.items() if t == main),
        "added by pyodlog on the inference thread": added,
        "off the inference thread (writer/copier)": {
            f"{t} {w}": c for (t, w), c in logged.items() if t != main
        },
        "logging_errors": stats.get("logging_errors"),
    }


def section_host_syncs(folder: Path) -> dict:
    out = {}
    images = _images()
    for name in MODELS:
        out[name] = _host_syncs_of_model(name, images, folder)
        print(f"host syncs {name}: {json.dumps(out[name], indent=1)}", flush=True)
        _empty_cache()
    return out


# -- 5. copier overlap ----------------------------------------------------------------------------


def _overlap(trace: dict) -> dict:
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    copies = [e for e in events if e.get("cat") == "gpu_memcpy" and "DtoH" in e.get("name", "")]
    overlapped = 0.0
    for c in copies:
        c0, c1 = c["ts"], c["ts"] + c["dur"]
        stream = c.get("args", {}).get("stream")
        spans = sorted(
            (max(c0, k["ts"]), min(c1, k["ts"] + k["dur"]))
            for k in kernels
            if k.get("args", {}).get("stream") != stream
            and k["ts"] < c1
            and k["ts"] + k["dur"] > c0
        )
        covered, end = 0.0, c0
        for a, b in spans:
            a = max(a, end)
            if b > a:
                covered += b - a
                end = b
        overlapped += covered
    total = sum(c["dur"] for c in copies)
    return {
        "DtoH copies": len(copies),
        "DtoH copy streams": sorted({str(c.get("args", {}).get("stream")) for c in copies}),
        "kernel streams": sorted({str(k.get("args", {}).get("stream")) for k in kernels}),
        "DtoH bytes": sum(int(c.get("args", {}).get("bytes", 0)) for c in copies),
        "DtoH time us": total,
        "DtoH time overlapped with kernels on other streams us": overlapped,
        "overlapped fraction": overlapped / total if total else None,
    }


def section_copier(folder: Path, out_dir: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model = _model("fasterrcnn_resnet50_fpn_v2")
    images = _images()
    logger = _logger(model, folder, "copier", full=True)
    with torch.inference_mode():
        for _ in range(2):
            logger(images)
        _sync()
        activities = [ProfilerActivity.CPU]
        if DEVICE == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            for _ in range(3):
                logger(images)
            _sync()
    logger.wait_for_save()
    logger.close()
    raw = folder / "trace.json"
    prof.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    with gzip.open(out_dir / "copier_trace.json.gz", "wt") as f:
        json.dump(trace, f)
    row = _overlap(trace)
    print(f"copier: {json.dumps(row)}", flush=True)
    del model
    torch.cuda.empty_cache()
    return row


# -- 6. end to end --------------------------------------------------------------------------------


def section_end_to_end(folder: Path, out_dir: Path, rotations: int, compile_too: bool) -> dict:
    from benchmarks.bench_overhead import NaiveLogger
    from pyodlog.demokit.timing import paired_rotation

    out = {}
    images = _images()
    for name in _models():
        model = _model(name)
        variants = {
            "bare": model,
            "pyodlog detections+logits": _logger(model, folder, f"e2e-a-{name}", full=False),
            "pyodlog +embeddings+FPN uint8": _logger(model, folder, f"e2e-b-{name}", full=True),
            "naive synchronous h5py logger": NaiveLogger(model, folder / f"{name}.h5", FPN_LEVEL),
        }
        with torch.inference_mode():
            timed = paired_rotation(
                {k: (lambda c=c: (c(images), _sync())) for k, c in variants.items()},
                rotations,
                warmup=2,
            )
            _profile_table(
                lambda call=variants["pyodlog detections+logits"]: call(images),
                out_dir / f"profile_logged_{name}.txt",
                stacks=True,
            )
        bare = timed.median("bare")
        row = {"bare ms": bare * 1e3, "rotations": rotations}
        for key, call in variants.items():
            if key == "bare":
                continue
            r = timed.ratio(key, "bare")
            row[key] = {"median ms": timed.median(key) * 1e3, "ratio": str(r), "median": r.median}
            if hasattr(call, "wait_for_save"):
                call.wait_for_save()
                stats = call.stats()
                row[key]["stats"] = {
                    k: stats.get(k)
                    for k in ("calls_seen", "calls_logged", "dropped", "logging_errors")
                }
            call.close()
        out[name] = row
        print(f"end-to-end {name}: {json.dumps(row, default=str)}", flush=True)
        del variants, model
        _empty_cache()
    if compile_too:
        name = "fasterrcnn_resnet50_fpn_v2"
        model = _model(name)
        model.backbone = torch.compile(model.backbone)
        logger = _logger(model, folder, "e2e-compiled", full=False)
        started = time.perf_counter()
        with torch.inference_mode():
            model(images)
            logger(images)
            compile_s = time.perf_counter() - started
            timed = paired_rotation(
                {
                    "compiled bare": lambda: (model(images), _sync()),
                    "compiled + pyodlog detections+logits": lambda: (logger(images), _sync()),
                },
                rotations,
                warmup=2,
            )
        logger.wait_for_save()
        stats = logger.stats()
        logger.close()
        r = timed.ratio("compiled + pyodlog detections+logits", "compiled bare")
        out["compiled backbone " + name] = {
            "compile s": compile_s,
            "compiled bare ms": timed.median("compiled bare") * 1e3,
            "ratio": str(r),
            "median": r.median,
            "stats": {k: stats.get(k) for k in ("calls_logged", "dropped", "logging_errors")},
        }
        print(f"compiled: {json.dumps(out['compiled backbone ' + name], default=str)}", flush=True)
    return out


def main(out_dir: Path, budget: float) -> None:
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp())
    results: dict = {
        "environment": describe(),
        "device": _device_name(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "build": pyodlog.build_info(),
    }
    torch.backends.cudnn.benchmark = True

    def left() -> float:
        return budget - (time.perf_counter() - started)

    sections = [
        ("nms", section_nms, 20),
        ("postprocess", lambda: section_postprocess(out_dir), 20),
        ("quantize", section_quantize, 10),
        ("host_syncs", lambda: section_host_syncs(folder), 40),
        ("copier", lambda: section_copier(folder, out_dir), 30),
        (
            "end_to_end",
            lambda: section_end_to_end(
                folder,
                out_dir,
                2 if DRY else int(os.environ.get("GPU_TRUTH_ROTATIONS", "15")),
                compile_too=left() > 200,
            ),
            60,
        ),
    ]
    wanted = os.environ.get("GPU_TRUTH_SECTIONS")  # e.g. "postprocess,end_to_end" (default: all)
    if wanted:
        sections = [s for s in sections if s[0] in wanted.split(",")]
    for key, run, needs in sections:
        if left() < needs:
            results[key] = {"skipped": f"{left():.0f} s of the budget left, {needs} s needed"}
            continue
        t0 = time.perf_counter()
        try:
            results[key] = run()
        except Exception as exc:  # one section's failure must not cost the others' figures
            results[key] = {"error": repr(exc), "traceback": traceback.format_exc()}
            print(f"{key} FAILED: {traceback.format_exc()}", flush=True)
        results.setdefault("seconds", {})[key] = time.perf_counter() - t0
        (out_dir / "gpu_truth.json").write_text(json.dumps(results, indent=1, default=str))
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    print_header("benchmarks.gpu_truth")
    main(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 300.0)
