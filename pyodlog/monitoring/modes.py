"""Execution modes a logger meets: ``torch.compile`` wrappers, CUDA-graph modes it refuses, and
the clear error for a compiled model that ran without the logger's hooks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["captured", "compile_backends", "refuse_cuda_graphs"]


def compile_backends(model: nn.Module) -> list[Any]:
    """The backends of the ``torch.compile`` wrappers around ``model`` (outermost first)."""
    backends: list[Any] = []
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            continue
        ctx = getattr(model, "dynamo_ctx", None)
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return backends
        backend: Any = getattr(ctx, "callback", None)
        while hasattr(backend, "_torchdynamo_orig_backend"):
            backend = backend._torchdynamo_orig_backend
        backends.append(backend)
        model = inner


def _cuda_graph_mode(backend: Any) -> str | None:
    """How a compile backend uses CUDA graphs (a description), or None."""
    name = getattr(backend, "compiler_name", None) or getattr(backend, "__name__", "")
    if name == "cudagraphs":
        return 'torch.compile(backend="cudagraphs")'
    config = getattr(backend, "config", None) or {}
    if name == "inductor" and config.get("triton.cudagraphs"):
        mode = "max-autotune" if config.get("max_autotune") else "reduce-overhead"
        return f'torch.compile(mode="{mode}") (inductor with triton.cudagraphs)'
    return None


def refuse_cuda_graphs(model: nn.Module) -> None:
    """Refuses a model compiled to replay CUDA graphs (``mode="reduce-overhead"``, ``"max-autotune"``).

    A CUDA graph replay writes its outputs into the same static buffers every
    call, and the logger's hooks run between the graph's pieces and read the
    head's tensors after the model returned: refused at ``create_logger``
    rather than logging values a later replay may have overwritten.

    Raises:
        ValueError: naming the mode and what to use instead.
    """
    for backend in compile_backends(model):
        mode = _cuda_graph_mode(backend)
        if mode is not None:
            raise ValueError(
                f"pyodlog does not log a model compiled with {mode}: CUDA graph replays reuse their "
                "output buffers, so the head's tensors the logger reads could be overwritten. Compile "
                'with the default mode or mode="max-autotune-no-cudagraphs" (or pass the uncompiled '
                "model) and create the logger on that"
            )


def captured(state: Mapping[str, Any], key: str, model: nn.Module) -> Any:
    """What a hook of the logger captured in this call (``state[key]``).

    Raises:
        RuntimeError: the hook did not run. For a ``torch.compile`` model this
            means its graph was compiled before the logger registered its
            hooks (dynamo does not guard on hooks,
            ``torch._dynamo.config.skip_nnmodule_hook_guards``): the message
            says how to fix it.
    """
    try:
        return state[key]
    except KeyError:
        if compile_backends(model):
            raise RuntimeError(
                "the torch.compile model ran without pyodlog's hooks: it was compiled (called) before "
                "create_logger registered them, and torch.compile does not notice hooks added later. "
                "Create the logger before the compiled model's first call, or call "
                "torch._dynamo.reset() once after create_logger (the next call recompiles with the hooks)"
            ) from None
        raise RuntimeError(
            f"the logger's hook for {key!r} did not run during the call: the model's forward skipped the "
            "module it hooks (a modified model needs its own logger subclass)"
        ) from None
