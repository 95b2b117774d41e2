"""Comparing what a logged call returned with the bare model's output, the last record, and
weights that make such comparisons strict."""

from __future__ import annotations

import torch
from torch import nn


def assert_outputs_equal(got, want) -> None:
    """Two torchvision-style outputs (a list of per-image dicts of tensors) are identical."""
    assert type(got) is type(want) and len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in w:
            assert torch.equal(g[key], w[key]), key


def last_record(logger):
    """The last record an ``InMemorySink`` logger stored."""
    return logger.sink.records(logger.model_name, logger.version_name, logger.result_name)[-1]


def distinct_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """He-normal weights: torchvision's initialisation ties many scores exactly; distinct ones make
    'the logged detections equal the returned ones' a strict comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(
                    torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5
                )
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model
