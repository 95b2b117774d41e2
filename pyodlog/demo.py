"""`make demo`: run a real torchvision detector on generated images through pyodlog's operators.

Random weights (no download), generated images of different sizes. The demo
shows what pyodlog's kernels do on a real model: the detector's boxes, which it
predicts on its resized network input, are scaled back to each original image
by ``torch.ops.pyodlog.scale_boxes`` and checked against torchvision's own
post-processing.
"""

from __future__ import annotations

import time

import torch
import torchvision
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

import pyodlog
from pyodlog.ops import scale_boxes


def generated_images(count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Images of assorted sizes with a few bright rectangles on noise."""
    sizes = [(240, 320), (480, 640), (360, 360), (300, 500)]
    images = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        image = torch.rand(3, h, w, generator=generator) * 0.3
        for _ in range(3):
            y0, x0 = int(torch.randint(0, h // 2, (1,), generator=generator)), int(torch.randint(0, w // 2, (1,), generator=generator))
            image[:, y0 : y0 + h // 3, x0 : x0 + w // 3] += torch.rand(3, 1, 1, generator=generator)
        images.append(image.clamp(0, 1))
    return images


def main() -> None:
    torch.manual_seed(0)
    info = pyodlog.build_info()
    print(f"pyodlog {pyodlog.__version__}: torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"CUDA kernels compiled: {info['cuda']} ({info['cuda_archs'] or 'none'}), GPU: {info['cuda_available']}")
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, box_score_thresh=0.0).eval()
    images = generated_images(8, torch.Generator().manual_seed(0))

    with torch.inference_mode():
        start = time.perf_counter()
        transformed, _ = model.transform(images)
        features = model.backbone(transformed.tensors)
        proposals, _ = model.rpn(transformed, features)
        detections, _ = model.roi_heads(features, proposals, transformed.image_sizes)
        model_seconds = time.perf_counter() - start

        # Boxes on the network input -> boxes on the original images, in one call.
        net_sizes = torch.tensor(transformed.image_sizes)
        orig_sizes = torch.tensor([img.shape[-2:] for img in images])
        boxes = torch.cat([d["boxes"] for d in detections])
        image_index = torch.cat([torch.full((len(d["boxes"]),), i) for i, d in enumerate(detections)])
        start = time.perf_counter()
        scaled = scale_boxes(boxes, net_sizes, orig_sizes, clip=False, image_index=image_index)
        op_seconds = time.perf_counter() - start

        reference = model.transform.postprocess(
            [dict(d) for d in detections], transformed.image_sizes, [tuple(s) for s in orig_sizes.tolist()]
        )
        expected = torch.cat([r["boxes"] for r in reference])
    identical = torch.equal(scaled, expected)
    print(f"fasterrcnn_mobilenet_v3_large_320_fpn on {len(images)} generated images: "
          f"{len(boxes)} detections in {model_seconds * 1e3:.0f} ms")
    for i, (image, det) in enumerate(zip(images, detections)):
        print(f"  image {i}: {tuple(image.shape[-2:])} -> network {tuple(transformed.image_sizes[i])}, "
              f"{len(det['boxes'])} detections")
    print(f"scale_boxes: {len(boxes)} boxes to original sizes in {op_seconds * 1e6:.0f} us; "
          f"identical to torchvision's postprocess: {identical}")
    if not identical:
        raise SystemExit("scale_boxes disagrees with torchvision: this is a bug, please report it")


if __name__ == "__main__":
    main()
