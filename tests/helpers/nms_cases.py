"""Input generators shared by the NMS tests and benchmarks."""

from __future__ import annotations

import torch


def uniform_boxes(n: int, n_classes: int, seed: int, size: float = 1000.0):
    """Random boxes spread uniformly over a size x size image."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size * 0.2 + 1.0
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.rand(n, generator=g)
    idxs = torch.randint(0, n_classes, (n,), generator=g)
    return boxes, scores, idxs


def clustered_boxes(n: int, n_classes: int, seed: int, per_object: int = 20, size: float = 1000.0):
    """Many jittered candidates around each object: what a detector's head produces."""
    g = torch.Generator().manual_seed(seed)
    n_objects = max(1, n // per_object)
    centre = torch.rand(n_objects, 2, generator=g) * size
    extent = torch.rand(n_objects, 2, generator=g) * size * 0.15 + 8.0
    label = torch.randint(0, n_classes, (n_objects,), generator=g)
    which = torch.randint(0, n_objects, (n,), generator=g)
    jitter = 1.0 + 0.15 * torch.randn(n, 4, generator=g)
    c, e = centre[which], extent[which]
    boxes = torch.cat([c - e * jitter[:, :2] / 2, c + e * jitter[:, 2:] / 2], dim=1)
    scores = torch.rand(n, generator=g)
    # Mostly the object's class, sometimes a confused one.
    confused = torch.rand(n, generator=g) < 0.2
    idxs = torch.where(confused, torch.randint(0, n_classes, (n,), generator=g), label[which])
    return boxes, scores, idxs
