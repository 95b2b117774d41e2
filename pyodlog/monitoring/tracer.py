"""ObjectDetectionTorchTracer: forward hooks on a PyTorch model.

Two kinds of hooks: those on ``target_layers`` (the user's), which compress
the layer's output at hook time, and those a model family registers to capture
what it needs for per-detection logits. Hooks act only while the logger is
inside a call, never change what a module returns, and are all removed by
:meth:`ObjectDetectionTorchTracer._remove_hooks`.

Concurrency: everything a hook captures belongs to one call. Each call opens a
:class:`CallCapture` and makes it current through a :class:`contextvars.ContextVar`
of the tracer (one per tracer) for as long as the call runs; hooks write into
the current call's capture and nowhere else. Module hooks run synchronously in
the thread (and context) that called the model, so threads calling one logger
at once never see each other's tensors, and no lock is held while the model
runs. The capture is dropped when the call ends, also when the model raises.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from pyodlog.monitoring.validation import LayerSpec
from pyodlog.ops.compression import CompressedFeature, compress_features

__all__ = ["CallCapture", "ObjectDetectionTorchTracer"]


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


def detached(output: Any) -> Any:
    """``output`` with every tensor detached (same storage, no autograd graph), containers rebuilt.

    What ``get_hooked_features`` keeps must not hold a call's graph alive when grad is enabled;
    without a graph (``no_grad``, ``inference_mode``) the output is kept as it is, the very objects.
    """
    if not any(t.requires_grad for _, t in flatten_output(output, "")):
        return output
    return _detach_all(output)


def _detach_all(output: Any) -> Any:
    if isinstance(output, Tensor):
        return output.detach()
    try:
        if isinstance(output, dict):
            return type(output)((key, _detach_all(value)) for key, value in output.items())
        if isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple
            return type(output)(*(_detach_all(value) for value in output))
        if isinstance(output, (list, tuple)):
            return type(output)(_detach_all(value) for value in output)
    except TypeError:  # a container type that cannot be rebuilt this way: keep it as it is
        return output
    return output


class CallCapture:
    """What the hooks captured during one logged call (private to that call).

    Attributes:
        state: what the family hooks put there (``self._state`` inside the call).
        raw: per ``target_layers`` alias, every output of the layer in this call.
        captured: compressed features by (leaf name, index of the layer's run).
        capturing: whether hooks record (True while the model runs).
        error: the first exception a hook raised in this call (the hook stops, the model goes on;
            :meth:`ObjectDetectionTorchTracer._end_capture` raises it after the model answered).
        sampled_out: sampling left this call out before the model ran: only what the always-on
            aggregates need is captured (no ``target_layers`` feature is compressed).
        output_only: besides, its aggregates are those of the model's output alone
            (``Sampling(sampled_out_aggregates="output")``): a family may skip the work its parse
            would read.
    """

    __slots__ = ("captured", "capturing", "error", "output_only", "raw", "sampled_out", "state")

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.raw: dict[str, list[Any]] = {}
        self.captured: dict[tuple[str, int], CompressedFeature] = {}
        self.capturing = True
        self.error: Exception | None = None
        self.sampled_out = False
        self.output_only = False

    def fail(self, error: Exception) -> None:
        """A hook failed: keep the first error and stop capturing (this call will not be logged)."""
        if self.error is None:
            self.error = error
        self.capturing = False


class ObjectDetectionTorchTracer:
    """The PyTorch hook part of a logger: ``target_layers`` and family hooks."""

    def _init_tracer(self, model: nn.Module, layers: list[LayerSpec]) -> None:
        self._hooks: list[RemovableHandle] = []
        self._layer_specs = layers
        self._calls_made = False
        # The capture of the call running in the current context; None outside a call.
        self._current_call: contextvars.ContextVar[CallCapture | None] = contextvars.ContextVar(
            f"pyodlog_call_{id(self):x}", default=None
        )
        # Per thread: the target_layers outputs of that thread's last successful call.
        self._thread_latest = threading.local()
        for spec in layers:
            self._add_forward_hook(model.get_submodule(spec.path), self._layer_hook(spec))

    @property
    def _state(self) -> dict[str, Any]:
        """What the family hooks capture for the call running in this thread (context).

        Inside a logged call (its hooks and ``_parse_model_output``) this is that
        call's own dict: calls running at once in other threads have their own.
        Outside a call it is a new empty dict each time (nothing is kept).
        """
        capture = self._capture_now()
        return {} if capture is None else capture.state

    @_state.setter
    def _state(self, value: dict[str, Any]) -> None:
        capture = self._capture_now()
        if capture is not None:
            capture.state = value
        elif value:
            raise RuntimeError(
                "self._state holds one call's captures: set it only inside a logged call "
                "(in a hook or in _parse_model_output)"
            )

    def _capture_now(self) -> CallCapture | None:
        """The capture of the call running in this context (None outside a call, or before ``_init_tracer``)."""
        current = getattr(self, "_current_call", None)
        return None if current is None else current.get()

    def _add_forward_hook(self, module: nn.Module, hook: Callable) -> None:
        """Registers a forward hook that runs only inside a logged call (of the calling context)."""
        current = self._current_call

        def guarded(mod, inputs, output):
            capture = current.get()
            if capture is not None and capture.capturing:
                try:
                    hook(mod, inputs, output)
                except Exception as error:  # never into the model's forward: the call goes on
                    capture.fail(error)

        self._hooks.append(module.register_forward_hook(guarded))

    def _add_forward_pre_hook(self, module: nn.Module, hook: Callable) -> None:
        """Registers a forward pre-hook that runs only inside a logged call (of the calling context)."""
        current = self._current_call

        def guarded(mod, inputs):
            capture = current.get()
            if capture is not None and capture.capturing:
                try:
                    hook(mod, inputs)
                except Exception as error:  # never into the model's forward: the call goes on
                    capture.fail(error)

        self._hooks.append(module.register_forward_pre_hook(guarded))

    def _layer_hook(self, spec: LayerSpec) -> Callable:
        def hook(module, inputs, output):
            capture = self._current_call.get()
            # A module called several times in one forward (a head shared by the
            # FPN levels) keeps every output: alias/0, alias/1, ...
            calls = capture.raw.setdefault(spec.alias, [])
            calls.append(detached(output))
            if capture.sampled_out:  # no row will be written: nothing to compress
                return
            with torch.no_grad():
                for name, tensor in flatten_output(output, spec.alias):
                    if tensor.dtype.is_floating_point:
                        # Compressing copies: an in-place op after this layer
                        # cannot change what is recorded.
                        capture.captured[(name, len(calls) - 1)] = compress_features(
                            tensor.detach(), spec.compression, spec.pool_to
                        )

        return hook

    def _sampled_out_now(self) -> bool:
        """Whether the call running in this context was sampled out before its model ran
        (its parse then skips what only written rows need: near-misses)."""
        capture = self._capture_now()
        return capture is not None and capture.sampled_out

    @contextmanager
    def _call_capture(
        self, sampled_out: bool = False, output_only: bool = False
    ) -> Iterator[CallCapture]:
        """Makes a new :class:`CallCapture` current for the ``with`` block, and drops it after.

        The block runs the model and then reads the capture (``_end_capture``,
        ``_parse_model_output``); the capture is dropped also when it raises.
        ``sampled_out``: sampling left the call out before the model runs (``output_only``: with
        aggregates of its output alone).
        """
        capture = CallCapture()
        capture.sampled_out = sampled_out
        capture.output_only = output_only
        token = self._current_call.set(capture)
        self._calls_made = True
        try:
            yield capture
        finally:
            capture.capturing = False
            self._current_call.reset(token)

    def _end_capture(self, capture: CallCapture) -> dict[str, CompressedFeature]:
        """Stops capturing; returns this call's compressed features by name.

        Also makes this call's ``target_layers`` outputs the calling thread's
        latest (what :meth:`get_hooked_features` returns in this thread).
        """
        capture.capturing = False
        if capture.error is not None:
            raise capture.error
        latest = self._latest_of_thread()
        for alias, calls in capture.raw.items():
            latest[alias] = calls[0] if len(calls) == 1 else list(calls)
        features: dict[str, CompressedFeature] = {}
        for (name, call_index), feature in capture.captured.items():
            alias = name.split("/", 1)[0]
            if len(capture.raw[alias]) > 1:
                rest = name[len(alias) :]
                name = f"{alias}/{call_index}{rest}"
            features[name] = feature
        capture.captured = {}
        capture.raw = {}
        return features

    def _latest_of_thread(self) -> dict[str, Any]:
        latest = getattr(self._thread_latest, "raw", None)
        if latest is None:
            latest = self._thread_latest.raw = {}
        return latest

    def _thread_captures(self) -> dict[str, Any]:
        """A copy of the calling thread's latest ``target_layers`` outputs (handed over by ``acall``)."""
        return dict(self._latest_of_thread())

    def _adopt_thread_captures(self, captures: dict[str, Any]) -> None:
        """Makes ``captures`` (from :meth:`_thread_captures` in another thread) this thread's latest."""
        self._latest_of_thread().update(captures)

    def get_hooked_features(self, layer_name: str) -> Any:
        """The output captured for a ``target_layers`` alias in the calling thread's latest call.

        Each thread sees its own calls only: with one logger shared by many
        threads, a thread reads what its own last call captured, never another
        thread's. After ``await logger.acall(...)`` the awaiting thread sees what
        that call captured. A call whose model raised leaves the thread's latest
        as it was. Each thread keeps its latest outputs alive until its next call.

        Args:
            layer_name: the alias given in ``target_layers``.

        Returns:
            What the layer returned (a tensor, or the dict/list/tuple it
            returned; a list of them if the layer ran several times in the call).

        Raises:
            KeyError: nothing was captured for that alias in this thread
                (unknown alias, or no call yet); the message lists the known aliases.
        """
        latest = self._latest_of_thread()
        if layer_name not in latest:
            known = [s.alias for s in self._layer_specs]
            if layer_name not in known:
                state = "it is not a target_layers alias"
            elif self._calls_made:
                state = (
                    "no logged call of this thread has captured it: it is captured per thread (call the logger "
                    "in this thread first), and a container such as nn.ModuleList whose children the model calls "
                    "directly never runs itself (hook one of its children)"
                )
            else:
                state = "no call has captured it yet"
            raise KeyError(
                f"no activation captured for {layer_name!r} ({state}); known aliases: {known}"
            )
        return latest[layer_name]

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
