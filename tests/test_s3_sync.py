"""Sync straight to an S3 object store (``api_endpoint="s3://bucket/prefix"``), on a real SeaweedFS
cluster (master, two volume servers with replication 001, filer, S3 gateway; ``tests/helpers/seaweed.py``)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pyodlog
from pyodlog.io import HDF5Store, WriterConfig, open_result
from pyodlog.sync import S3Target, SyncConfig, Syncer, SyncError
from tests.helpers.collector_process import write_segment_of_size
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

FAST = dict(retries=2, backoff=0.01, max_retry_interval=0.2, close_timeout=20)


def make_logger(root, endpoint, result_name="run", sync=None, segment_max_records=None, **kwargs):
    torch.manual_seed(0)
    writer = WriterConfig(flush_interval=0.05)
    if segment_max_records:
        writer = WriterConfig(flush_interval=0.05, segment_max_records=segment_max_records)
    store = HDF5Store(root, config=writer)
    kwargs.setdefault("auto_sync", False)
    return TinyDetectorLogger(
        TinyDetector().eval(),
        "tiny",
        "v1",
        result_name=result_name,
        target_layers={"b": {"path": "backbone.0", "compression": "uint8"}},
        api_endpoint=endpoint,
        sink=store,
        sync_config=sync or SyncConfig(**FAST),
        **kwargs,
    )


def log_calls(logger, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for i in range(n):
            logger(
                [torch.rand(3, 64, 80, generator=g) for _ in range(2)],
                input_ids=[f"{seed}-{i}-{j}" for j in range(2)],
            )
            logger.wait_for_save()


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored_objects(seaweed, bucket: str, prefix: str = "") -> dict[str, bytes]:
    s3 = seaweed.client()
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            out[entry["Key"]] = s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
    return out


def test_upload_stores_each_segment_verified_with_its_json_and_reads_back(
    tmp_path, seaweed, s3_bucket
):
    logger = make_logger(tmp_path / "local", f"s3://{s3_bucket}/fleet/a", segment_max_records=2)
    log_calls(logger, 5)
    logger.close()
    logger = make_logger(tmp_path / "local", f"s3://{s3_bucket}/fleet/a")
    summary = logger.upload()
    segments = sorted(logger.sink.directory.glob("*.h5"))
    assert summary.segments == len(segments) >= 3 and summary.bytes == sum(
        p.stat().st_size for p in segments
    )
    objects = stored_objects(seaweed, s3_bucket, "fleet/a/")
    prefix = f"fleet/a/tiny/v1/{logger.result_name}/"
    for path in segments:
        key = f"{prefix}r0/{path.name}"
        assert objects[key] == path.read_bytes()
        meta = json.loads(objects[f"{prefix}r0/.meta/{path.name}.json"])
        assert meta["sha256"] == sha_of(path) and meta["bytes"] == path.stat().st_size
        assert meta["rank"] == 0 and meta["schema"] is not None
        head = seaweed.client().head_object(Bucket=s3_bucket, Key=key, ChecksumMode="ENABLED")
        assert head["Metadata"]["sha256"] == sha_of(path)
        # The store verified and kept the SHA-256 pyodlog sent with the bytes.
        assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(sha_of(path))).decode()
    assert f"{prefix}result.json" in objects
    # Acknowledged on disk: a new logger sends nothing again.
    ack = list((logger.sink.directory / ".sync").glob("*/*.ack"))
    assert len(ack) == len(segments)
    again = logger.upload()
    assert again.segments == 0 and again.sent_earlier == len(segments)
    # Read back through the cache, checksums verified, the same records.
    remote = pyodlog.open_result(f"s3://{s3_bucket}/{prefix}")
    local = open_result(logger.sink.directory)
    assert remote.images["input_id"] == local.images["input_id"] and len(remote) == 10
    np.testing.assert_array_equal(remote.detections["boxes"], local.detections["boxes"])
    logger.close()


def test_lost_acknowledgements_are_already_there_and_another_file_under_an_id_is_refused(
    tmp_path, seaweed, s3_bucket, caplog
):
    endpoint = f"s3://{s3_bucket}/p"
    logger = make_logger(tmp_path / "local", endpoint)
    log_calls(logger, 2)
    first = logger.upload()
    assert first.segments == 1
    shutil.rmtree(logger.sink.directory / ".sync")  # the acknowledgements are lost with a disk
    again = logger.upload()
    assert again.segments == 0 and again.already_stored == 1 and again.bytes == 0
    # Another file under the same segment id: refused for good, named as a conflict; the store keeps
    # the first one.
    (segment,) = logger.sink.directory.glob("*.h5")
    original = segment.read_bytes()
    shutil.rmtree(logger.sink.directory / ".sync")
    segment.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with caplog.at_level(logging.WARNING, logger="pyodlog"):
        refused = logger.upload()
    assert list(refused.refused) == [segment.name]
    assert "checksum_conflict" in refused.refused[segment.name]
    key = f"p/tiny/v1/{logger.result_name}/r0/{segment.name}"
    assert stored_objects(seaweed, s3_bucket, key)[key] == original
    logger.close()


def multipart_syncer(folder, bucket, size, **config):
    """A Syncer of one ``size``-byte segment (pyodlog's layout) in ``folder`` to ``s3://bucket/mp``
    (the segment is written once: a second syncer on the same folder is a restarted process)."""
    folder.mkdir(exist_ok=True)
    segment = folder / "seg-00000000000000000001-r000-p1-aa-000001.h5"
    if not segment.exists():
        write_segment_of_size(segment, size)
    config = SyncConfig(
        **dict(FAST, s3_multipart_bytes=5 << 20, s3_part_bytes=5 << 20, s3_max_concurrency=1),
        **config,
    )
    target = S3Target(f"s3://{bucket}/mp", config)
    syncer = Syncer(target, lambda: [segment], folder, "m", "v", "r", 0, None, config, auto=False)
    return syncer, segment, f"mp/m/v/r/r0/{segment.name}"


def test_a_large_segment_goes_in_verified_parts(tmp_path, seaweed, s3_bucket):
    syncer, segment, key = multipart_syncer(tmp_path / "result", s3_bucket, 12 << 20)
    summary = syncer.upload_all()
    assert summary.segments == 1 and summary.bytes == segment.stat().st_size
    s3 = seaweed.client()
    head = s3.head_object(Bucket=s3_bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"].endswith("-3")  # three parts, each with its SHA-256
    assert head["Metadata"]["sha256"] == sha_of(segment)
    assert s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == segment.read_bytes()
    assert not list(tmp_path.rglob("*.upload"))  # the upload's record is gone once complete
    syncer.close()


def test_the_s3_gateway_restarted_mid_upload_resumes_with_the_parts_not_sent(
    tmp_path, seaweed, s3_bucket
):
    folder = tmp_path / "result"
    syncer, segment, key = multipart_syncer(folder, s3_bucket, 22 << 20, connect_timeout=1)
    size = segment.stat().st_size

    def kill_gateway_before_part_2(params, **kwargs):
        if params["PartNumber"] == 2 and seaweed.s3.alive():
            seaweed.s3.kill()  # SIGKILL, mid-upload: part 2 finds no gateway

    syncer.client.s3.meta.events.register(
        "before-parameter-build.s3.UploadPart", kill_gateway_before_part_2
    )
    try:
        with pytest.raises(SyncError, match="cannot send part 2 of 5"):
            syncer.upload_all()
    finally:
        seaweed.s3.start().wait_ready(time.monotonic() + 60)
    syncer.close()
    (marker,) = folder.rglob("*.upload")
    recorded = json.loads(marker.read_text())
    assert sorted(recorded["parts"]) == ["1"]  # part 1 was acknowledged before the gateway died
    assert syncer.pending() == [segment]  # nothing acknowledged that the store does not hold
    # A new process (a new syncer on the same result folder) resumes the same upload at part 2.
    syncer, _, _ = multipart_syncer(folder, s3_bucket, 22 << 20)
    summary = syncer.upload_all()
    assert summary.segments == 1 and summary.bytes == size - (5 << 20)
    s3 = seaweed.client()
    assert s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == segment.read_bytes()
    assert not list(folder.rglob("*.upload"))
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    syncer.close()


def test_the_readme_reads_a_result_from_the_bucket_with_duckdb(tmp_path, seaweed, s3_bucket):
    from tests.helpers.readme_blocks import block_starting_with

    seaweed.client().create_bucket(Bucket="fleet-logs")  # the README's bucket
    torch.manual_seed(0)
    logger = TinyDetectorLogger(
        TinyDetector().eval(),
        "shelf-detector",
        "2024.06",
        result_name="run",
        target_layers={"b": "backbone.0"},
        api_endpoint="s3://fleet-logs/pyodlog",
        sink=HDF5Store(tmp_path / "local", config=WriterConfig(flush_interval=0.05)),
        sync_config=SyncConfig(**FAST),
        auto_sync=False,
    )
    log_calls(logger, 3)
    assert logger.upload().segments == 1
    logger.close()
    namespace: dict = {}
    block = block_starting_with("# past-one-machine")
    exec(compile(block, "README.md:past-one-machine", "exec"), namespace)
    rows = namespace["busiest"].fetchall()
    counts = dict(zip(namespace["data"].images["input_id"], namespace["data"].images["det_count"]))
    assert len(rows) == 5 and [r[1] for r in rows] == sorted(counts.values(), reverse=True)[:5]


def test_the_read_cache_keeps_unchanged_segments_and_is_bounded(
    tmp_path, seaweed, s3_bucket, monkeypatch
):
    urls = []
    for name in ("first", "second"):
        logger = make_logger(tmp_path / "local", f"s3://{s3_bucket}/c", result_name=name)
        log_calls(logger, 2)
        logger.upload()
        logger.close()
        urls.append(f"s3://{s3_bucket}/c/tiny/v1/{name}")
    first = Path(pyodlog.open_result(urls[0]).source)
    (segment,) = first.glob("*.h5")
    before = segment.stat()
    again = pyodlog.open_result(urls[0])
    assert len(again) == 4 and segment.stat().st_ino == before.st_ino  # not downloaded again
    # A cache smaller than two results: opening the second removes the one read least recently.
    monkeypatch.setenv("PYODLOG_CACHE_BYTES", str(before.st_size + before.st_size // 2))
    second = pyodlog.open_result(urls[1])
    assert len(second) == 4 and Path(second.source).is_dir() and not first.exists()


def test_bytes_damaged_on_the_way_are_refused_by_the_store_and_sent_again(
    tmp_path, seaweed, s3_bucket
):
    logger = make_logger(tmp_path / "local", f"s3://{s3_bucket}/d")
    log_calls(logger, 2)
    logger.wait_for_save()
    logger.sink.rotate()
    (segment,) = logger.sink.directory.glob("*.h5")
    damaged_puts = []

    def damage_the_first_segment_put(params, **kwargs):
        if params["Key"].endswith(segment.name) and not damaged_puts:
            data = bytearray(segment.read_bytes())
            data[100] ^= 0xFF  # one flipped byte between the disk and the store
            params["Body"] = bytes(data)
            damaged_puts.append(params["Key"])

    s3 = logger.syncer.client.s3
    s3.meta.events.register("before-parameter-build.s3.PutObject", damage_the_first_segment_put)
    summary = logger.upload()
    assert damaged_puts and summary.segments == 1  # refused (BadDigest), then sent again whole
    stored = seaweed.client().get_object(Bucket=s3_bucket, Key=damaged_puts[0])
    assert stored["Body"].read() == segment.read_bytes()
    logger.close()


def test_the_command_line_reads_a_result_from_the_bucket(tmp_path, seaweed, s3_bucket, capsys):
    """`pyodlog info` and `pyodlog report` take the s3:// location as given (a Path would fold `//`)."""
    from pyodlog.cli import main

    logger = make_logger(tmp_path / "local", f"s3://{s3_bucket}/fleet/c")
    log_calls(logger, 2)
    assert logger.upload().segments >= 1
    location = f"s3://{s3_bucket}/fleet/c/tiny/v1/{logger.result_name}"
    logger.close()
    assert main(["info", location, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 4
    assert main(["report", location, "--json"]) == 0
    numbers = json.loads(capsys.readouterr().out)
    assert numbers["overview"]["images"] == 4
