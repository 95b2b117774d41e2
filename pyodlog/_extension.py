"""Loads the compiled extension ``pyodlog._C`` and says clearly what to do when it cannot."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = [
    "ExtensionNotBuiltError",
    "assert_has_ops",
    "build_info",
    "has_ops",
    "load_extension",
    "register_fake",
]

_REBUILD_HINT = (
    "Rebuild it against the installed torch: `make build` in a checkout, or "
    "`pip install --no-build-isolation -e .`."
)


class ExtensionNotBuiltError(ImportError):
    """The compiled operators of pyodlog are missing or were built for another torch."""


def _same_release(built: str, running: str) -> bool:
    # "2.14.1+cu130" and "2.14.1" are the same ABI; compare the release part only.
    return built.split("+")[0] == running.split("+")[0]


def load_extension() -> Any:
    """Imports ``pyodlog._C`` (which registers ``torch.ops.pyodlog.*``) and checks its torch.

    Raises:
        ExtensionNotBuiltError: the extension is missing, does not load, or was
            compiled against a different torch release than the one running.
    """
    try:
        module = importlib.import_module("pyodlog._C")
    except ImportError as exc:
        raise ExtensionNotBuiltError(
            f"pyodlog's compiled extension pyodlog._C could not be loaded ({exc}). "
            f"It is missing or was built for another torch than {torch.__version__}. {_REBUILD_HINT}"
        ) from exc
    built_for = module.build_info()["torch"]
    if not _same_release(built_for, torch.__version__):
        raise ExtensionNotBuiltError(
            f"pyodlog._C was built for torch {built_for} but torch {torch.__version__} is running. "
            f"{_REBUILD_HINT}"
        )
    return module


# Loaded once at import; a failure is kept and raised on first use of an operator (as torchvision's
# ``_assert_has_ops``), so that ``import pyodlog`` and reading results work without a compiler.
_C: Any | None = None
_LOAD_ERROR: ExtensionNotBuiltError | None = None
try:
    _C = load_extension()
except ExtensionNotBuiltError as _error:
    _LOAD_ERROR = _error


def has_ops() -> bool:
    """Whether the compiled operators ``torch.ops.pyodlog.*`` are available."""
    return _C is not None


def assert_has_ops() -> None:
    """Raises :class:`ExtensionNotBuiltError` (saying how to build) unless the operators are loaded."""
    if _C is None:
        raise ExtensionNotBuiltError(str(_LOAD_ERROR)) from _LOAD_ERROR


F = TypeVar("F", bound=Callable[..., Any])


def register_fake(qualname: str) -> Callable[[F], F]:
    """``torch.library.register_fake`` when the operator exists; a no-op when the extension is missing."""

    def decorate(fake: F) -> F:
        if _C is not None:
            torch.library.register_fake(qualname)(fake)
        return fake

    return decorate


def build_info() -> dict[str, Any]:
    """How the compiled extension was built.

    Returns:
        A dict with ``cuda`` (bool: CUDA kernels compiled), ``cuda_archs`` (the
        ``TORCH_CUDA_ARCH_LIST`` they were compiled for, e.g. ``"8.0;9.0+PTX"``),
        ``cuda_runtime`` (CUDART_VERSION compiled against, or None), ``torch``
        (the torch version built against) and ``cuda_available`` (whether a GPU
        can run them now).

    Raises:
        ExtensionNotBuiltError: the extension is missing or was built for another torch.
    """
    assert_has_ops()
    assert _C is not None
    info = dict(_C.build_info())
    info["cuda_available"] = bool(info["cuda"]) and torch.cuda.is_available()
    return info
