"""Issue 11, the collector's side: hostile segments, malformed and smuggled requests, resource limits.

Every HTTP case goes over loopback to the real collector process; the answer
is always a 4xx/5xx JSON refusal with a reason, and the collector's log never
holds a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import requests

from pyodlog_collector.segment_check import InvalidSegment, SegmentChecker, check_segment
from pyodlog_collector.storage import CollectorStorage, SegmentKey
from pyodlog_protocol import segment_path
from tests.helpers.collector_process import (
    KEY_A,
    CollectorProcess,
    get,
    put,
    real_segment,
    write_keys,
)

SECRET = b"tenant-b:THE-OPERATORS-SECRET-KEY-0123456789"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def start(tmp_path, *args: str) -> CollectorProcess:
    return CollectorProcess(
        tmp_path / "collector", write_keys(tmp_path / "keys.txt"), list(args)
    ).start()


# -- raw HTTP ----------------------------------------------------------------------------------------


def read_answer(sock: socket.socket, until_closed: bool) -> tuple[int, dict, bool]:
    """One answer (status, JSON body) from a raw socket, and whether the server closed afterwards."""
    data = b""
    while b"\r\n\r\n" not in data:
        block = sock.recv(65536)
        assert block, f"the collector closed without an answer (got {data!r})"
        data += block
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        block = sock.recv(65536)
        assert block, "the answer was cut off"
        body += block
    rest = body[length:]
    closed = False
    if until_closed:
        while True:
            block = sock.recv(65536)
            if not block:
                closed = True
                break
            rest += block
        assert rest == b"", f"more than one answer: the body was read as a request ({rest[:200]!r})"
    return status, json.loads(body[:length]), closed


def exchange(port: int, raw: bytes, until_closed: bool = False, timeout: float = 5.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_answer(sock, until_closed)


def request(
    method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


SEGMENT = real_segment()
DIGEST = sha(SEGMENT)
AUTH = {"Authorization": f"Bearer {KEY_A}"}
BODY = {**AUTH, "Content-Length": str(len(SEGMENT))}


def put_path(model="m", version="v", result="r", rank="0", segment="seg.h5", **query) -> str:
    params = {"sha256": DIGEST, "offset": "0", "total": str(len(SEGMENT)), **query}
    return f"/v1/segments/{model}/{version}/{result}/{rank}/{segment}?" + "&".join(
        f"{k}={v}" for k, v in params.items()
    )


# (case, raw request, status, error, whether the collector closes the connection)
FUZZ = [
    # 5: full-match names and checksums: a trailing newline is not part of a name
    (
        "model-newline",
        request("PUT", put_path(model="abc%0A"), BODY, SEGMENT),
        400,
        "invalid_name",
        False,
    ),
    (
        "dotdot-newline",
        request("PUT", put_path(result="..%0A"), BODY, SEGMENT),
        400,
        "invalid_name",
        False,
    ),
    (
        "segment-newline",
        request("PUT", put_path(segment="s.h5%0A"), BODY, SEGMENT),
        400,
        "invalid_name",
        False,
    ),
    (
        "sha-newline",
        request("PUT", put_path(sha256=DIGEST + "%0A"), BODY, SEGMENT),
        400,
        "invalid_sha256",
        False,
    ),
    (
        "status-sha-newline",
        request("GET", put_path(sha256=DIGEST + "%0A"), AUTH),
        400,
        "invalid_sha256",
        False,
    ),
    # 5: ASCII digits only
    (
        "rank-superscript",
        request("PUT", put_path(rank="%C2%B2"), BODY, SEGMENT),
        400,
        "invalid_rank",
        False,
    ),
    (
        "rank-arabic-indic",
        request("PUT", put_path(rank="%D9%A3"), BODY, SEGMENT),
        400,
        "invalid_rank",
        False,
    ),
    (
        "rank-fullwidth",
        request("PUT", put_path(rank="%EF%BC%93"), BODY, SEGMENT),
        400,
        "invalid_rank",
        False,
    ),
    (
        "offset-superscript",
        request("PUT", put_path(offset="%C2%B2"), BODY, SEGMENT),
        400,
        "invalid_query",
        False,
    ),
    (
        "total-fullwidth",
        request("PUT", put_path(total="%EF%BC%93"), BODY, SEGMENT),
        400,
        "invalid_query",
        False,
    ),
    (
        "offset-twice",
        request("PUT", put_path() + "&offset=0", BODY, SEGMENT),
        400,
        "invalid_query",
        False,
    ),
    ("bad-utf8", request("GET", "/v1/segments/%FF/v/r", AUTH), 400, "invalid_url", False),
    (
        "content-length-superscript",
        request("PUT", put_path(), {**AUTH, "Content-Length": "\xb2"}, b"x"),
        400,
        "invalid_content_length",
        True,
    ),
    # 5: what the standard library refuses, answered (not a traceback in log_request)
    ("garbage-request-line", b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400, "bad_request", True),
    ("three-words-and-more", b"GET /v1/health HTTP/1.1 extra\r\n\r\n", 400, "bad_request", True),
    ("http-0.9", b"GET /v1/health\r\n\r\n", 400, "bad_request", True),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "http_version_not_supported", True),
    ("unknown-method", request("BREW", "/v1/health"), 501, "not_implemented", True),
    ("options", request("OPTIONS", "/v1/health"), 405, "method_not_allowed", True),
    # 6: request smuggling: what could be framed two ways is refused and the connection closed
    (
        "get-with-body",
        request(
            "GET", "/v1/health", {"Content-Length": "40"}, request("GET", "/v1/results", AUTH)[:40]
        ),
        400,
        "body_not_allowed",
        True,
    ),
    (
        "get-chunked",
        request("GET", "/v1/health", {"Transfer-Encoding": "chunked"}, b"0\r\n\r\n"),
        400,
        "body_not_allowed",
        True,
    ),
    (
        "length-and-chunked",
        request("PUT", put_path(), {**BODY, "Transfer-Encoding": "chunked"}, b"0\r\n\r\n"),
        400,
        "conflicting_framing",
        True,
    ),
    (
        "two-content-lengths",
        request("PUT", put_path(), AUTH, b"")[:-2]
        + f"Content-Length: {len(SEGMENT)}\r\nContent-Length: 0\r\n\r\n".encode()
        + SEGMENT,
        400,
        "duplicate_content_length",
        True,
    ),
    (
        "chunked-put",
        request("PUT", put_path(), {**AUTH, "Transfer-Encoding": "chunked"}, b"0\r\n\r\n"),
        411,
        "length_required",
        True,
    ),
    # 7: names with a leading dot are the collector's own
    (
        "model-staging",
        request("PUT", put_path(model=".staging"), BODY, SEGMENT),
        400,
        "invalid_name",
        False,
    ),
    (
        "segment-meta",
        request("PUT", put_path(segment=".meta"), BODY, SEGMENT),
        400,
        "invalid_name",
        False,
    ),
    (
        "version-hidden",
        request("PUT", put_path(version=".v"), BODY, SEGMENT),
        400,
        "invalid_name",
        False,
    ),
    ("list-dot-result", request("GET", "/v1/segments/m/v/.meta", AUTH), 400, "invalid_name", False),
    # 8: a request without a key is refused before its (huge) body is read
    (
        "unauthenticated-100MiB",
        request("PUT", put_path(), {"Content-Length": str(100 << 20)}, b"x" * 1000),
        401,
        "missing_api_key",
        True,
    ),
    (
        "wrong-key-100MiB",
        request(
            "PUT",
            put_path(),
            {"Authorization": "Bearer nope-0123456789abcdef", "Content-Length": str(100 << 20)},
        ),
        403,
        "invalid_api_key",
        True,
    ),
]


@pytest.mark.parametrize(
    "raw, status, error, closes", [c[1:] for c in FUZZ], ids=[c[0] for c in FUZZ]
)
def test_malformed_requests_get_a_reasoned_refusal(collector, tmp_path, raw, status, error, closes):
    before = sorted(
        p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != "collector-server.log"
    )
    started = time.monotonic()
    got_status, body, _ = exchange(collector.port, raw, until_closed=closes)
    assert (got_status, body.get("error")) == (status, error), body
    assert body.get("detail"), "every refusal says why"
    assert time.monotonic() - started < 4  # answered at once, never after reading a huge body
    after = sorted(
        p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != "collector-server.log"
    )
    assert after == before  # nothing created (no 'abc\n' folder, no '.staging' model)
    assert requests.get(collector.url + "/v1/health", timeout=5).status_code == 200
    log = collector.log()
    assert "Traceback" not in log and KEY_A not in log


def test_keep_alive_logs_each_request_under_its_own_tenant(collector):
    with socket.create_connection(("127.0.0.1", collector.port), timeout=5) as sock:
        sock.sendall(request("GET", "/v1/results", AUTH))
        assert read_answer(sock, False)[0] == 200
        sock.sendall(request("GET", "/v1/results"))
        assert read_answer(sock, False)[0] == 401
    lines = [line for line in collector.log().splitlines() if "GET /v1/results" in line]
    assert lines[-2].endswith("tenant=tenant-a") and lines[-1].endswith("tenant=-"), lines


# -- 1: hostile segments ------------------------------------------------------------------------------


def hostile_segment(path: Path, kind: str, secret_file: Path, secret_h5: Path) -> Path:
    """A real segment plus a string field whose bytes would come from the operator's files."""
    path.write_bytes(SEGMENT)
    with h5py.File(path, "a") as f:
        n = f["images/det_count"].shape[0]
        spans = np.zeros((n, 2), np.int64)
        spans[0] = (0, len(SECRET))
        f["images/fields/leak.spans"] = spans
        if kind == "external-storage":
            f.create_dataset(
                "images/fields/leak.bytes",
                shape=(len(SECRET),),
                dtype=np.uint8,
                external=[(str(secret_file), 0, len(SECRET))],
            )
        elif kind == "external-link":
            f["images/fields/leak.bytes"] = h5py.ExternalLink(str(secret_h5), "/data")
        elif kind == "soft-link":
            f["images/fields/leak.bytes"] = h5py.SoftLink("/images/input_id.bytes")
        elif kind == "virtual-dataset":
            layout = h5py.VirtualLayout(shape=(len(SECRET),), dtype=np.uint8)
            layout[:] = h5py.VirtualSource(str(secret_h5), "data", shape=(len(SECRET),))
            f.create_virtual_dataset("images/fields/leak.bytes", layout)
        else:
            raise ValueError(kind)
    return path


