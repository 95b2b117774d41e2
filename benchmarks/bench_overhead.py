"""End-to-end overhead of logging: what users will judge pyodlog by.

In one run, on the same model and inputs, each call timed as the caller sees it:

1. bare inference: ``model(images)`` under ``inference_mode`` (the baseline);
2. pyodlog logging detections + logits only;
3. pyodlog logging detections + logits + embeddings + one FPN level (uint8);
4. a naive logger as a user would write it: ``.cpu().numpy()`` of the outputs
   and of the same FPN level, appended to HDF5 with h5py, synchronously in the call.

pyodlog's writer thread runs during the timing (it shares the machine's cores
with the model, as in production); its ``wait_for_save`` is not in the call's
time (it is not on the inference path). Random weights with a 0.01 score
threshold, so every image has its full quota of detections (100 for Faster
R-CNN, 300 for RetinaNet). RetinaNet runs at ``min_size=512`` (its default
800 px takes 20 s a batch of 8 on the 2-core machine).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torchvision.models import detection

import pyodlog
from pyodlog.io import HDF5Store

MODELS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": dict(box_score_thresh=0.01),
    "retinanet_resnet50_fpn": dict(score_thresh=0.01, min_size=512, max_size=683),
}
#: Measured by the paired and profiling scripts only (not in the pytest-benchmark grid).
PAIRED_ONLY = {
    "fcos_resnet50_fpn": dict(score_thresh=0.01, min_size=512, max_size=683),
}
FPN_LEVEL = "backbone.fpn.layer_blocks.0"  # the highest-resolution FPN output
VARIANTS = [
    "bare",
    "pyodlog detections+logits",
    "pyodlog +embeddings+FPN uint8",
    "naive h5py logger",
]
# Rounds per (model, batch): as many as the 2-core machine allows in a few minutes.
ROUNDS = {
    ("fasterrcnn_mobilenet_v3_large_320_fpn", 1): 15,
    ("fasterrcnn_mobilenet_v3_large_320_fpn", 8): 5,
    ("retinanet_resnet50_fpn", 1): 5,
    ("retinanet_resnet50_fpn", 8): 2,
}


class NaiveLogger:
    """What a user writes by hand: copy everything to numpy and append it to HDF5 in the call."""

    def __init__(self, model, path: Path, layer: str) -> None:
        self.model = model
        self.file = h5py.File(path, "w")
        self.feature = None
        model.get_submodule(layer).register_forward_hook(
            lambda m, i, out: setattr(self, "feature", out)
        )

    def _append(self, name: str, value: np.ndarray) -> None:
        if name not in self.file:
            self.file.create_dataset(
                name,
                shape=(0, *value.shape[1:]),
                maxshape=(None, *value.shape[1:]),
                dtype=value.dtype,
                chunks=True,
            )
        ds = self.file[name]
        ds.resize(ds.shape[0] + len(value), axis=0)
        ds[-len(value) :] = value

    def __call__(self, images):
        out = self.model(images)
        for o in out:
            self._append("boxes", o["boxes"].cpu().numpy())
            self._append("scores", o["scores"].cpu().numpy())
            self._append("labels", o["labels"].cpu().numpy())
        self._append("fpn", self.feature.cpu().numpy())
        return out

    def close(self) -> None:
        self.file.close()


def _make(name: str):
    torch.manual_seed(0)
    settings = MODELS.get(name, PAIRED_ONLY.get(name))
    if settings is None:
        raise ValueError(f"unknown model {name!r}: one of {sorted({**MODELS, **PAIRED_ONLY})}")
    return getattr(detection, name)(weights=None, weights_backbone=None, **settings).eval()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_logging_overhead(benchmark, model_name, batch, variant):
    model = _make(model_name)
    g = torch.Generator().manual_seed(batch)
    images = [torch.rand(3, 480, 640, generator=g) for _ in range(batch)]
    folder = Path(tempfile.mkdtemp())
    logger = call = None
    if variant == "bare":
        call = model
    elif variant.startswith("pyodlog"):
        full = "embeddings" in variant
        logger = pyodlog.create_logger(
            model,
            "bench",
            "v1",
            sink=HDF5Store(folder),
            log_embeddings=full,
            target_layers={"fpn": {"path": FPN_LEVEL, "compression": "uint8"}} if full else None,
        )
        call = logger
    else:
        logger = call = NaiveLogger(model, folder / "naive.h5", FPN_LEVEL)

    def run():
        with torch.inference_mode():
            call(images)

    benchmark.group = f"overhead {model_name} batch {batch}"
    benchmark.extra_info["role"] = "baseline" if variant == "bare" else variant
    benchmark.extra_info["images"] = batch
    try:
        benchmark.pedantic(run, rounds=ROUNDS[model_name, batch], warmup_rounds=1)
        if variant.startswith("pyodlog"):
            logger.wait_for_save()
            assert logger.sink.stats()["written"] == ROUNDS[model_name, batch] + 1
    finally:
        if logger is not None:
            logger.close()
        shutil.rmtree(folder, ignore_errors=True)
