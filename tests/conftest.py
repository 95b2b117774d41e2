"""Shared test fixtures: the devices every operator test runs on, a private data root, a collector."""

from __future__ import annotations

import pytest
import torch

import pyodlog
from tests.helpers.collector_process import CollectorProcess, write_keys

CUDA = torch.cuda.is_available() and pyodlog.build_info()["cuda"]

# Every operator test is parametrised over these; the CUDA case is skipped only
# when no GPU is present (or the CUDA kernels were not compiled).
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU present")],
    ),
]


def pytest_report_header(config):
    info = pyodlog.build_info()
    return [
        f"pyodlog build: torch {info['torch']}, CUDA kernels compiled: {info['cuda']} "
        f"(archs {info['cuda_archs'] or '-'}), GPU present: {info['cuda_available']}"
    ]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def isolated_data_root(tmp_path, monkeypatch):
    """Every test writes its HDF5 data under its own temporary PYODLOG_HOME."""
    home = tmp_path / "pyodlog_home"
    monkeypatch.setenv("PYODLOG_HOME", str(home))
    return home


@pytest.fixture
def collector(tmp_path):
    """A real collector process on loopback with small limits (256 KiB requests, 1 MiB segments),
    keys for tenants A and B; a test module that needs other limits defines its own."""
    server = CollectorProcess(
        tmp_path / "collector",
        write_keys(tmp_path / "keys.txt"),
        ["--max-request-bytes", "256K", "--max-segment-bytes", "1M"],
    ).start()
    yield server
    server.stop()
