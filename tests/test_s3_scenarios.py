"""Failure scenarios of sync to S3 on a real SeaweedFS cluster: a volume server SIGKILLed mid-run, a
wrong credential, two torchrun ranks auto-syncing to ``s3://``, a damaged object read back."""

from __future__ import annotations

import contextlib
import json
import logging
import time

import pytest

import pyodlog
from pyodlog.io import CorruptResultError
from pyodlog.sync import SyncConfig, SyncError
from tests.helpers.seaweed import ACCESS_KEY, SECRET_KEY
from tests.test_distributed import torchrun
from tests.test_s3_sync import FAST, log_calls, make_logger, sha_of


def acknowledged(result_dir) -> dict[str, str]:
    return {
        marker.name[: -len(".ack")]: json.loads(marker.read_text())["sha256"]
        for marker in (result_dir / ".sync").glob("*/*.ack")
    }


def test_a_volume_server_killed_mid_run_loses_nothing_acknowledged(tmp_path, seaweed, s3_bucket):
    endpoint = f"s3://{s3_bucket}/fleet"
    sync = SyncConfig(**dict(FAST, retries=1, connect_timeout=1, read_timeout=10))
    logger = make_logger(tmp_path / "local", endpoint, sync=sync, segment_max_records=1)
    folder = logger.sink.directory
    prefix = f"fleet/tiny/v1/{logger.result_name}/r0/"
    killed = seaweed.volumes[0]
    try:
        log_calls(logger, 3, seed=1)
        before = logger.upload()
        assert before.segments >= 2
        killed.kill()  # SIGKILL one of the two replicas' servers, mid-run
        log_calls(logger, 3, seed=2)
        # May fail (the store cannot write both replicas) or succeed: the markers tell.
        with contextlib.suppress(SyncError):
            logger.upload()
        acked = acknowledged(folder)
        assert len(acked) >= before.segments
        s3 = seaweed.client()
        for name, sha in acked.items():  # every acknowledged segment reads back whole, verified
            stored = s3.get_object(Bucket=s3_bucket, Key=prefix + name)
            assert stored["Metadata"]["sha256"] == sha == sha_of(folder / name)
            assert stored["Body"].read() == (folder / name).read_bytes()
    finally:
        if not killed.alive():
            killed.start().wait_ready(time.monotonic() + 60)
    logger.close()
    # With the server back, the rest goes, and the result reads back complete.
    logger = make_logger(tmp_path / "local", endpoint, sync=sync)
    deadline = time.monotonic() + 60
    while True:
        try:
            summary = logger.upload()
            break
        except SyncError:  # until the master sees the volume server again
            if time.monotonic() > deadline:
                raise
    assert summary.pending == 0 or summary.held == len(list(folder.glob("*.h5")))
    assert set(acknowledged(folder)) == {p.name for p in folder.glob("*.h5")}
    remote = pyodlog.open_result(f"{endpoint}/tiny/v1/{logger.result_name}")
    assert sorted(remote.images["input_id"]) == sorted(
        f"{seed}-{i}-{j}" for seed in (1, 2) for i in range(3) for j in range(2)
    )
    logger.close()


def test_a_wrong_credential_is_refused_and_the_secret_is_in_no_message(
    tmp_path, seaweed, s3_bucket, monkeypatch, caplog
):
    wrong = "Wrong/Secret+Key0123456789abcdefghijKLMN"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    endpoint = f"s3://{s3_bucket}/p"
    with caplog.at_level(logging.DEBUG, logger="pyodlog"):
        sync = SyncConfig(**dict(FAST, close_timeout=2))
        logger = make_logger(tmp_path / "local", endpoint, sync=sync, auto_sync=True)
        log_calls(logger, 2)
        with pytest.raises(SyncError) as raised:
            logger.upload()
        stats = logger.stats()
        logger.close()
    message = str(raised.value)
    assert "SignatureDoesNotMatch" in message and "refused the credentials" in message
    assert "the secret is not shown" in message
    with pytest.raises(RuntimeError) as read_error:
        pyodlog.open_result(f"{endpoint}/tiny/v1/run")
    texts = [message, str(read_error.value), caplog.text, json.dumps(stats, default=str)]
    texts += [repr(logger), repr(logger.syncer.client)]
    for text in texts:
        for secret in (wrong, SECRET_KEY):
            assert secret not in text
            assert all(secret[i : i + 8] not in text for i in range(len(secret) - 7))
    # Nothing was acknowledged, nothing stored.
    assert acknowledged(logger.sink.directory) == {}
    assert seaweed.client().list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0
    assert ACCESS_KEY  # the access key id is not a secret (it names the identity)


def test_a_damaged_object_is_refused_when_read_back(tmp_path, seaweed, s3_bucket):
    endpoint = f"s3://{s3_bucket}/p"
    logger = make_logger(tmp_path / "local", endpoint)
    log_calls(logger, 2)
    logger.upload()
    (segment,) = logger.sink.directory.glob("*.h5")
    logger.close()
    key = f"p/tiny/v1/{logger.result_name}/r0/{segment.name}"
    s3 = seaweed.client()
    head = s3.head_object(Bucket=s3_bucket, Key=key)
    damaged = bytearray(segment.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(damaged), Metadata=head["Metadata"])
    with pytest.raises(CorruptResultError, match="does not match the SHA-256 stored with it"):
        pyodlog.open_result(f"{endpoint}/tiny/v1/{logger.result_name}")


@pytest.mark.slow
def test_two_torchrun_ranks_auto_sync_to_s3(tmp_path, isolated_data_root, seaweed, s3_bucket):
    endpoint = f"s3://{s3_bucket}/fleet"
    run, reports, _ = torchrun(
        tmp_path,
        isolated_data_root,
        "sync",
        "--calls",
        "3",
        "--separate-homes",
        PYODLOG_API_ENDPOINT=endpoint,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert reports[0]["pending"] == reports[1]["pending"] == 0
    assert reports[0]["result_name"] == reports[1]["result_name"]
    keys = [
        o["Key"]
        for o in seaweed.client().list_objects_v2(Bucket=s3_bucket)["Contents"]
        if o["Key"].endswith(".h5") and "/.meta/" not in o["Key"]
    ]
    assert {k.split("/")[4] for k in keys} == {"r0", "r1"}  # each rank's segments under its rank
    merged = pyodlog.open_result(f"{endpoint}/det/v1/{reports[0]['result_name']}")
    assert sorted(merged.images["input_id"]) == sorted(reports[0]["ids"] + reports[1]["ids"])
    assert len(merged) == 12
