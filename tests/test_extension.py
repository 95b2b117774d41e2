"""Loading the compiled extension: build_info, and clear errors when it is missing or stale."""

from __future__ import annotations

import importlib

import pytest
import torch

import pyodlog
from pyodlog import _extension


def test_build_info_reports_how_the_extension_was_built():
    info = pyodlog.build_info()
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert (
            "8.0" in info["cuda_archs"]
            and "9.0" in info["cuda_archs"]
            and info["cuda_runtime"] >= 11000
        )
    assert info["cuda_available"] == (info["cuda"] and torch.cuda.is_available())
    for op in (
        "scale_boxes",
        "batched_nms",
        "postprocess_detections",
        "quantize_uint8_out",
        "dequantize_uint8",
    ):
        assert hasattr(torch.ops.pyodlog, op)


def test_a_missing_extension_says_how_to_build_it(monkeypatch):
    real_import = importlib.import_module

    def missing(name, *args):
        if name == "pyodlog._C":
            raise ImportError("No module named 'pyodlog._C'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(
        pyodlog.ExtensionNotBuiltError, match=r"(?s)could not be loaded.*make build"
    ):
        _extension.load_extension()


def test_an_extension_built_for_another_torch_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    with pytest.raises(
        pyodlog.ExtensionNotBuiltError,
        match=r"built for torch .* but torch 9\.9\.9 is running.*make build",
    ):
        _extension.load_extension()
