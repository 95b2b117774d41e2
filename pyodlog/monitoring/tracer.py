"""ObjectDetectionTorchTracer: forward hooks on a PyTorch model.

Two kinds of hooks: those on ``target_layers`` (the user's), which compress
the layer's output at hook time, and those a model family registers to capture
what it needs for per-detection logits. Hooks act only while the logger is
inside a call, never change what a module returns, and are all removed by
:meth:`ObjectDetectionTorchTracer._remove_hooks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from pyodlog.monitoring.validation import LayerSpec
from pyodlog.ops.compression import CompressedFeature, compress_features

__all__ = ["ObjectDetectionTorchTracer"]


def flatten_output(output: Any, name: str) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) leaves of a tensor, or a dict/list/tuple of them (``name/key``)."""
    if isinstance(output, Tensor):
        yield name, output
    elif isinstance(output, dict):
        for key, value in output.items():
            yield from flatten_output(value, f"{name}/{key}")
    elif isinstance(output, (list, tuple)):
        for i, value in enumerate(output):
            yield from flatten_output(value, f"{name}/{i}")


class ObjectDetectionTorchTracer:
    """The PyTorch hook part of a logger: ``target_layers`` and family hooks."""

    def _init_tracer(self, model: nn.Module, layers: list[LayerSpec]) -> None:
        self._hooks: list[RemovableHandle] = []
        self._layer_specs = layers
        self._capturing = False
        self._calls_made = False
        self._latest_raw: dict[str, Any] = {}
        self._call_raw: dict[str, list[Any]] = {}
        self._captured: dict[str, CompressedFeature] = {}
        # What the family hooks capture in one call; cleared after each call.
        self._state: dict[str, Any] = {}
        for spec in layers:
            self._add_forward_hook(model.get_submodule(spec.path), self._layer_hook(spec))

    def _add_forward_hook(self, module: nn.Module, hook: Callable) -> None:
        """Registers a forward hook that runs only inside a logged call."""

        def guarded(mod, inputs, output):
            if self._capturing:
                hook(mod, inputs, output)

        self._hooks.append(module.register_forward_hook(guarded))

    def _add_forward_pre_hook(self, module: nn.Module, hook: Callable) -> None:
        """Registers a forward pre-hook that runs only inside a logged call."""

        def guarded(mod, inputs):
            if self._capturing:
                hook(mod, inputs)

        self._hooks.append(module.register_forward_pre_hook(guarded))

    def _layer_hook(self, spec: LayerSpec) -> Callable:
        def hook(module, inputs, output):
            # A module called several times in one forward (a head shared by the
            # FPN levels) keeps every output: alias/0, alias/1, ...
            calls = self._call_raw.setdefault(spec.alias, [])
            calls.append(output)
            with torch.no_grad():
                for name, tensor in flatten_output(output, spec.alias):
                    if tensor.dtype.is_floating_point:
                        # Compressing copies: an in-place op after this layer
                        # cannot change what is recorded.
                        self._captured[(name, len(calls) - 1)] = compress_features(
                            tensor.detach(), spec.compression, spec.pool_to
                        )

        return hook

    def _begin_capture(self) -> None:
        self._call_raw = {}
        self._captured = {}
        self._state = {}
        self._capturing = True
        self._calls_made = True

    def _end_capture(self) -> dict[str, CompressedFeature]:
        """Stops capturing; returns this call's compressed features by name."""
        self._capturing = False
        for alias, calls in self._call_raw.items():
            self._latest_raw[alias] = calls[0] if len(calls) == 1 else list(calls)
        features: dict[str, CompressedFeature] = {}
        for (name, call_index), feature in self._captured.items():
            alias = name.split("/", 1)[0]
            if len(self._call_raw[alias]) > 1:
                rest = name[len(alias) :]
                name = f"{alias}/{call_index}{rest}"
            features[name] = feature
        self._captured = {}
        self._call_raw = {}
        return features

    def get_hooked_features(self, layer_name: str) -> Any:
        """The output captured for a ``target_layers`` alias in the latest call.

        Args:
            layer_name: the alias given in ``target_layers``.

        Returns:
            What the layer returned (a tensor, or the dict/list/tuple it
            returned; a list of them if the layer ran several times in the call).

        Raises:
            KeyError: nothing was captured for that alias (unknown alias, or no
                call yet); the message lists the known aliases.
        """
        if layer_name not in self._latest_raw:
            known = [s.alias for s in self._layer_specs]
            if layer_name not in known:
                state = "it is not a target_layers alias"
            elif self._calls_made:
                state = (
                    "its module did not run in the logged calls: a container such as nn.ModuleList whose "
                    "children the model calls directly never runs itself; hook one of its children"
                )
            else:
                state = "no call has captured it yet"
            raise KeyError(
                f"no activation captured for {layer_name!r} ({state}); known aliases: {known}"
            )
        return self._latest_raw[layer_name]

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._capturing = False
        self._state = {}