HOSTILE = ["external-storage", "external-link", "soft-link", "virtual-dataset"]


@pytest.fixture
def secrets(tmp_path):
    secret_file = tmp_path / "operator-keys.txt"
    secret_file.write_bytes(SECRET)
    secret_h5 = tmp_path / "other-tenant.h5"
    with h5py.File(secret_h5, "w") as f:
        f["data"] = np.frombuffer(SECRET, np.uint8)
    return secret_file, secret_h5


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_segment_reaching_outside_itself_is_refused_and_never_visible(
    collector, tmp_path, secrets, kind
):
    data = hostile_segment(tmp_path / "hostile.h5", kind, *secrets).read_bytes()
    url = collector.url + segment_path("m", "v", "r", 0, "seg.h5")
    answer = put(url, KEY_A, data, sha256=sha(data), offset=0, total=len(data))
    assert answer.status_code == 422 and answer.json()["error"] == "invalid_segment"
    assert "leak.bytes" in answer.json()["detail"]
    assert collector.segments("tenant-a", "m", "v", "r") == []
    assert get(url, KEY_A, sha256=sha(data)).json() == {"status": "absent", "received": 0}
    assert list((collector.root / "tenant-a" / ".staging").rglob("*.part")) == []
    # A real segment under the same id is still welcome.
    assert put(url, KEY_A, SEGMENT, sha256=DIGEST, offset=0, total=len(SEGMENT)).status_code == 201
    assert "Traceback" not in collector.log()


