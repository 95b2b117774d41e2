"""`make demo`: log a real torchvision detector on generated images.

Random weights (no download), generated images of different sizes, the
embedded default sink (in memory). Prints what was recorded per call and
checks that it equals what the model returned.
"""

from __future__ import annotations

import time

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


def same_up_to_ties(recorded: pyodlog.DetectionOutput, returned: dict) -> bool:
    """Equal detections, except which of several candidates with exactly the same
    score fills the last places (random weights give many tied scores)."""
    if not torch.equal(recorded.scores, returned["scores"]):
        return False
    if len(recorded) == 0:
        return True
    cut = recorded.scores[-1]

    def rows(boxes, scores, labels):
        return {(s, lab, tuple(b)) for b, s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()) if s > cut}

    return rows(recorded.boxes, recorded.scores, recorded.labels) == rows(returned["boxes"], returned["scores"], returned["labels"])


def main() -> None:
    torch.manual_seed(0)
    info = pyodlog.build_info()
    print(f"pyodlog {pyodlog.__version__}: torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"CUDA kernels compiled: {info['cuda']} ({info['cuda_archs'] or 'none'}), GPU: {info['cuda_available']}")
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).eval()
    images = generated_images(24, torch.Generator().manual_seed(0))
    logger = pyodlog.create_logger(
        model, model_name="demo-detector", version_name="v1", score_thresh=0.01,
        target_layers={"fpn": {"path": "backbone.fpn", "compression": "uint8"}},
        additional_fields=[{"name": "camera", "dtype": "str", "default": "cam-0"}],
    )
    print(f"{type(logger).__name__} for {type(model).__name__}: result {logger.result_name!r}, epoch {logger.n_epoch}")
    bare = logged = 0.0
    identical = True
    with logger, torch.inference_mode():
        for start in range(0, len(images), 8):
            batch = images[start : start + 8]
            t0 = time.perf_counter()
            want = model(batch)
            t1 = time.perf_counter()
            got = logger(batch, input_ids=[f"image-{start + i:03d}" for i in range(len(batch))], camera="cam-1")
            t2 = time.perf_counter()
            bare, logged = bare + t1 - t0, logged + t2 - t1
            identical &= all(torch.equal(g["boxes"], w["boxes"]) and torch.equal(g["scores"], w["scores"]) for g, w in zip(got, want))
        records = logger.sink.records(logger.model_name, logger.version_name, logger.result_name)
        n_images = sum(len(r) for r in records)
        per_image = [d for r in records for d in r.detections.unbind()]
        matches = all(same_up_to_ties(d, w) for d, w in zip(records[-1].detections.unbind(), got))
        feature_bytes = sum(f.nbytes for r in records for f in r.features.values())
        print(f"{len(records)} calls, {n_images} images, {sum(len(d) for d in per_image)} detections recorded")
        example = per_image[0]
        print(f"  image {records[0].input_ids[0]!r} {example.image_size}: boxes {tuple(example.boxes.shape)}, "
              f"logits {tuple(example.logits.shape)}, embeddings {tuple(example.embeddings.shape)}, "
              f"candidates {example.candidate_index[:5].tolist()}...")
        print(f"  layer 'fpn': {len(records[0].features)} tensors per call, {feature_bytes / 2**20:.1f} MiB compressed in all")
        print(f"  fields: {records[0].fields}")
        print(f"time: bare model {bare * 1e3:.0f} ms, with pyodlog {logged * 1e3:.0f} ms (x{logged / bare:.2f})")
        print(f"outputs unchanged by logging: {identical}; recorded detections equal the model's (up to tied scores): {matches}")
    if not (identical and matches):
        raise SystemExit("the logger changed or misrecorded the model's output: this is a bug, please report it")


if __name__ == "__main__":
    main()
