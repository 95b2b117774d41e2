"""The segment's chunk layout follows the calls' sizes, so that uniform calls are written as whole
chunks straight from their arrays (issue 17 item 2: the writer at the speed of a raw write)."""

from __future__ import annotations

import h5py
import numpy as np
import torch

import pyodlog
from pyodlog.io.segment import _rows_per_chunk
from pyodlog.io.writer import WriterConfig
from pyodlog.ops import compress_features
from tests.helpers.records import open_store, synthetic_record

B, D, C, E = 4, 50, 91, 300  # logits and embeddings rows of 364 and 1,200 bytes: "wide"


def full_record(seed: int):
    """A call with every image at its quota (the common case under load) and a feature map."""
    record = synthetic_record(seed, n_images=B, max_det=D, n_class=C, emb_dim=E)
    record.detections.counts[:] = D
    g = torch.Generator().manual_seed(seed)
    record.features = {"fpn": compress_features(torch.randn(B, 64, 40, 40, generator=g), "uint8")}
    return record


def test_uniform_calls_fill_whole_chunks_of_their_wide_columns(tmp_path):
    records = [full_record(i) for i in range(7)]
    store = open_store(tmp_path, C, storage="float32", config=WriterConfig(flush_interval=60.0))
    for r in records:
        store.submit(r)
    store.wait_for_save()
    store.submit(full_record(99))  # a second append into the same segment
    store.close()
    (segment,) = (tmp_path / "m/v/r").glob("seg-*.h5")
    per_call = B * D
    payload_per_call = records[0].features["fpn"].payload.numel()
    with h5py.File(segment, "r") as f:
        for name in ("detections/logits", "detections/embeddings"):
            rows = f[name].chunks[0]
            assert per_call % rows == 0, (name, rows)  # before: 64 KiB chunks (e.g. 180 rows)
        assert payload_per_call % f["features_payload"].chunks[0] == 0
        assert f["features_payload"].chunks[0] >= 256 << 10  # not degenerate
    res = pyodlog.open_result(tmp_path / "m/v/r", strict=True)
    assert len(res) == 8 * B
    want = torch.cat([r.detections.embeddings.reshape(-1, E) for r in [*records, full_record(99)]])
    np.testing.assert_array_equal(res.detections["embeddings"], want.numpy())
    for i in (0, 5, 8 * B - 1):
        call, image = divmod(i, B)
        source = (records + [full_record(99)])[call].features["fpn"]
        got = res.feature(i, "fpn", decompress=False)
        np.testing.assert_array_equal(
            got.payload.numpy().reshape(-1), source.payload[image].numpy().reshape(-1)
        )


def test_the_chunk_is_a_divisor_of_the_call_near_the_target_or_the_target():
    assert _rows_per_chunk("detections/logits", 364, 800) == 400  # wide: 256 KiB target
    assert _rows_per_chunk("detections/embeddings", 1024, 800) == 200
    assert _rows_per_chunk("features_payload", 1, 3_276_800) == 819_200
    assert _rows_per_chunk("detections/logits", 364, 797) == 720  # prime: the target
    assert _rows_per_chunk("images/det_count", 8, 8) == 8192  # small calls: the target