def test_export_checks_every_segment_again_and_reads_nothing_outside_them(tmp_path, secrets):
    # Segments stored before the collector checked them: planted straight into a collector root.
    root = tmp_path / "root"
    storage = CollectorStorage(root, check_segments=False)
    files = {"good.h5": SEGMENT}
    for kind in HOSTILE:
        files[f"{kind}.h5"] = hostile_segment(tmp_path / f"{kind}.h5", kind, *secrets).read_bytes()
    for name, data in files.items():
        key = SegmentKey("tenant-b", "m", "v", "r", 0, name)
        assert (
            storage.write_piece(key, sha(data), 0, len(data), _Bytes(data), len(data)).status == 201
        )

    def export() -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pyodlog",
                "export",
                "--root",
                str(root),
                "--tenant",
                "tenant-b",
                "m",
                "v",
                "r",
                "-o",
                str(tmp_path / "out.zip"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    refused = export()
    assert refused.returncode == 2, refused.stderr
    for kind in HOSTILE:
        assert f"{kind}.h5" in refused.stderr
    assert "good.h5" not in refused.stderr
    assert not (tmp_path / "out.zip").exists()
    assert SECRET.decode() not in refused.stdout + refused.stderr
    # (Without the hostile files the export works: test_sync's export test.)


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int) -> bytes:
        block = self.data[self.pos : self.pos + n]
        self.pos += len(block)
        return block


