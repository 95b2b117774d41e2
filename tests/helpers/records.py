"""Synthetic call records and a real HDF5 store for the storage, sampling and aggregate tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import pyodlog
from pyodlog.io.store import HDF5Store
from pyodlog.io.writer import WriterConfig
from pyodlog.structures import CallRecord, DetectionBatch


def synthetic_record(
    seed: int,
    n_images: int = 2,
    max_det: int = 6,
    n_class: int = 7,
    emb_dim: int | None = 32,
    dataset_type: str = "deploying",
    n_epoch: int | None = 0,
    input_ids: list[str] | None = None,
    logit_scale: float = 3.0,
) -> CallRecord:
    """A call's record with random detections (counts from 0 to ``max_det`` per image)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_det + 1, (n_images,), generator=g)
    xy = torch.rand(n_images, max_det, 2, generator=g) * 200
    wh = torch.rand(n_images, max_det, 2, generator=g) * 100 + 1
    batch = DetectionBatch(
        torch.cat([xy, xy + wh], -1),
        torch.rand(n_images, max_det, generator=g),
        torch.randint(0, n_class, (n_images, max_det), generator=g),
        torch.randn(n_images, max_det, n_class, generator=g) * logit_scale,
        torch.arange(max_det).repeat(n_images, 1),
        counts,
        [(300, 400)] * n_images,
        None if emb_dim is None else torch.randn(n_images, max_det, emb_dim, generator=g),
    )
    ids = input_ids or [f"call{seed}-img{i}" for i in range(n_images)]
    return CallRecord(ids, dataset_type, n_epoch, float(seed), [(300, 400)] * n_images, batch)


def schema(n_class: int = 7, storage: Any = None) -> dict[str, Any]:
    """A result schema; ``storage`` None: the compact default, ``"float32"``: exact."""
    out: dict[str, Any] = {
        "n_class": n_class,
        "additional_fields": [],
        "target_layers": {},
        "family": "synthetic",
    }
    spec = pyodlog.RecordStorage() if storage is None else storage
    if spec == "float32":
        spec = pyodlog.RecordStorage.full()
    if not spec.is_full:
        out["storage"] = spec.to_dict()
    return out


def open_store(
    root: Path,
    n_class: int = 7,
    storage: Any = None,
    result: str = "r",
    rank: int = 0,
    config: WriterConfig | None = None,
) -> HDF5Store:
    """A real HDF5Store writing ``m/v/<result>`` under ``root``."""
    store = HDF5Store(root, rank=rank, config=config or WriterConfig(flush_interval=0.01))
    store.open_result("m", "v", result, schema(n_class, storage), False)
    store.activate()
    return store


def valid_rows(records: list[CallRecord], name: str) -> torch.Tensor:
    """A column of every detection of ``records``, in order (what the store writes as rows)."""
    out = []
    for r in records:
        det = r.detections
        mask = torch.arange(det.boxes.shape[1])[None, :] < det.counts[:, None]
        out.append(getattr(det, name)[mask])
    return torch.cat(out)
