"""Loading the compiled extension: build_info, and clear errors when it is missing or stale."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import numpy as np
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


# A process in which `pyodlog._C` cannot be imported: a reader's machine without a compiler.
_WITHOUT_EXTENSION = """
import importlib.abc, sys
class _NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "pyodlog._C":
            raise ImportError("pyodlog._C is absent in this test")
sys.meta_path.insert(0, _NoExtension())
"""


def _run_without_extension(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTENSION + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_without_the_extension_results_are_still_readable_and_ops_say_how_to_build(tmp_path):
    from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

    store = pyodlog.HDF5Store(tmp_path)
    logger = TinyDetectorLogger(
        TinyDetector().eval(),
        "tiny",
        "v1",
        sink=store,
        target_layers={"b": {"path": "backbone.0", "compression": "uint8"}},
    )
    with torch.no_grad():
        logger([torch.rand(3, 64, 80)], input_ids=["only"])
    zip_path = logger.export(str(tmp_path / "out.zip"))
    logger.close()
    expected = pyodlog.open_result(zip_path)
    np.save(tmp_path / "feature.npy", expected.feature(0, "b").numpy())
    np.save(tmp_path / "boxes.npy", expected.detections["boxes"])

    done = _run_without_extension(
        """
        import sys, numpy as np, torch
        import pyodlog, pyodlog._extension
        assert not pyodlog._extension.has_ops()
        result = pyodlog.open_result(sys.argv[1])
        assert list(result.images["input_id"]) == ["only"]
        assert np.array_equal(result.detections["boxes"], np.load(sys.argv[2] + "/boxes.npy"))
        feature = result.feature(0, "b").numpy()
        assert np.array_equal(feature, np.load(sys.argv[2] + "/feature.npy"), equal_nan=True)
        try:
            pyodlog.ops.batched_nms(torch.zeros(1, 4), torch.ones(1), torch.zeros(1, dtype=torch.long), 0.5)
        except pyodlog.ExtensionNotBuiltError as error:
            print("REFUSED:", error)
        """,
        str(zip_path),
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert "REFUSED:" in done.stdout and "make build" in done.stdout


def test_the_pyodlog_command_starts_without_torch():
    done = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-c",
            "import sys; from pyodlog.cli import main; sys.argv = ['pyodlog', '--help']; main()",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for command in ("info", "demo", "serve", "list", "export", "keygen"):
        assert command in done.stdout
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
    assert "pyodlog.cli" in imported and "torch" not in imported


def test_dequantize_reference_is_bit_identical_to_the_operator():
    from pyodlog.ops.compression import dequantize_uint8_reference

    x = torch.randn(4, 3, 9, 7) * 100
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    x[1, 2] = 5.0  # a constant row
    x[2, 1] = float("nan")  # a row with no finite value
    q, scale, offset = pyodlog.ops.quantize_uint8(x)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        op = pyodlog.ops.dequantize_uint8(q, scale, offset, dtype)
        reference = dequantize_uint8_reference(q, scale, offset, dtype)
        assert op.dtype == reference.dtype == dtype
        assert torch.equal(op.view(-1).isnan(), reference.view(-1).isnan())
        assert torch.equal(op.nan_to_num(0.0), reference.nan_to_num(0.0))
