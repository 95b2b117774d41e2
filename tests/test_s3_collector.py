"""``pyodlog serve --storage s3://bucket/prefix``: collector processes with no state of their own,
sharing one bucket of a real SeaweedFS cluster."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading

import pytest
import torch

import pyodlog
from pyodlog.io import HDF5Store, WriterConfig
from pyodlog.sync import SyncConfig
from tests.helpers import child_env
from tests.helpers.collector_process import (
    KEY_A,
    CollectorProcess,
    get,
    put,
    real_segment,
    write_keys,
)
from tests.helpers.seaweed import SECRET_KEY
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger


class S3CollectorProcess(CollectorProcess):
    """``python -m pyodlog_collector serve --storage s3://...`` on a free loopback port."""

    def __init__(self, folder, key_file, url: str) -> None:
        super().__init__(folder, key_file)
        self.storage_url = url

    def start(self) -> S3CollectorProcess:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyodlog_collector",
                "serve",
                "--storage",
                self.storage_url,
                "--api-key-file",
                str(self.key_file),
                "--port",
                "0",
                "--quiet",
            ],
            stdout=subprocess.PIPE,
            stderr=open(self.log_path, "a"),
            text=True,
            env=child_env(),
        )
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.wait(10)
            raise RuntimeError(f"the collector did not start: {line!r}\n{self.log()}")
        self.url = line.split("listening on ")[1].split()[0]
        return self


@pytest.fixture
def two_collectors(tmp_path, s3_bucket):
    keys = write_keys(tmp_path / "keys.txt")
    url = f"s3://{s3_bucket}/collected"
    servers = [S3CollectorProcess(tmp_path / f"c{i}", keys, url).start() for i in range(2)]
    yield servers
    for server in servers:
        server.stop()


def segment_url(server, name="seg-1.h5", rank=0):
    return f"{server.url}/v1/segments/m/v/r/{rank}/{name}"


def bucket_keys(seaweed, bucket):
    listing = seaweed.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_an_upload_started_on_one_collector_finishes_on_another(two_collectors, seaweed, s3_bucket):
    a, b = two_collectors
    data = real_segment(seed=3)
    sha = hashlib.sha256(data).hexdigest()
    half = len(data) // 2
    first = put(segment_url(a), KEY_A, data[:half], sha256=sha, offset=0, total=len(data))
    assert first.status_code == 202 and first.json()["received"] == half
    # The other collector knows where the upload stands: nothing is held in a process.
    assert get(segment_url(b), KEY_A, sha256=sha).json() == {"status": "partial", "received": half}
    last = put(segment_url(b), KEY_A, data[half:], sha256=sha, offset=half, total=len(data))
    assert last.status_code == 201, last.text
    for server in (a, b):
        status = get(segment_url(server), KEY_A, sha256=sha).json()
        assert status["status"] == "stored" and status["sha256"] == sha
        (listed,) = get(f"{server.url}/v1/segments/m/v/r", KEY_A).json()["segments"]
        assert listed["sha256"] == sha and listed["bytes"] == len(data)
        content = get(segment_url(server) + "/content", KEY_A)
        assert content.content == data and content.headers["X-Content-SHA256"] == sha
    results = get(f"{a.url}/v1/results", KEY_A).json()["results"]
    assert results == [
        {"model": "m", "version": "v", "result": "r", "segments": 1, "bytes": len(data)}
    ]
    assert bucket_keys(seaweed, s3_bucket) == [
        "collected/tenant-a/m/v/r/r0/.meta/seg-1.h5.json",
        "collected/tenant-a/m/v/r/r0/seg-1.h5",
    ]  # no staged piece left behind
    # Another file under the same id is a conflict, through either collector.
    other = real_segment(seed=4)
    conflict = put(
        segment_url(a),
        KEY_A,
        other,
        sha256=hashlib.sha256(other).hexdigest(),
        offset=0,
        total=len(other),
    )
    assert conflict.status_code == 409 and conflict.json()["error"] == "checksum_conflict"


def test_the_same_segment_sent_through_two_collectors_at_once_is_stored_once(
    two_collectors, seaweed, s3_bucket
):
    data = real_segment(seed=5)
    sha = hashlib.sha256(data).hexdigest()
    answers = []
    start = threading.Barrier(2)

    def send(server):
        start.wait()
        answers.append(put(segment_url(server), KEY_A, data, sha256=sha, offset=0, total=len(data)))

    threads = [threading.Thread(target=send, args=(s,)) for s in two_collectors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a.status_code for a in answers) == [200, 201], [a.text for a in answers]
    assert bucket_keys(seaweed, s3_bucket) == [
        "collected/tenant-a/m/v/r/r0/.meta/seg-1.h5.json",
        "collected/tenant-a/m/v/r/r0/seg-1.h5",
    ]
    stored = seaweed.client().get_object(
        Bucket=s3_bucket, Key="collected/tenant-a/m/v/r/r0/seg-1.h5"
    )
    assert stored["Body"].read() == data and stored["Metadata"]["sha256"] == sha


def test_a_logger_syncs_through_the_collectors_and_reads_back_from_the_store(
    tmp_path, two_collectors, s3_bucket
):
    torch.manual_seed(0)
    logger = TinyDetectorLogger(
        TinyDetector().eval(),
        "tiny",
        "v1",
        result_name="run",
        target_layers={"b": {"path": "backbone.0", "compression": "uint8"}},
        api_endpoint=two_collectors[0].url,
        api_key=KEY_A,
        sink=HDF5Store(tmp_path / "local", config=WriterConfig(flush_interval=0.05)),
        sync_config=SyncConfig(retries=2, backoff=0.01, chunk_bytes=256 << 10),
        auto_sync=False,
    )
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        logger([torch.rand(3, 40, 48, generator=g) for _ in range(3)], input_ids=["a", "b", "c"])
    logger.wait_for_save()
    summary = logger.upload()  # in pieces of 256 KiB, each staged as an object
    assert summary.segments == 1
    logger.close()
    data = pyodlog.open_result(f"s3://{s3_bucket}/collected/tenant-a/tiny/v1/run")
    assert data.images["input_id"] == ["a", "b", "c"]


def test_a_collector_with_a_wrong_credential_does_not_start_and_shows_no_secret(
    tmp_path, s3_bucket
):
    wrong = "Wrong/Secret+Key0123456789abcdefghijKLMN"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyodlog_collector",
            "serve",
            "--storage",
            f"s3://{s3_bucket}/x",
            "--api-key-file",
            str(write_keys(tmp_path / "keys.txt")),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(AWS_SECRET_ACCESS_KEY=wrong),
    )
    assert run.returncode == 2
    assert f"cannot use s3://{s3_bucket}: HTTP 403" in run.stderr
    for secret in (wrong, SECRET_KEY):
        assert all(secret[i : i + 8] not in run.stderr + run.stdout for i in range(33))
