"""`make demo`: the full logging job on the embedded default.

A real torchvision detector (random weights, no download) over a few dozen
generated images through the logger, into local HDF5 (``PYODLOG_HOME`` or
``./pyodlog_data``); then ``wait_for_save``, ``export`` and a summary read back
from the ZIP, checked against what the model returned.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torchvision
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

import pyodlog


def generated_images(count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Images of assorted sizes with a few bright rectangles on noise."""
    sizes = [(240, 320), (480, 640), (360, 360), (300, 500)]
    images = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        image = torch.rand(3, h, w, generator=generator) * 0.3
        for _ in range(3):
            y0 = int(torch.randint(0, h // 2, (1,), generator=generator))
            x0 = int(torch.randint(0, w // 2, (1,), generator=generator))
            image[:, y0 : y0 + h // 3, x0 : x0 + w // 3] += torch.rand(3, 1, 1, generator=generator)
        images.append(image.clamp(0, 1))
    return images


def same_detections(recorded: pyodlog.DetectionOutput, returned: dict) -> bool:
    """The logged detections are exactly the returned ones: boxes, scores, labels, in order."""
    return (
        torch.equal(recorded.boxes, returned["boxes"])
        and torch.equal(recorded.scores, returned["scores"])
        and torch.equal(recorded.labels, returned["labels"])
    )


def main() -> None:
    torch.manual_seed(0)
    info = pyodlog.build_info()
    print(
        f"pyodlog {pyodlog.__version__}: torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"CUDA kernels compiled: {info['cuda']} ({info['cuda_archs'] or 'none'}), GPU: {info['cuda_available']}"
    )
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).eval()
    images = generated_images(32, torch.Generator().manual_seed(0))
    logger = pyodlog.create_logger(
        model,
        model_name="demo-detector",
        version_name="v1",
        score_thresh=0.01,
        target_layers={"fpn": {"path": "backbone.fpn", "compression": "uint8"}},
        additional_fields=[{"name": "camera", "dtype": "str", "default": "cam-0"}],
    )
    print(
        f"{type(logger).__name__} for {type(model).__name__}: result {logger.result_name!r}, epoch {logger.n_epoch}, "
        f"data in {getattr(logger.sink, 'directory', None)}"
    )
    bare = logged = 0.0
    identical = True
    last_output: list[dict[str, torch.Tensor]] = []
    with logger, torch.inference_mode():
        for start in range(0, len(images), 8):
            batch = images[start : start + 8]
            t0 = time.perf_counter()
            want = model(batch)
            t1 = time.perf_counter()
            got = logger(
                batch,
                input_ids=[f"image-{start + i:03d}" for i in range(len(batch))],
                camera=f"cam-{start // 8}",
            )
            t2 = time.perf_counter()
            bare, logged = bare + t1 - t0, logged + t2 - t1
            identical &= all(
                torch.equal(g["boxes"], w["boxes"]) and torch.equal(g["scores"], w["scores"])
                for g, w in zip(got, want)
            )
            last_output = got
        t0 = time.perf_counter()
        logger.wait_for_save()
        t1 = time.perf_counter()
        zip_path = logger.export(os.environ.get("PYODLOG_EXPORT_DIR", "exports"))
        assert zip_path is not None  # None only on ranks other than 0 of torch.distributed
        t2 = time.perf_counter()
        stats = logger.stats()
    result = pyodlog.open_result(zip_path)
    n = len(result)
    counts = result.manifest["counts"]
    print(
        f"logged {n} images in {stats['submitted']} calls: {counts['detections']} detections, "
        f"{counts['features']} layer tensors, {stats['dropped']} dropped"
    )
    print(
        f"time: bare model {bare * 1e3:.0f} ms, with pyodlog {logged * 1e3:.0f} ms (x{logged / bare:.2f}); "
        f"wait_for_save {1e3 * (t1 - t0):.0f} ms, export {1e3 * (t2 - t1):.0f} ms"
    )
    print(
        f"export: {zip_path} ({Path(zip_path).stat().st_size / 2**20:.1f} MiB), members {list(result.manifest['members'])}"
    )
    first = result.image_detections(0)
    print(
        f"read back image {result.images['input_id'][0]!r} {tuple(int(v) for v in result.images['image_size'][0])} camera "
        f"{result.images['camera'][0]!r}: boxes {tuple(first.boxes.shape)}, logits {tuple(first.logits.shape)}, "
        f"embeddings {None if first.embeddings is None else tuple(first.embeddings.shape)}"
    )
    print(
        f"layers: {result.feature_names()}; 'fpn/0' of image 0 restores to {tuple(result.feature(0, 'fpn/0').shape)}"
    )
    matches = all(
        same_detections(d, w)
        for d, w in (
            (result.image_detections(n - len(last_output) + i), w)
            for i, w in enumerate(last_output)
        )
    )
    print(
        f"outputs unchanged by logging: {identical}; the ZIP's detections equal the model's: {matches}"
    )
    if not (identical and matches):
        raise SystemExit(
            "the logger changed or misrecorded the model's output: this is a bug, please report it"
        )


if __name__ == "__main__":
    main()
