"""`make demo`: a trained detector logged over a ``val`` set and a shifted ``deploying`` set.

The detector is the small Faster R-CNN of :mod:`pyodlog.demokit.detector`, trained
on generated scenes of circles, squares, triangles and stars (its weights ship
with pyodlog and are checked by SHA-256; missing, they are retrained in under two
minutes and cached). The demo logs, into local HDF5 (``PYODLOG_HOME`` or
``./pyodlog_data``):

- a ``val`` set of scenes from the training distribution, with their ground truth
  (``targets=``);
- a ``deploying`` set of shifted scenes (smaller objects, unseen colours and
  clutter, a busier texture), without ground truth, as in production;

with class names, near-misses and image thumbnails when this pyodlog supports
them. Then ``wait_for_save``, ``export``, a summary read back from the ZIP and
checked against what the model returned, the detector's precision and recall on
both sets, a fair measurement of the logging overhead (warm-up, paired rotation
with alternating order, median and IQR of the paired ratios), and the commands
that view and report the result.

Usage: ``python -m pyodlog.demo [--val N] [--deploying N] [--timing-seconds S]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torchvision

import pyodlog
from pyodlog.demokit.detector import match_counts
from pyodlog.demokit.scenes import CLASS_NAMES, Scene, make_scenes
from pyodlog.demokit.timing import paired_rotation
from pyodlog.demokit.train import load_detector

#: What the demo logs beside the detections: class names, near-misses (what the model almost
#: said) and a thumbnail of each image (so that `pyodlog view` shows the scenes).
DEMO_LOGGER_OPTIONS: dict[str, Any] = {
    "class_names": CLASS_NAMES,
    "near_miss": 10,
    "log_images": {"max_side": 160, "quality": 85},
}


def same_detections(recorded: pyodlog.DetectionOutput, returned: dict) -> bool:
    """The logged detections are exactly the returned ones: boxes, scores, labels, in order."""
    return (
        torch.equal(recorded.boxes, returned["boxes"])
        and torch.equal(recorded.scores, returned["scores"])
        and torch.equal(recorded.labels, returned["labels"])
    )


def _batches(scenes: list[Scene], size: int) -> list[list[Scene]]:
    return [scenes[i : i + size] for i in range(0, len(scenes), size)]


def _quality(outputs: list[dict[str, torch.Tensor]], scenes: list[Scene]) -> str:
    tp, n_det, n_gt = match_counts(outputs, [s.target for s in scenes])
    mean_score = (
        float(torch.cat([o["scores"] for o in outputs]).mean()) if n_det or outputs else 0.0
    )
    return (
        f"precision {tp / max(n_det, 1):.2f}, recall {tp / max(n_gt, 1):.2f} "
        f"(score >= 0.5, IoU >= 0.5; {n_gt} objects), mean detection score {mean_score:.2f}"
    )


def measure_overhead(
    model: torch.nn.Module,
    logger_kwargs: dict[str, Any],
    images: list[torch.Tensor],
    time_budget_s: float,
) -> str:
    """The logged call's time over the bare model's, paired rotation on ``images``, as a sentence.

    ``logger_kwargs``: all the options of the demo's logger. A second logger with them writes into a temporary folder (deleted
    afterwards), so the timed calls do not land in the demo's result.
    """
    with tempfile.TemporaryDirectory() as folder:
        from pyodlog.io import HDF5Store

        logger = pyodlog.create_logger(model, **logger_kwargs, sink=HDF5Store(Path(folder)))
        with logger, torch.inference_mode():
            started = time.perf_counter()
            timed = paired_rotation(
                {"bare": lambda: model(images), "logged": lambda: logger(images)},
                rotations=400,
                warmup=3,
                min_rotations=5,
                time_budget_s=time_budget_s,
            )
            seconds = time.perf_counter() - started
            logger.wait_for_save()
    bare, logged = timed.median("bare"), timed.median("logged")
    return (
        f"overhead (warm-up {timed.warmup} rotations, then {timed.rotations} paired rotations of "
        f"bare/logged in alternating order on the same {len(images)} images, {seconds:.0f} s, "
        f"{torch.get_num_threads()} CPU thread(s)): bare "
        f"{bare * 1e3:.1f} ms, logged {logged * 1e3:.1f} ms per call; logged/bare {timed.ratio('logged', 'bare')}"
    )


def main(argv: list[str] | None = None) -> None:
    """Runs the demo; ``argv`` as on the command line (none: the defaults)."""
    parser = argparse.ArgumentParser(
        prog="python -m pyodlog.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--val", type=int, default=64, help="val scenes to log (default 64)")
    parser.add_argument(
        "--deploying", type=int, default=64, help="deploying scenes to log (default 64)"
    )
    parser.add_argument("--batch", type=int, default=8, help="images per call (default 8)")
    parser.add_argument(
        "--timing-seconds",
        type=float,
        default=20.0,
        help="time spent in timed calls of the overhead measurement (default 20; 0 skips it)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: stable timings on a shared machine; 0: torch's default)",
    )
    parser.add_argument(
        "--export-dir",
        default=os.environ.get("PYODLOG_EXPORT_DIR", "exports"),
        help="where the ZIP goes (default $PYODLOG_EXPORT_DIR or ./exports)",
    )
    args = parser.parse_args([] if argv is None else argv)
    torch.manual_seed(0)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = pyodlog.build_info()
    print(
        f"pyodlog {pyodlog.__version__}: torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"CUDA kernels compiled: {info['cuda']} ({info['cuda_archs'] or 'none'}), GPU: {info['cuda_available']}, "
        f"CPU threads: {torch.get_num_threads()}"
    )
    model, weights = load_detector()
    print(
        f"detector: {type(model).__name__} with a tiny backbone, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, classes "
        f"{CLASS_NAMES[1:]}, weights {weights} (SHA-256 verified)"
    )
    sets = {
        "val": make_scenes(args.val, "val"),
        "deploying": make_scenes(args.deploying, "deploying"),
    }
    logger_kwargs: dict[str, Any] = {
        "model_name": "demo-shapes",
        "version_name": "v1",
        # a fresh result per run, so that view and report show this run's sets only
        "result_name": "demo-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ"),
        "score_thresh": 0.2,
        "target_layers": {"features": {"path": "backbone", "compression": "uint8"}},
        "additional_fields": [{"name": "camera", "dtype": "str", "default": "lab-cam"}],
    }
    logger = pyodlog.create_logger(model, **logger_kwargs, **DEMO_LOGGER_OPTIONS)
    print(
        f"{type(logger).__name__} for {type(model).__name__}: result {logger.result_name!r}, epoch "
        f"{logger.n_epoch}, data in {getattr(logger.sink, 'directory', None)}; also logged: "
        f"{', '.join(sorted(DEMO_LOGGER_OPTIONS))}, ground truth of the val set (targets=)"
    )
    identical = True
    outputs: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in sets}
    last_output: list[dict[str, torch.Tensor]] = []
    with logger, torch.inference_mode():
        for dataset_type, scenes in sets.items():
            for number, batch in enumerate(_batches(scenes, args.batch)):
                images = [s.image for s in batch]
                want = model(images)
                got = logger(
                    images,
                    targets=[s.target for s in batch] if dataset_type == "val" else None,
                    input_ids=[
                        f"{dataset_type}-{number * args.batch + i:03d}" for i in range(len(batch))
                    ],
                    dataset_type=dataset_type,
                    camera="lab-cam" if dataset_type == "val" else f"field-cam-{number % 3}",
                )
                identical &= all(
                    torch.equal(g["boxes"], w["boxes"]) and torch.equal(g["scores"], w["scores"])
                    for g, w in zip(got, want)
                )
                outputs[dataset_type] += got
                last_output = got
        t0 = time.perf_counter()
        logger.wait_for_save()
        t1 = time.perf_counter()
        zip_path = logger.export(args.export_dir)
        assert zip_path is not None  # None only on ranks other than 0 of torch.distributed
        t2 = time.perf_counter()
        stats = logger.stats()
    result = pyodlog.open_result(zip_path)
    n = len(result)
    counts = result.manifest["counts"]
    kinds = [str(v) for v in result.images["dataset_type"]]
    print(
        f"logged {n} images in {stats['submitted']} calls ("
        + ", ".join(f"{kinds.count(name)} {name}" for name in sets)
        + f"): {counts['detections']} detections, {counts['features']} layer tensors, "
        f"{stats['dropped']} dropped; ground truth logged with val: "
        f"{int(result.images['gt_count'].sum()) if 'gt_count' in result.images else 0} objects, "
        f"near-misses: {len(result.near_misses.get('scores', ()))}"
    )
    for name, scenes in sets.items():
        print(f"detector on {name}: {_quality(outputs[name], scenes)}")
    print(
        "  (the deploying scenes are shifted: smaller objects, unseen colours and clutter, a busier "
        "texture; their ground truth is known here only because they are generated)"
    )
    print(f"wait_for_save {1e3 * (t1 - t0):.0f} ms, export {1e3 * (t2 - t1):.0f} ms")
    print(
        f"export: {zip_path} ({Path(zip_path).stat().st_size / 2**20:.1f} MiB), members {list(result.manifest['members'])}"
    )
    first = result.image_detections(0)
    print(
        f"read back image {result.images['input_id'][0]!r} {tuple(int(v) for v in result.images['image_size'][0])} camera "
        f"{result.images['camera'][0]!r}: boxes {tuple(first.boxes.shape)}, logits {tuple(first.logits.shape)}, "
        f"embeddings {None if first.embeddings is None else tuple(first.embeddings.shape)}"
    )
    matches = all(
        same_detections(result.image_detections(n - len(last_output) + i), w)
        for i, w in enumerate(last_output)
    )
    print(
        f"outputs unchanged by logging: {identical}; the ZIP's detections equal the model's: {matches}"
    )
    if not (identical and matches):
        raise SystemExit(
            "the logger changed or misrecorded the model's output: this is a bug, please report it"
        )
    if args.timing_seconds > 0:
        timing_images = [s.image for s in sets["val"][: args.batch]]
        print(
            measure_overhead(
                model, {**logger_kwargs, **DEMO_LOGGER_OPTIONS}, timing_images, args.timing_seconds
            )
        )
    print("next:")
    print(f"  pyodlog view {zip_path}")
    print(
        f"  pyodlog report {zip_path} --where dataset_type=deploying --against {zip_path} "
        "--against-where dataset_type=val --out demo-report.html"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