def _with(path: Path, change) -> Path:
    path.write_bytes(SEGMENT)
    with h5py.File(path, "a") as f:
        change(f)
    return path


STRUCTURE = [
    ("unknown-dataset", lambda f: f.create_dataset("images/secret", data=np.zeros(2))),
    ("unknown-group", lambda f: f.create_group("extra")),
    (
        "wrong-dtype",
        lambda f: (
            f.__delitem__("images/n_epoch"),
            f.create_dataset("images/n_epoch", data=np.zeros(2, np.float32)),
        ),
    ),
    (
        "filter",
        lambda f: (
            f.__delitem__("images/timestamp"),
            f.create_dataset("images/timestamp", data=np.zeros(2), compression="gzip"),
        ),
    ),
    ("object-reference", lambda f: f.attrs.create("ref", f["images"].ref, dtype=h5py.ref_dtype)),
    ("dataset-attribute", lambda f: f["images/det_count"].attrs.create("x", 1)),
    ("committed-datatype", lambda f: f.__setitem__("images/fields/t", np.dtype("<i8"))),
    ("missing-column", lambda f: f.__delitem__("images/det_offset")),
    ("offsets-outside", lambda f: f["images/det_offset"].__setitem__(0, 10**9)),
    ("span-outside", lambda f: f["images/input_id.spans"].__setitem__(0, [0, 10**6])),
    ("unequal-lengths", lambda f: f["images/det_count"].resize((1,))),
    ("unstored-rows", lambda f: f.create_dataset("images/fields/big", shape=(10**9,), dtype="<f8")),
]


@pytest.mark.parametrize("change", [c[1] for c in STRUCTURE], ids=[c[0] for c in STRUCTURE])
def test_the_segment_check_refuses_anything_the_writer_does_not_produce(tmp_path, change):
    check_segment(_with(tmp_path / "ok.h5", lambda f: None))
    with pytest.raises(InvalidSegment):
        check_segment(_with(tmp_path / "bad.h5", change))


def test_the_segment_check_accepts_what_the_library_writes(tmp_path):
    """Segments straight from pyodlog's SWMR writer: both compressions, string and numeric fields."""
    import torch

    from pyodlog.io import HDF5Store, WriterConfig
    from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

    store = HDF5Store(tmp_path / "local", config=WriterConfig(flush_interval=0.05))
    logger = TinyDetectorLogger(
        TinyDetector().eval(),
        "tiny",
        "v1",
        target_layers={
            "q": {"path": "backbone.0", "compression": "uint8"},
            "raw": {"path": "backbone.0", "compression": "none"},
        },
        additional_fields=[
            {"name": "camera", "dtype": "str", "default": "unknown"},
            {"name": "score", "dtype": "float32", "default": 0.0},
        ],
        sink=store,
        auto_sync=False,
    )
    with torch.inference_mode():
        logger([torch.rand(3, 16, 20) for _ in range(3)], input_ids=["a", "b-é", "c"])
        logger([torch.rand(3, 16, 20)], input_ids=["d"])
    logger.close()
    segments = store.segments()
    assert segments
    for segment in segments:
        check_segment(segment)


# -- 8: resource use ----------------------------------------------------------------------------------


