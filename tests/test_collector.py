"""The reference collector over real HTTP on loopback: protocol, authentication, limits, names, tenants, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from pyodlog_collector import ApiKeys, KeyFileError
from pyodlog_protocol import segment_path, segments_path
from tests.helpers.collector_process import (
    KEY_A,
    KEY_B,
    get,
    put,
    real_segment,
    write_keys,
)


def seg_url(server, segment_id="seg-1.h5", rank=0, model="m", version="v", result="r"):
    return server.url + segment_path(model, version, result, rank, segment_id)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_health_needs_no_key_and_names_the_protocol(collector):
    answer = requests.get(collector.url + "/v1/health", timeout=10).json()
    assert answer["status"] == "ok" and answer["protocol"] == 1


def test_pieces_are_stored_only_once_complete_and_verified(collector):
    data = real_segment()
    digest = sha(data)
    half = len(data) // 2
    url = seg_url(collector)
    assert get(url, KEY_A, sha256=digest).json() == {"status": "absent", "received": 0}
    first = put(url, KEY_A, data[:half], sha256=digest, offset=0, total=len(data))
    assert first.status_code == 202 and first.json()["received"] == half
    assert collector.segments("tenant-a", "m", "v", "r") == []  # not visible while partial
    assert get(url, KEY_A, sha256=digest).json() == {"status": "partial", "received": half}
    # A repeated piece is harmless (the client's retry of a lost answer).
    assert put(url, KEY_A, data[:half], sha256=digest, offset=0, total=len(data)).status_code == 202
    # A piece beyond what is staged, with no piece before it on its way: refused at once.
    started = time.monotonic()
    gap = put(url, KEY_A, data[half + 10 :], sha256=digest, offset=half + 10, total=len(data))
    assert gap.status_code == 409 and gap.json() == {"error": "offset_mismatch", "received": half}
    assert time.monotonic() - started < 3
    done = put(url, KEY_A, data[half:], sha256=digest, offset=half, total=len(data))
    assert done.status_code == 201 and done.json()["status"] == "stored"
    (stored,) = collector.segments("tenant-a", "m", "v", "r")
    assert stored.read_bytes() == data
    again = put(url, KEY_A, data[:1000], sha256=digest, offset=0, total=len(data))
    assert again.status_code == 200 and again.json()["status"] == "exists"
    listing = get(collector.url + segments_path("m", "v", "r"), KEY_A).json()["segments"]
    assert [(s["segment_id"], s["sha256"], s["bytes"], s["rank"]) for s in listing] == [
        ("seg-1.h5", digest, len(data), 0)
    ]
    content = get(url + "/content", KEY_A)
    assert content.content == data and content.headers["X-Content-SHA256"] == digest


def test_the_same_id_with_another_checksum_is_a_conflict(collector):
    data, other = real_segment(0), real_segment(1)
    assert (
        put(
            seg_url(collector), KEY_A, data, sha256=sha(data), offset=0, total=len(data)
        ).status_code
        == 201
    )
    conflict = put(seg_url(collector), KEY_A, other, sha256=sha(other), offset=0, total=len(other))
    assert conflict.status_code == 409 and conflict.json()["error"] == "checksum_conflict"
    (stored,) = collector.segments("tenant-a", "m", "v", "r")
    assert stored.read_bytes() == data


def test_bytes_that_do_not_match_the_announced_checksum_are_never_visible(collector):
    data = os.urandom(5000)
    bad = put(seg_url(collector), KEY_A, data, sha256=sha(b"something else"), offset=0, total=5000)
    assert bad.status_code == 422 and bad.json()["error"] == "checksum_mismatch"
    assert collector.segments("tenant-a", "m", "v", "r") == []
    assert get(seg_url(collector), KEY_A, sha256=sha(b"something else")).json()["received"] == 0


@pytest.mark.parametrize(
    "header, status, error",
    [
        (None, 401, "missing_api_key"),
        ("Basic dXNlcjpwYXNz", 401, "malformed_authorization"),
        ("Bearer not-the-key-0123456789", 403, "invalid_api_key"),
        (f"Bearer {KEY_A}x", 403, "invalid_api_key"),
    ],
)
def test_a_missing_or_wrong_key_is_refused(collector, header, status, error):
    headers = {"Authorization": header} if header else {}
    for answer in (
        requests.get(collector.url + segments_path("m", "v", "r"), headers=headers, timeout=10),
        requests.put(
            seg_url(collector),
            data=b"abc",
            headers=headers,
            timeout=10,
            params={"sha256": sha(b"abc"), "offset": 0, "total": 3},
        ),
    ):
        assert answer.status_code == status and answer.json()["error"] == error
    assert collector.segments("tenant-a", "m", "v", "r") == []
    assert KEY_A not in collector.log() and KEY_B not in collector.log()


def test_one_tenant_never_sees_another_tenants_uploads(collector):
    data = real_segment(0)
    assert (
        put(
            seg_url(collector), KEY_A, data, sha256=sha(data), offset=0, total=len(data)
        ).status_code
        == 201
    )
    assert get(seg_url(collector) + "/content", KEY_B).status_code == 404
    assert get(collector.url + segments_path("m", "v", "r"), KEY_B).json() == {"segments": []}
    assert get(collector.url + "/v1/results", KEY_B).json() == {"results": []}
    assert get(collector.url + "/v1/results", KEY_A).json()["results"] == [
        {"model": "m", "version": "v", "result": "r", "segments": 1, "bytes": len(data)}
    ]
    # The same segment id under tenant B is B's own, separate segment.
    other = real_segment(1)
    assert (
        put(
            seg_url(collector), KEY_B, other, sha256=sha(other), offset=0, total=len(other)
        ).status_code
        == 201
    )
    assert get(seg_url(collector) + "/content", KEY_A).content == data


@pytest.mark.parametrize(
    "path",
    [
        "/v1/segments/../v/r/0/seg.h5",
        "/v1/segments/%2e%2e/v/r/0/seg.h5",
        "/v1/segments/m/v/r/0/..",
        "/v1/segments/m/v/r/0/%2e%2e%2f%2e%2e%2fescaped",
        "/v1/segments/m/v/r/0/a%2Fb",
        "/v1/segments/%2Fetc/v/r/0/passwd",
        "/v1/segments/m/v/r/0/" + "x" * 129,
        "/v1/segments/m/v/r/-1/seg.h5",
        "/v1/segments/m/v/r/zero/seg.h5",
        "/v1/segments/m/v/r/0/seg%00.h5",
        "/v1/segments/m%20x/v/r/0/seg.h5",
    ],
)
def test_names_outside_the_allow_list_are_refused(collector, path, tmp_path):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    data = b"payload"
    # Sent raw: requests would normalise '..' away before it reaches the server.
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=10)
    conn.request(
        "PUT",
        path + f"?sha256={sha(data)}&offset=0&total={len(data)}",
        body=data,
        headers={"Authorization": f"Bearer {KEY_A}"},
    )
    answer = conn.getresponse()
    assert answer.status in (400, 404), (path, answer.status)
    assert json.loads(answer.read())["error"] in ("invalid_name", "invalid_rank", "not_found")
    conn.close()
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before


def test_oversize_bodies_and_segments_are_refused_with_413(collector):
    big = os.urandom(257 * 1024)
    answer = put(seg_url(collector), KEY_A, big, sha256=sha(big), offset=0, total=len(big))
    assert answer.status_code == 413 and answer.json()["error"] == "request_too_large"
    huge_total = put(seg_url(collector), KEY_A, b"abc", sha256=sha(b"abc"), offset=0, total=2 << 20)
    assert huge_total.status_code == 413 and huge_total.json()["error"] == "segment_too_large"
    assert (
        put(seg_url(collector), KEY_A, b"abc", sha256=sha(b"abc"), offset=0, total=2).status_code
        == 400
    )
    assert collector.segments("tenant-a", "m", "v", "r") == []
    # The connection and the server stay usable.
    assert requests.get(collector.url + "/v1/health", timeout=10).status_code == 200


def test_other_methods_and_paths_are_refused(collector):
    assert (
        requests.post(
            seg_url(collector), headers={"Authorization": f"Bearer {KEY_A}"}, timeout=10
        ).status_code
        == 405
    )
    assert get(collector.url + "/v2/results", KEY_A).status_code == 404
    assert get(collector.url + "/v1/nothing", KEY_A).status_code == 404
    assert (
        put(seg_url(collector), KEY_A, b"abc", offset=0, total=3).json()["error"]
        == "invalid_sha256"
    )


def test_a_staged_upload_survives_a_server_kill(collector):
    data = real_segment()
    digest = sha(data)
    cut = len(data) // 3
    assert (
        put(
            seg_url(collector), KEY_A, data[:cut], sha256=digest, offset=0, total=len(data)
        ).status_code
        == 202
    )
    collector.kill()
    collector.start()
    assert get(seg_url(collector), KEY_A, sha256=digest).json()["received"] == cut
    assert (
        put(
            seg_url(collector), KEY_A, data[cut:], sha256=digest, offset=cut, total=len(data)
        ).status_code
        == 201
    )
    assert collector.segments("tenant-a", "m", "v", "r")[0].read_bytes() == data


def test_key_file_rules(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read the API key file"):
        ApiKeys.from_file(tmp_path / "missing")
    short = tmp_path / "short"
    short.write_text("a:short\n")
    with pytest.raises(KeyFileError, match="shorter than 16 characters") as error:
        ApiKeys.from_file(short)
    assert "short\n" not in str(error.value) and "'short'" not in str(error.value)
    two_bare = tmp_path / "bare"
    two_bare.write_text("0123456789abcdef0\n0123456789abcdef1\n")
    with pytest.raises(KeyFileError, match="more than one bare key"):
        ApiKeys.from_file(two_bare)
    keys = ApiKeys.from_file(write_keys(tmp_path / "keys"))
    assert keys.tenant_for(KEY_A) == "tenant-a" and keys.tenant_for(KEY_B) == "tenant-b"
    assert keys.tenant_for(KEY_A[:-1]) is None and keys.tenant_for(None) is None
    assert KEY_A not in repr(keys)


def test_serve_refuses_a_bad_key_file_and_never_imports_torch(tmp_path):
    bad = tmp_path / "keys"
    bad.write_text("tenant:tooshort\n")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyodlog_collector",
            "serve",
            "--root",
            str(tmp_path / "r"),
            "--api-key-file",
            str(bad),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (
        run.returncode == 2
        and "shorter than 16 characters" in run.stderr
        and "tooshort" not in run.stderr
    )
    # The collector never imports torch: that is what makes it start in well under a second.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, pyodlog_collector.cli, pyodlog_collector.http; "
            "print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.stdout.strip() == "False"


def test_pyodlog_command_serves_lists_and_keygen(tmp_path):
    command = Path(sys.executable).with_name("pyodlog")
    assert command.exists(), "make build installs the `pyodlog` command into the venv"
    keys = tmp_path / "keys"
    out = subprocess.run(
        [str(command), "keygen", str(keys), "--tenant", "team"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and oct(keys.stat().st_mode & 0o777) == "0o600"
    key = keys.read_text().strip().split(":", 1)[1]
    assert key not in out.stdout + out.stderr and len(key) >= 32
    server = subprocess.Popen(
        [
            str(command),
            "serve",
            "--root",
            str(tmp_path / "root"),
            "--api-key-file",
            str(keys),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = server.stdout.readline().split("listening on ")[1].split()[0]
        data = real_segment()
        assert (
            put(
                url + segment_path("m", "v", "r", 3, "s.h5"),
                key,
                data,
                sha256=sha(data),
                offset=0,
                total=len(data),
            ).status_code
            == 201
        )
    finally:
        server.terminate()
        server.wait(10)
    listing = subprocess.run(
        [str(command), "list", "--root", str(tmp_path / "root")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert json.loads(listing.stdout) == [
        {
            "tenant": "team",
            "model": "m",
            "version": "v",
            "result": "r",
            "segments": 1,
            "bytes": len(data),
        }
    ]
    assert key not in server.stderr.read()
