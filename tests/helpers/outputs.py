"""Comparing what a logged call returned with the bare model's output, and the last record."""

from __future__ import annotations

import torch


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