def test_a_stalled_upload_delays_neither_status_nor_other_uploads(collector):
    path = put_path()
    with socket.create_connection(("127.0.0.1", collector.port), timeout=10) as stalled:
        stalled.sendall(request("PUT", path, BODY) + SEGMENT[: len(SEGMENT) // 2])
        # The first half is on its way in; the client then stops sending.
        url = collector.url + segment_path("m", "v", "r", 0, "seg.h5")
        started = time.monotonic()
        assert get(url, KEY_A, sha256=DIGEST).json()["status"] == "absent"
        assert (
            put(url, KEY_A, SEGMENT, sha256=DIGEST, offset=0, total=len(SEGMENT)).status_code == 201
        )
        assert get(url, KEY_A, sha256=DIGEST).json()["status"] == "stored"
        assert time.monotonic() - started < 3
        stalled.sendall(SEGMENT[len(SEGMENT) // 2 :])
        status, body, _ = read_answer(stalled, False)
        assert (status, body["status"]) == (200, "exists")
    assert list((collector.root / "tenant-a" / ".staging").rglob("*.*")) == []


def test_the_lock_table_holds_only_segments_in_use(tmp_path):
    storage = CollectorStorage(tmp_path / "root", check_segments=False)
    for i in range(50):
        data = os.urandom(100)
        key = SegmentKey("t", "m", "v", "r", 0, f"s{i}.h5")
        assert storage.write_piece(key, sha(data), 0, 100, _Bytes(data), 100).status == 201
        storage.status(key, sha(data))
    assert len(storage._locks) == 0


def test_staged_uploads_expire_and_a_finished_upload_drops_its_losers(tmp_path):
    server = start(tmp_path, "--staging-ttl", "1s")
    try:
        url = server.url + segment_path("m", "v", "r", 0, "seg.h5")
        other = real_segment(1)
        half = len(other) // 2
        assert (
            put(url, KEY_A, other[:half], sha256=sha(other), offset=0, total=len(other)).status_code
            == 202
        )
        staging = server.root / "tenant-a" / ".staging" / "m" / "v" / "r"
        (loser,) = staging.glob("*.part")
        # Another upload of this id wins: the loser can never be stored, its bytes go at once.
        assert (
            put(url, KEY_A, SEGMENT, sha256=DIGEST, offset=0, total=len(SEGMENT)).status_code == 201
        )
        assert not loser.exists()
        # An abandoned upload goes after --staging-ttl.
        abandoned = server.url + segment_path("m", "v", "r", 0, "abandoned.h5")
        assert (
            put(
                abandoned, KEY_A, other[:half], sha256=sha(other), offset=0, total=len(other)
            ).status_code
            == 202
        )
        (staged,) = staging.glob("abandoned.h5.*.part")
        deadline = time.monotonic() + 8
        while staged.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not staged.exists()
        assert "expired staged upload tenant-a/m/v/r/abandoned.h5" in server.log()
        assert get(abandoned, KEY_A, sha256=sha(other)).json() == {
            "status": "absent",
            "received": 0,
        }
    finally:
        server.stop()


def _trickle(sock: socket.socket, data: bytes, interval: float, limit: float) -> float | None:
    """Sends one byte per ``interval`` until the server answers; the seconds it took, or None."""
    started = time.monotonic()
    for byte in data:
        readable, _, _ = select.select([sock], [], [], interval)  # the server's answer is the event
        if readable:
            return time.monotonic() - started
        if time.monotonic() - started > limit:
            return None
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return time.monotonic() - started
    return None


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_trickling_client_meets_the_whole_request_deadline(tmp_path, part):
    server = start(tmp_path, "--request-timeout", "1")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            head = request("PUT", put_path(), BODY)
            if part == "body":
                sock.sendall(head)
                took = _trickle(sock, SEGMENT, 0.2, 6)
            else:
                sock.sendall(head[:20])
                took = _trickle(sock, head[20:], 0.2, 6)
            assert took is not None and took < 3, took  # each byte came within the idle timeout
            status, body, closed = read_answer(sock, True)
        assert (status, body["error"], closed) == (408, "request_timeout", True)
        assert "--request-timeout" in server.log() and "Traceback" not in server.log()
    finally:
        server.stop()


def test_connections_beyond_the_cap_are_refused_with_a_log_line(tmp_path):
    server = start(tmp_path, "--max-connections", "2")
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
        status, body, closed = exchange(
            server.port, request("GET", "/v1/health"), until_closed=True
        )
        assert (status, body["error"], closed) == (503, "too_many_connections", True)
        assert "connection limit reached" in server.log() and "--max-connections 2" in server.log()
        idle[0].close()
        deadline = time.monotonic() + 8
        while True:  # the closed connection's thread ends, and its place is free again
            try:
                if requests.get(server.url + "/v1/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        idle[1].close()
    finally:
        server.stop()


# -- 9: no part of a key is printed ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, starts",
    [
        ("bareprefixABC:0123456789abcdefXYZ", True),  # read as tenant 'bareprefixABC'
        ("bare+prefix:0123456789abcdefXYZ", False),  # not a tenant name: refused
        ("barepfx:q7Zx", False),  # a key too short
    ],
)
def test_a_bare_key_with_a_colon_is_never_printed_in_part(tmp_path, line, starts):
    keys = tmp_path / "keys"
    keys.write_text(line + "\n")
    keys.chmod(0o600)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyodlog_collector",
            "serve",
            "--root",
            str(tmp_path / "r"),
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
        first = proc.stdout.readline()
        assert ("listening on" in first) == starts
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    printed = first + out + err
    prefix, _, rest = line.partition(":")
    assert prefix not in printed and rest not in printed, printed


def test_serve_still_never_imports_torch_nor_pyodlog():
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, pyodlog_collector.cli, pyodlog_collector.http, pyodlog_collector.segment_check; "
            "print(sorted(m for m in ('torch', 'pyodlog', 'h5py') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.stdout.strip() == "[]", probe.stderr


def test_threads_do_not_pile_up_from_refused_connections(collector):
    """Many refused requests in a row: every one answered, the collector still fine."""
    errors: list[str] = []

    def hammer() -> None:
        for _ in range(10):
            try:
                status, _, _ = exchange(collector.port, FUZZ[0][1])
                if status != 400:
                    errors.append(str(status))
            except Exception as error:
                errors.append(repr(error))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert "Traceback" not in collector.log()


def test_leftover_request_bodies_expire_only_after_the_request_timeout(tmp_path):
    storage = CollectorStorage(tmp_path / "root")
    folder = tmp_path / "root" / "t" / ".staging" / "m" / "v" / "r"
    folder.mkdir(parents=True)
    staged = folder / f"s.h5.{'a' * 64}.part"
    piece = folder / f"s.h5.{'a' * 64}.{'b' * 16}.piece"
    unrelated = folder / "notes.txt"
    for path in (staged, piece, unrelated):
        path.write_bytes(b"x")
        os.utime(path, (time.time() - 100, time.time() - 100))
    assert storage.expire_staged(10, piece_ttl=1000) == 1
    assert not staged.exists() and piece.exists() and unrelated.exists()
    assert storage.expire_staged(10, now=time.time() + 2000, piece_ttl=1000) == 1
    assert not piece.exists() and unrelated.exists()


def test_the_check_runs_in_workers_a_crash_or_hang_ends_a_worker_not_the_collector(tmp_path):
    good = tmp_path / "good.h5"
    good.write_bytes(SEGMENT)
    bad = _with(tmp_path / "bad.h5", lambda f: f.create_group("extra"))
    checker = SegmentChecker(workers=1)
    try:
        assert checker.check(good) is None
        assert "unexpected group 'extra'" in checker.check(bad)
        (worker,) = checker._idle  # one worker, reused
        worker.kill()  # a worker that died while idle is replaced, the file is not refused
        worker.wait()
        assert checker.check(good) is None
    finally:
        checker.close()
    crashing = SegmentChecker(
        command=[sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    )
    assert "crashed" in crashing.check(good)
    hanging = SegmentChecker(
        timeout=0.5, command=[sys.executable, "-c", "import time; time.sleep(30)"]
    )
    started = time.monotonic()
    assert "did not finish within 0.5s" in hanging.check(good)
    assert time.monotonic() - started < 5
    assert hanging._started == 0 and crashing._started == 0  # the failed workers are gone


def test_clients_going_away_mid_request_leave_no_traceback(collector):
    url = collector.url + segment_path("m", "v", "r", 0, "seg.h5")
    assert put(url, KEY_A, SEGMENT, sha256=DIGEST, offset=0, total=len(SEGMENT)).status_code == 201
    cuts = [
        request("PUT", put_path(segment="other.h5"), BODY) + SEGMENT[:1000],  # half a body
        b"GET /v1/resu",  # half a request line
        request("GET", "/v1/segments/m/v/r/0/seg.h5/content", AUTH),  # gone before the answer
        request("PUT", put_path(), {**AUTH, "Content-Length": "5"}),  # no body at all
    ]
    for raw in cuts:
        with socket.create_connection(("127.0.0.1", collector.port), timeout=5) as sock:
            sock.sendall(raw)
    assert requests.get(collector.url + "/v1/health", timeout=5).status_code == 200
    deadline = time.monotonic() + 5  # the server's log says it noticed the cut body
    while "the client sent 1000 of" not in collector.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "GET /v1/resu 400" in collector.log()  # no version: not served as HTTP/0.9
    assert "Traceback" not in collector.log()
    assert list((collector.root / "tenant-a" / ".staging").rglob("*.piece")) == []
