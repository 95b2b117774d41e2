"""Overhead of logging a Hugging Face DETR: bare call vs logged call, measured paired.

A small DETR built from configuration with random weights (ResNet of four
basic stages 32-256 channels, d_model 128, 2 encoder + 2 decoder layers, 100
queries, 91 classes), so nothing is downloaded. ``score_thresh=0.0`` keeps all
100 queries of every image: the most a call can log. One call of each variant
in rotation, so the machine's drift cancels in the ratios.

Usage: .venv/bin/python -m benchmarks.bench_family_detr BATCH ROTATIONS [SIZE]
  e.g. .venv/bin/python -m benchmarks.bench_family_detr 1 30 256

``make bench`` also collects the two pytest-benchmark tests below.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import pyodlog
from benchmarks.environment import print_header
from pyodlog.io import HDF5Store


def make_detr() -> torch.nn.Module:
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(
        embedding_size=32,
        hidden_sizes=[32, 64, 128, 256],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage4"],
    )
    config = DetrConfig(
        use_pretrained_backbone=False,
        use_timm_backbone=False,
        backbone_config=backbone,
        d_model=128,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=512,
        decoder_ffn_dim=512,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        num_queries=100,
        num_labels=91,
    )
    torch.manual_seed(0)
    return DetrForObjectDetection(config).eval()


def pixel_values(batch: int, size: int) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def main(batch: int, rotations: int, size: int = 256) -> None:
    model = make_detr()
    x = pixel_values(batch, size)
    sizes = [(480, 640)] * batch
    folder = Path(tempfile.mkdtemp())
    logged = pyodlog.create_logger(
        model, "b", "v1", sink=HDF5Store(folder / "a"), score_thresh=0.0, log_embeddings=False
    )
    with_embeddings = pyodlog.create_logger(
        model, "b", "v2", sink=HDF5Store(folder / "b"), score_thresh=0.0
    )
    variants = {
        "bare": lambda: model(pixel_values=x),
        "pyodlog detections+logits": lambda: logged(x, img_sizes=sizes),
        "pyodlog +embeddings": lambda: with_embeddings(x, img_sizes=sizes),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for call in variants.values():
            call()
        for _ in range(rotations):
            for key, call in variants.items():
                start = time.perf_counter()
                call()
                times[key].append(time.perf_counter() - start)
    bare = statistics.median(times["bare"])
    print(f"DETR small config, batch {batch}, {size}x{size} px, {rotations} rotations")
    for key, t in times.items():
        median = statistics.median(t)
        print(
            f"{key:30s} median {median * 1e3:9.2f} ms  {median / bare:.3f}x bare  "
            f"overhead {(median - bare) * 1e3:7.2f} ms"
        )
    logged.close()
    with_embeddings.close()


def test_detr_bare(benchmark):
    model, x = make_detr(), pixel_values(1, 256)
    benchmark.group = "DETR small config, batch 1, 256 px"
    with torch.inference_mode():
        benchmark(lambda: model(pixel_values=x))


def test_detr_logged(benchmark, tmp_path):
    model, x = make_detr(), pixel_values(1, 256)
    benchmark.group = "DETR small config, batch 1, 256 px"
    with (
        torch.inference_mode(),
        pyodlog.create_logger(
            model, "b", "v1", sink=HDF5Store(tmp_path / "s"), score_thresh=0.0
        ) as logger,
    ):
        benchmark(lambda: logger(x))


if __name__ == "__main__":
    print_header("benchmarks.bench_family_detr")
    main(int(sys.argv[1]), int(sys.argv[2]), *(int(v) for v in sys.argv[3:4]))
