"""Per-detection uncertainty (entropy, margin, energy) of logit vectors, on their own device."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pyodlog._extension import assert_has_ops, register_fake

__all__ = ["SIGMOID", "SOFTMAX", "Uncertainty", "detection_uncertainty"]

#: ``kind`` of a head whose class scores are a softmax over all logits (background included).
SOFTMAX = 0
#: ``kind`` of a head whose class scores are independent sigmoids (one per class).
SIGMOID = 1


class Uncertainty(NamedTuple):
    """float32 tensors of the logits' shape without the class axis."""

    entropy: Tensor
    margin: Tensor
    energy: Tensor


def detection_uncertainty(logits: Tensor, kind: int) -> Uncertainty:
    """Entropy, margin and energy of each logit vector (the last axis), in one kernel.

    * softmax heads (``kind=SOFTMAX``: Faster R-CNN, SSD, DETR): ``p = softmax(z)`` over every
      column, background included; ``entropy = -sum p log p``.
    * per-class sigmoid heads (``kind=SIGMOID``: RetinaNet, FCOS, YOLOv8+, Deformable DETR,
      RT-DETR): ``p_c = sigmoid(z_c)``; the class distribution is ``q = p / sum(p)`` and
      ``entropy = -sum q log q``.
    * ``margin``: top-1 minus top-2 of ``p`` (one class: top-1), in [0, 1]; ``energy``:
      ``-logsumexp(z)`` (both kinds; lower is more confident).

    Natural logarithms; computed in float64, returned as float32. A NaN logit makes all three
    NaN; all logits ``-inf``: entropy NaN, energy ``+inf`` (margin NaN for softmax, 0 for
    sigmoid heads), as plain PyTorch computes them.

    Args:
        logits: ``Tensor[..., C]`` floating.
        kind: :data:`SOFTMAX` or :data:`SIGMOID`.

    Returns:
        :class:`Uncertainty`, each ``Tensor[...]`` float32 on ``logits``' device.
    """
    assert_has_ops()
    return Uncertainty(*torch.ops.pyodlog.detection_uncertainty.default(logits, int(kind)))


@register_fake("pyodlog::detection_uncertainty")
def _detection_uncertainty_fake(logits, kind):
    torch._check(logits.dim() >= 1, lambda: "logits must have a class axis")
    torch._check(kind in (SOFTMAX, SIGMOID), lambda: "kind must be 0 (softmax) or 1 (sigmoid)")
    shape = logits.shape[:-1]
    return tuple(logits.new_empty(shape, dtype=torch.float32) for _ in range(3))
