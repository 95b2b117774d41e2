"""The registry of logger subclasses and the factory that picks one for a model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from pyodlog.monitoring.detection_logger import ObjectDetectionTorchLogger, unwrap_model

__all__ = ["UnsupportedModelError", "create_logger", "register_logger", "registered_loggers"]

_REGISTRY: list[tuple[int, int, type[ObjectDetectionTorchLogger]]] = []


class UnsupportedModelError(ValueError):
    """No registered logger handles the model."""


def register_logger(
    cls: type[ObjectDetectionTorchLogger] | None = None, *, priority: int = 0
) -> Callable:
    """Class decorator: makes a logger subclass available to :func:`create_logger`.

    Loggers are asked in priority order (highest first, then registration order)
    whether they ``detect`` a model. Registering the same class twice is an error.
    """

    def add(logger_cls: type[ObjectDetectionTorchLogger]) -> type[ObjectDetectionTorchLogger]:
        if not (
            isinstance(logger_cls, type) and issubclass(logger_cls, ObjectDetectionTorchLogger)
        ):
            raise TypeError(
                f"register_logger takes ObjectDetectionTorchLogger subclasses, got {logger_cls!r}"
            )
        if any(
            existing is logger_cls
            or (
                existing.__qualname__ == logger_cls.__qualname__
                and existing.__module__ == logger_cls.__module__
            )
            for _, _, existing in _REGISTRY
        ):
            raise ValueError(f"{logger_cls.__qualname__} is registered already")
        _REGISTRY.append((priority, len(_REGISTRY), logger_cls))
        return logger_cls

    return add(cls) if cls is not None else add


def registered_loggers() -> list[type[ObjectDetectionTorchLogger]]:
    """The registered logger classes, in the order they are asked."""
    return [cls for _, _, cls in sorted(_REGISTRY, key=lambda e: (-e[0], e[1]))]


def create_logger(model: nn.Module, *args: Any, **kwargs: Any) -> ObjectDetectionTorchLogger:
    """The logger for ``model``: the first registered subclass whose ``detect`` accepts it.

    Takes the same arguments as :class:`~pyodlog.monitoring.ObjectDetectionTorchLogger`.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        UnsupportedModelError: no registered subclass handles the model; the
            message lists the supported families and how to add one.
    """
    families = "\n".join(
        f"  - {cls.family or cls.__name__} ({cls.__name__})" for cls in registered_loggers()
    )
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"create_logger expects a torch.nn.Module detector (the model object, e.g. "
            f"torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=...).eval()), got "
            f"{type(model).__name__} {model!r:.80}. Supported families:\n{families}"
        )
    core = unwrap_model(model)
    for cls in registered_loggers():
        if cls.detect(core):
            return cls(model, *args, **kwargs)
    raise UnsupportedModelError(
        f"no pyodlog logger handles {type(core).__name__}. Supported families:\n{families}\n"
        "To log another detector, subclass pyodlog.ObjectDetectionTorchLogger and register it with "
        "@pyodlog.register_logger: see 'Writing a logger for your own model' in the README."
    )
