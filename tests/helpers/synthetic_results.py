"""Synthetic results written through the real HDF5 store, at any scale, without a model.

The analysis tests and benchmarks need results whose distributions they choose (a class mix, a score
shift, embeddings from another distribution): :func:`write_synthetic_result` draws detections and
submits them to an :class:`~pyodlog.io.HDF5Store` as the logger would (``CallRecord`` batches), then
waits until they are on disk. Read them back with ``pyodlog.open_result(path)``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pyodlog.io import HDF5Store, WriterConfig
from pyodlog.structures import CallRecord, DetectionBatch

IMAGE_SIZE = (480, 640)


def write_synthetic_result(
    root: str | Path,
    result_name: str,
    n_images: int,
    *,
    detections_per_image: int = 20,
    n_class: int = 5,
    class_probs: list[float] | None = None,
    score_shift: float = 0.0,
    box_scale: float = 1.0,
    embed_dim: int = 16,
    embed_shift: float = 0.0,
    dataset_type: str = "deploying",
    seed: int = 0,
    batch_images: int = 64,
    model_name: str = "synthetic",
    version_name: str = "v1",
    class_names: list[str] | None = None,
) -> Path:
    """Writes ``n_images`` images of synthetic detections; returns the result folder.

    Per image, the number of detections is Poisson(``detections_per_image``)
    (capped at twice that). Labels follow ``class_probs`` (default uniform).
    Scores are Beta(2, 5) moved up by ``score_shift`` (clipped to [0, 1]);
    box sides are log-normal around 60 px times ``box_scale``; logits put 3 on
    the label plus N(0, 1) noise; embeddings are a class-dependent mean plus
    N(0, 1) noise, every coordinate moved by ``embed_shift``. The same seed
    draws the same records.
    """
    rng = np.random.default_rng(seed)
    probs = np.full(n_class, 1.0 / n_class) if class_probs is None else np.asarray(class_probs)
    probs = probs / probs.sum()
    centres = np.random.default_rng(12345).normal(0, 1.0, (n_class, embed_dim)).astype(np.float32)
    store = HDF5Store(root, config=WriterConfig(flush_interval=0.2, backpressure="block"))
    schema: dict = {"n_class": n_class}
    if class_names is not None:
        schema["class_names"] = list(class_names)
    store.open_result(model_name, version_name, result_name, schema, False)
    store.activate()
    cap = 2 * detections_per_image
    h, w = IMAGE_SIZE
    try:
        for start in range(0, n_images, batch_images):
            b = min(batch_images, n_images - start)
            counts = np.minimum(rng.poisson(detections_per_image, b), cap)
            d = max(int(counts.max()), 1)
            labels = rng.choice(n_class, size=(b, d), p=probs)
            scores = np.clip(rng.beta(2, 5, (b, d)) + score_shift, 0, 1).astype(np.float32)
            side_w = 60 * box_scale * np.exp(rng.normal(0, 0.5, (b, d)))
            side_h = 60 * box_scale * np.exp(rng.normal(0, 0.5, (b, d)))
            x1 = rng.uniform(0, w - 1, (b, d))
            y1 = rng.uniform(0, h - 1, (b, d))
            boxes = np.stack(
                [x1, y1, np.minimum(x1 + side_w, w), np.minimum(y1 + side_h, h)], -1
            ).astype(np.float32)
            logits = rng.normal(0, 1, (b, d, n_class)).astype(np.float32)
            np.put_along_axis(
                logits, labels[..., None], np.take_along_axis(logits, labels[..., None], -1) + 3, -1
            )
            embeddings = (
                centres[labels] + rng.normal(0, 1, (b, d, embed_dim)) + embed_shift
            ).astype(np.float32)
            pad = np.arange(d)[None, :] >= counts[:, None]
            labels[pad] = -1
            detections = DetectionBatch(
                torch.from_numpy(boxes),
                torch.from_numpy(scores),
                torch.from_numpy(labels.astype(np.int64)),
                torch.from_numpy(logits),
                torch.from_numpy(np.where(pad, -1, np.arange(d)[None, :]).astype(np.int64)),
                torch.from_numpy(counts.astype(np.int64)),
                [IMAGE_SIZE] * b,
                torch.from_numpy(embeddings),
            )
            record = CallRecord(
                [f"{result_name}/s{seed}/{start + j:07d}.jpg" for j in range(b)],
                dataset_type,
                0,
                time.time(),
                [IMAGE_SIZE] * b,
                detections,
            )
            record.model_name, record.version_name, record.result_name = (
                model_name,
                version_name,
                result_name,
            )
            store.submit(record)
        store.wait_for_save()
        directory = store.directory
    finally:
        store.close()
    assert directory is not None
    return directory
