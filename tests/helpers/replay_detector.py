"""A detector that returns the detections it is told to, and its logger: results with known answers.

The analysis tests (evaluation, slices, interop) need logged detections chosen by the test (a
perfect prediction, one shifted box). ``ReplayDetector`` returns, for each call, the next
``{"boxes", "scores", "labels"}`` list queued with :meth:`ReplayDetector.queue`; its logger logs
them through the real pipeline (HDF5 store, segments, reader) with one-hot logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import pyodlog
from pyodlog import HDF5Store


class ReplayDetector(nn.Module):
    """Returns the queued outputs, one list of per-image dicts per call."""

    def __init__(self, n_class: int = 4) -> None:
        super().__init__()
        self.n_class = n_class
        self.pending: list[list[dict[str, torch.Tensor]]] = []
        self.anchor = nn.Parameter(torch.zeros(1))  # a module with a parameter, like a detector

    def queue(self, outputs: list[dict[str, torch.Tensor]]) -> None:
        self.pending.append(outputs)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = self.pending.pop(0)
        assert len(outputs) == len(images)
        return outputs


class ReplayLogger(pyodlog.ObjectDetectionTorchLogger):
    """Logs what a :class:`ReplayDetector` returned (logits: the score at the label, else 0)."""

    family = "ReplayDetector (tests)"

    @staticmethod
    def detect(model: nn.Module) -> bool:
        return isinstance(model, ReplayDetector)

    def _get_n_class(self, model: nn.Module) -> int:
        return int(model.n_class)

    def _register_model_hooks(self, model: nn.Module) -> None:
        pass

    def _parse_model_output(self, model_output, img_sizes):
        out = []
        for o, size in zip(model_output, img_sizes):
            n = len(o["scores"])
            logits = torch.zeros(n, self.n_class)
            logits[torch.arange(n), o["labels"]] = o["scores"]
            out.append(
                pyodlog.DetectionOutput(
                    o["boxes"].float(),
                    o["scores"].float(),
                    o["labels"].long(),
                    logits,
                    torch.arange(n),
                    size,
                    embeddings=torch.stack([o["scores"].float()] * 3, 1)
                    if n
                    else torch.zeros(0, 3),
                )
            )
        return out


def detections(boxes, scores, labels) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.as_tensor(scores, dtype=torch.float32),
        "labels": torch.as_tensor(labels, dtype=torch.int64),
    }


def targets(boxes, labels) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.as_tensor(labels, dtype=torch.int64),
    }


def log_calls(
    root: Path,
    calls: list[dict],
    n_class: int = 4,
    class_names: list[str] | None = None,
    version: str = "v1",
    rotate_every: int = 0,
) -> Path:
    """Logs each call ``{"outputs": [...], "targets": [...] or None, "input_ids", "dataset_type",
    "fields"?}`` through a ReplayLogger into an HDF5 store under ``root``; returns the result folder.
    ``rotate_every``: close the segment after so many calls (several segment files)."""
    model = ReplayDetector(n_class).eval()
    logger = ReplayLogger(
        model,
        "replay",
        version,
        sink=HDF5Store(root),
        class_names=class_names,
        additional_fields=[{"name": "camera", "dtype": "str", "default": "none"}],
    )
    for number, call in enumerate(calls, 1):
        model.queue(call["outputs"])
        images = [torch.zeros(3, 480, 640) for _ in call["outputs"]]
        kwargs = {"targets": call["targets"]} if call.get("targets") is not None else {}
        logger(
            images,
            input_ids=call["input_ids"],
            dataset_type=call.get("dataset_type", "val"),
            **kwargs,
            **call.get("fields", {}),
        )
        if rotate_every and number % rotate_every == 0:
            logger.sink.rotate()
    logger.close()
    assert logger.sink.directory is not None
    return Path(logger.sink.directory)
