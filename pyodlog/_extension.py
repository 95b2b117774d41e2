"""Loads the compiled extension ``pyodlog._C`` and says clearly what to do when it cannot."""

from __future__ import annotations

import importlib
from typing import Any

import torch

__all__ = ["ExtensionNotBuiltError", "build_info", "load_extension"]

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


_C = load_extension()


def build_info() -> dict[str, Any]:
    """How the compiled extension was built.

    Returns:
        A dict with ``cuda`` (bool: CUDA kernels compiled), ``cuda_archs`` (the
        ``TORCH_CUDA_ARCH_LIST`` they were compiled for, e.g. ``"8.0;9.0+PTX"``),
        ``cuda_runtime`` (CUDART_VERSION compiled against, or None), ``torch``
        (the torch version built against) and ``cuda_available`` (whether a GPU
        can run them now).
    """
    info = dict(_C.build_info())
    info["cuda_available"] = bool(info["cuda"]) and torch.cuda.is_available()
    return info
