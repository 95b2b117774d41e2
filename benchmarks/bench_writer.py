"""The HDF5 writer against a raw write() of the same bytes to the same file system, in the same run.

On tmpfs (/dev/shm), which removes disk noise. Each round submits every record
to a fresh store and waits until ``wait_for_save`` acknowledges it (fsynced);
the baseline writes the same tensors' bytes with ``write()`` and fsyncs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import pytest
import torch

from pyodlog.io import HDF5Store, WriterConfig
from pyodlog.ops import compress_features
from pyodlog.structures import CallRecord, DetectionBatch

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
B, D, C = 8, 100, 91


def _records(n_calls: int, feature_heavy: bool):
    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(n_calls):
        det = DetectionBatch(
            torch.rand(B, D, 4, generator=g),
            torch.rand(B, D, generator=g),
            torch.randint(0, C, (B, D), generator=g),
            torch.randn(B, D, C, generator=g),
            torch.randint(0, 1000, (B, D), generator=g),
            torch.full((B,), D),
            [(480, 640)] * B,
            torch.randn(B, D, 256, generator=g) if feature_heavy else None,
        )
        features = (
            {"fpn": compress_features(torch.randn(B, 256, 40, 40, generator=g), "uint8")}
            if feature_heavy
            else {}
        )
        record = CallRecord(
            [f"{i:06d}-{j}" for j in range(B)],
            "deploying",
            0,
            time.time(),
            [(480, 640)] * B,
            det,
            features,
        )
        record.model_name, record.version_name, record.result_name = "bench", "v1", "r"
        records.append(record)
    return records


def _blobs(records):
    out = []
    for r in records:
        tensors = list(r.detections.tensors().values())
        for f in r.features.values():
            tensors += [f.payload, f.scale, f.offset]
        out += [np.ascontiguousarray(t.numpy()).tobytes() for t in tensors]
    return out


CASES = {"feature-heavy": (40, True), "detections-only": (250, False)}


@pytest.mark.skipif(SHM is None, reason="needs /dev/shm (tmpfs)")
@pytest.mark.parametrize("impl", ["raw write", "pyodlog HDF5Store"])
@pytest.mark.parametrize("case", list(CASES))
def test_writer_throughput(benchmark, case, impl):
    n_calls, heavy = CASES[case]
    records = _records(n_calls, heavy)
    blobs = _blobs(records)
    nbytes = sum(len(b) for b in blobs)
    folder = tempfile.mkdtemp(dir=SHM)

    def raw():
        path = os.path.join(folder, "raw.bin")
        with open(path, "wb") as f:
            for blob in blobs:
                f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.unlink(path)

    # backpressure="block": the benchmark measures how fast records are stored, so none may be
    # dropped when the burst outruns the writer (the default drops and counts).
    sink = HDF5Store(
        tempfile.mkdtemp(dir=folder),
        config=WriterConfig(flush_interval=1.0, batch_images=256, backpressure="block"),
    )
    sink.open_result("bench", "v1", "r", {"n_class": C}, False)

    def store():
        for r in records:
            sink.submit(r)
        sink.wait_for_save()

    benchmark.group = f"writer tmpfs {case} ({n_calls * B} images, {nbytes / 2**20:.0f} MiB)"
    benchmark.extra_info["role"] = "baseline" if impl == "raw write" else impl
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["images"] = n_calls * B
    try:
        benchmark.pedantic(raw if impl == "raw write" else store, rounds=5, warmup_rounds=1)
        if impl != "raw write":
            assert sink.stats()["written"] == 6 * n_calls  # every record stored, none dropped
    finally:
        sink.close()
        shutil.rmtree(folder, ignore_errors=True)
