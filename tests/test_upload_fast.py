"""Issue 17 item 3: uploads without extra passes over the segment, and what keeps them honest.

The client sends the SHA-256 its writer recorded in the segment's sidecar instead
of hashing the segment again, and trusts it only where the collector's check
covers it; the collector hashes every piece as it arrives and appends a piece that
continues the staged upload straight into the staged file. Real HDF5 segments,
the real collector (as a process over loopback, or its storage), no mocks: a spy
on the hash function only counts calls.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest

import pyodlog.sync.syncer as syncer_module
import pyodlog_collector.storage as storage_module
from pyodlog.io.segment import CHECKSUM_SUFFIX, read_checksum, write_checksum
from pyodlog_collector.storage import CollectorStorage, SegmentKey
from pyodlog_protocol import segment_path
from pyodlog_protocol.files import sha256_file
from tests.helpers.collector_process import (
    KEY_A,
    CollectorProcess,
    put,
    real_segment,
    write_keys,
    write_segment_of_size,
)
from tests.test_collector_hardening import read_answer, request
from tests.test_sync import kill_when_a_quarter_is_staged, log_calls, make_logger


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def collector(tmp_path):
    server = CollectorProcess(tmp_path / "collector", write_keys(tmp_path / "keys.txt")).start()
    yield server
    server.stop()


@pytest.fixture
def hashed(monkeypatch):
    """The files the syncer hashes (the real sha256_file, counted)."""
    calls: list[Path] = []

    def counting(path):
        calls.append(Path(path))
        return sha256_file(path)

    monkeypatch.setattr(syncer_module, "sha256_file", counting)
    return calls


def closed_segment(tmp_path, collector, **kwargs):
    logger = make_logger(tmp_path / "local", collector.url, **kwargs)
    log_calls(logger, 2)
    logger.wait_for_save()
    logger.sink.rotate()
    (segment,) = logger.sink.segments()
    return logger, segment


def forge_sidecar(segment: Path, digest: str) -> None:
    """A sidecar in the writer's own format, written after the segment: trusted, and lying."""
    sidecar = segment.with_name(segment.name + CHECKSUM_SUFFIX)
    sidecar.write_text(f"{digest}  {segment.name}\n")
    later = segment.stat().st_mtime_ns + 1_000_000
    os.utime(sidecar, ns=(later, later))


def acks(logger) -> dict[str, dict]:
    return {
        p.name: json.loads(p.read_text()) for p in (logger.sink.directory / ".sync").rglob("*.ack")
    }


# -- the client: the sidecar instead of a hashing pass ----------------------------------------------------


def test_the_segment_goes_with_its_sidecars_digest_without_being_hashed_again(
    tmp_path, collector, hashed
):
    logger, segment = closed_segment(tmp_path, collector)
    actual = sha256_file(segment)
    assert read_checksum(segment) == actual  # the writer recorded it at close
    summary = logger.upload()
    assert summary.segments == 1 and summary.bytes == segment.stat().st_size
    assert hashed == []  # no pass over the file before (or after) sending it
    (stored,) = collector.segments("tenant-a", "tiny", "v1", "run")
    assert sha256_file(stored) == actual
    assert acks(logger)[segment.name + ".ack"]["sha256"] == actual
    logger.close()


def test_a_lying_sidecar_is_refused_by_the_collector_and_the_segment_goes_with_its_own_digest(
    tmp_path, collector, hashed, caplog
):
    logger, segment = closed_segment(tmp_path, collector)
    actual = sha256_file(segment)
    forge_sidecar(segment, sha(b"not this segment"))
    with caplog.at_level(logging.WARNING, logger="pyodlog"):
        summary = logger.upload()
    assert summary.segments == 1 and not summary.refused
    assert hashed == [segment]  # hashed once, after the collector refused the sidecar's digest
    assert logger.syncer.sidecar_mismatches == 1
    assert any(
        "checksum file of segment" in r.getMessage() and actual in r.getMessage()
        for r in caplog.records
    )
    # The collector verified the bytes against the lie (422) before the right digest stored them.
    assert "checksum_mismatch" in collector.log() or " 422 " in collector.log()
    (stored,) = collector.segments("tenant-a", "tiny", "v1", "run")
    assert stored.read_bytes() == segment.read_bytes()
    assert acks(logger)[segment.name + ".ack"]["sha256"] == actual
    logger.close()


def test_a_sidecar_naming_what_the_collector_holds_does_not_acknowledge_another_file(
    tmp_path, collector
):
    logger, segment = closed_segment(tmp_path, collector)
    assert logger.upload().segments == 1
    stored_digest = sha256_file(segment)
    # Acknowledgements lost, and the local file is now another one whose sidecar copies the digest
    # the collector holds: the listing alone would say "already stored".
    for marker in (logger.sink.directory / ".sync").rglob("*.ack"):
        marker.unlink()
    other = real_segment(7)
    segment.write_bytes(other)
    forge_sidecar(segment, stored_digest)
    summary = logger.upload()
    assert summary.already_stored == 0 and summary.segments == 0
    assert "checksum_conflict" in summary.refused[segment.name]
    assert acks(logger) == {}
    (stored,) = collector.segments("tenant-a", "tiny", "v1", "run")
    assert sha256_file(stored) == stored_digest  # untouched
    logger.close()


def test_only_the_writers_own_fresh_sidecar_is_trusted(tmp_path):
    segment = tmp_path / "seg-00000000000000000001-r000-p1-abc-000001.h5"
    segment.write_bytes(real_segment())
    sidecar = segment.with_name(segment.name + CHECKSUM_SUFFIX)
    assert read_checksum(segment) is None  # none
    write_checksum(segment)
    assert read_checksum(segment) == sha256_file(segment)
    good = sidecar.read_bytes()
    digest = good.split()[0].decode()
    later = segment.stat().st_mtime_ns + 1_000_000
    for text in (
        b"not a checksum\n",
        f"{digest}  another-segment.h5\n".encode(),  # names another file
        f"{digest.upper()}  {segment.name}\n".encode(),
        f"{digest}  {segment.name}".encode(),  # not the line the writer writes
        good + good,
        good + b" " * 600,
    ):
        sidecar.write_bytes(text)
        os.utime(sidecar, ns=(later, later))
        assert read_checksum(segment) is None, text
    sidecar.write_bytes(good)
    os.utime(sidecar, ns=(later, later))
    assert read_checksum(segment) == digest
    # The segment changed after its sidecar was written: stale.
    earlier = segment.stat().st_mtime_ns - 1_000_000_000
    os.utime(sidecar, ns=(earlier, earlier))
    assert read_checksum(segment) is None
    # A link is not the writer's file.
    sidecar.unlink()
    real = tmp_path / "elsewhere.sha256"
    real.write_bytes(good)
    sidecar.symlink_to(real)
    assert read_checksum(segment) is None


# -- the collector: hashed as it arrives, appended in place -------------------------------------------


@pytest.fixture
def collector_hashes(monkeypatch):
    calls: list[Path] = []

    def counting(path):
        calls.append(Path(path))
        return sha256_file(path)

    monkeypatch.setattr(storage_module, "sha256_file", counting)
    return calls


def send_pieces(storage, key, data, cuts, digest=None):
    digest = digest or sha(data)
    answers = []
    for start, end in zip([0, *cuts], [*cuts, len(data)]):
        piece = data[start:end]
        result = storage.write_piece(key, digest, start, len(data), io.BytesIO(piece), len(piece))
        answers.append(result.status)
    return answers


def test_pieces_are_verified_as_they_arrive_and_a_restart_falls_back_to_reading_the_file(
    tmp_path, collector_hashes
):
    data = real_segment(3)
    cuts = [len(data) // 3, 2 * len(data) // 3]
    storage = CollectorStorage(tmp_path / "root", check_segments=False)
    key = SegmentKey("t", "m", "v", "r", 0, "seg.h5")
    assert send_pieces(storage, key, data, cuts) == [202, 202, 201]
    assert collector_hashes == []  # every byte was hashed on its way in: not read again
    assert (tmp_path / "root" / "t" / "m" / "v" / "r" / "seg.h5").read_bytes() == data
    # A restart between pieces forgets the running hash: the commit reads the staged file.
    other = SegmentKey("t", "m", "v", "r", 0, "other.h5")
    digest = sha(data)
    assert (
        storage.write_piece(other, digest, 0, len(data), io.BytesIO(data[:100]), 100).status == 202
    )
    restarted = CollectorStorage(tmp_path / "root", check_segments=False)
    rest = data[100:]
    assert (
        restarted.write_piece(other, digest, 100, len(data), io.BytesIO(rest), len(rest)).status
        == 201
    )
    assert len(collector_hashes) == 1
    assert (tmp_path / "root" / "t" / "m" / "v" / "r" / "other.h5").read_bytes() == data


@pytest.mark.parametrize("overwritten", [0, 1], ids=["first-piece", "middle-piece"])
def test_a_piece_that_overwrites_staged_bytes_with_others_is_caught(tmp_path, overwritten):
    data = real_segment(4)
    cuts = [len(data) // 3, 2 * len(data) // 3]
    storage = CollectorStorage(tmp_path / "root", check_segments=False)
    key = SegmentKey("t", "m", "v", "r", 0, "seg.h5")
    digest = sha(data)
    for start, end in ((0, cuts[0]), (cuts[0], cuts[1])):  # two pieces staged
        piece = data[start:end]
        answer = storage.write_piece(key, digest, start, len(data), io.BytesIO(piece), len(piece))
        assert answer.status == 202
    # The same range again, with other bytes (offset below what is staged: it overwrites).
    start, end = ([0, *cuts])[overwritten], cuts[overwritten]
    garbage = os.urandom(end - start)
    answer = storage.write_piece(key, digest, start, len(data), io.BytesIO(garbage), len(garbage))
    assert answer.status == 202
    rest = data[end:]
    answer = storage.write_piece(key, digest, end, len(data), io.BytesIO(rest), len(rest))
    assert (answer.status, answer.body["error"]) == (422, "checksum_mismatch")
    assert not (tmp_path / "root" / "t" / "m" / "v" / "r" / "seg.h5").exists()


def test_a_stalled_append_delays_no_other_upload_of_the_segment_and_stores_nothing_of_its_own(
    tmp_path, collector
):
    # Large enough that the stalled part holds whole blocks of the collector's reads (1 MiB).
    data = write_segment_of_size(tmp_path / "big.h5", 4 << 20).read_bytes()
    digest, half = sha(data), len(data) // 2
    url = collector.url + segment_path("m", "v", "r", 0, "seg.h5")
    assert put(url, KEY_A, data[:half], sha256=digest, offset=0, total=len(data)).status_code == 202
    path = segment_path("m", "v", "r", 0, "seg.h5") + (
        f"?sha256={digest}&offset={half}&total={len(data)}"
    )
    headers = {"Authorization": f"Bearer {KEY_A}", "Content-Length": str(len(data) - half)}
    tail = data[half:]
    with socket.create_connection(("127.0.0.1", collector.port), timeout=10) as stalled:
        # The second half starts arriving (appended to the staged file), then the client stops.
        stalled.sendall(request("PUT", path, headers) + tail[: len(tail) // 2])
        staged = collector.root / "tenant-a" / ".staging" / "m" / "v" / "r"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the appender's bytes are on their way into the file
            parts = list(staged.glob("*.part"))
            if parts and parts[0].stat().st_size > half:
                break
            time.sleep(0.005)
        # Appended in place as it arrives: no piece file of its own, no copy later.
        assert parts and parts[0].stat().st_size > half
        assert list(staged.glob("*.piece")) == []
        started = time.monotonic()
        answer = put(url, KEY_A, tail, sha256=digest, offset=half, total=len(data))
        assert answer.status_code == 201 and time.monotonic() - started < 3
        # The stalled request's bytes went into a file nobody sees any more.
        stalled.sendall(tail[len(tail) // 2 :])
        status, body, _ = read_answer(stalled, False)
        assert (status, body["status"]) == (200, "exists")
    assert (collector.root / "tenant-a" / "m" / "v" / "r" / "seg.h5").read_bytes() == data
    assert list(staged.glob("*")) == []


# -- pieces in flight -------------------------------------------------------------------------------------


def test_a_piece_ahead_waits_for_the_bytes_before_it_and_then_is_appended(tmp_path):
    import threading

    data = real_segment(6)
    cut = len(data) // 2
    digest = sha(data)
    storage = CollectorStorage(tmp_path / "root", check_segments=False)
    key = SegmentKey("t", "m", "v", "r", 0, "seg.h5")
    assert storage.ahead_bytes > 0  # announced on status answers (X-Pieces-Ahead)
    answers = {}
    tail = data[cut:]
    # Announced as following the piece at 0 (as the Syncer does): held whichever comes first.
    ahead = threading.Thread(
        target=lambda: answers.setdefault(
            "tail",
            storage.write_piece(
                key, digest, cut, len(data), io.BytesIO(tail), len(tail), follows=0
            ),
        )
    )
    ahead.start()
    head = data[:cut]
    answer = storage.write_piece(key, digest, 0, len(data), io.BytesIO(head), cut)
    assert answer.status == 202
    ahead.join(10)
    assert answers["tail"].status == 201  # held until the head arrived, then stored
    assert (tmp_path / "root" / "t" / "m" / "v" / "r" / "seg.h5").read_bytes() == data


def test_a_piece_ahead_whose_announced_predecessor_never_comes_is_told_where_to_resume(tmp_path):
    data = real_segment(6)
    cut = len(data) // 2
    digest = sha(data)
    storage = CollectorStorage(tmp_path / "root", check_segments=False, announced_wait=0.2)
    key = SegmentKey("t", "m", "v", "r", 0, "seg.h5")
    tail = io.BytesIO(data[cut:])
    started = time.monotonic()
    # Announced as following the piece at 0, which never begins: held announced_wait, then a 409.
    answer = storage.write_piece(key, digest, cut, len(data), tail, len(data) - cut, follows=0)
    assert (answer.status, answer.body) == (409, {"error": "offset_mismatch", "received": 0})
    assert 0.2 <= time.monotonic() - started < 5
    assert tail.read() == b""  # its body was read (and dropped): the connection stays in step
    # Not announced, nothing before it on its way: a real gap, refused at once.
    started = time.monotonic()
    answer = storage.write_piece(
        key, digest, cut, len(data), io.BytesIO(data[cut:]), len(data) - cut
    )
    assert answer.status == 409 and time.monotonic() - started < 0.2
    # Further ahead than the collector holds pieces: refused at once, announced or not.
    far = CollectorStorage(tmp_path / "root2", check_segments=False, ahead_bytes=cut - 1)
    started = time.monotonic()
    answer = far.write_piece(
        key, digest, cut, len(data), io.BytesIO(data[cut:]), len(data) - cut, follows=0
    )
    assert answer.status == 409 and time.monotonic() - started < 0.2


def test_a_piece_held_behind_a_stalled_one_is_told_where_to_resume_after_the_hold_timeout(
    tmp_path,
):
    """A piece before it that stalls mid-body (a slow client) holds a later piece at most
    ``hold_timeout`` seconds, not until the stalled request's own timeout."""
    import threading

    data = real_segment(6)
    cut = len(data) // 2
    digest = sha(data)
    storage = CollectorStorage(tmp_path / "root", check_segments=False, hold_timeout=0.5)
    key = SegmentKey("t", "m", "v", "r", 0, "seg.h5")
    release = threading.Event()

    class StalledBody(io.RawIOBase):
        """The head's body: its first 1000 bytes, then nothing until released."""

        def __init__(self) -> None:
            self.sent = 0

        def read(self, n: int = -1) -> bytes:
            if self.sent >= 1000:
                release.wait(30)
            limit = cut if release.is_set() else 1000
            end = limit if n is None or n < 0 else min(limit, self.sent + n)
            block = data[self.sent : end]
            self.sent += len(block)
            return block

    answers = {}
    head = threading.Thread(
        target=lambda: answers.setdefault(
            "head", storage.write_piece(key, digest, 0, len(data), StalledBody(), cut)
        )
    )
    head.start()
    time.sleep(0.2)  # the head is inside write_piece, stalled after 1000 bytes
    started = time.monotonic()
    tail = io.BytesIO(data[cut:])
    answer = storage.write_piece(key, digest, cut, len(data), tail, len(data) - cut, follows=0)
    held = time.monotonic() - started
    assert answer.status == 409 and answer.body["error"] == "offset_mismatch"
    assert answer.body["received"] < cut
    assert 0.5 <= held < 5, held
    assert tail.read() == b""  # its body was read (and dropped): the connection stays in step
    release.set()
    head.join(30)
    assert answers["head"].status == 202
    done = storage.write_piece(
        key, digest, cut, len(data), io.BytesIO(data[cut:]), len(data) - cut, follows=0
    )
    assert done.status == 201
    assert (tmp_path / "root" / "t" / "m" / "v" / "r" / "seg.h5").read_bytes() == data


def _raw_put(port: int, digest: str, offset: int, total: int, length: int, headers=None):
    """A PUT of a piece on a raw connection: the socket, its head sent, the body not yet."""
    path = segment_path("m", "v", "r", 0, "seg.h5") + (
        f"?sha256={digest}&offset={offset}&total={total}"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = {"Authorization": f"Bearer {KEY_A}", "Content-Length": str(length), **(headers or {})}
    sock.sendall(request("PUT", path, head))
    return sock


def _no_answer_within(sock: socket.socket, seconds: float) -> bool:
    import select

    readable, _, _ = select.select([sock], [], [], seconds)
    return not readable


def _staged_size(collector) -> int:
    parts = list((collector.root / "tenant-a" / ".staging" / "m" / "v" / "r").glob("*.part"))
    return parts[0].stat().st_size if parts else 0


def test_a_real_gap_is_answered_at_once_by_the_collector(tmp_path, collector):
    data = real_segment(4)
    digest, half = sha(data), len(data) // 2
    url = collector.url + segment_path("m", "v", "r", 0, "seg.h5")
    assert put(url, KEY_A, data[:half], sha256=digest, offset=0, total=len(data)).status_code == 202
    started = time.monotonic()
    # Nothing before it on its way, nothing announced: not held (it used to wait 30 s).
    gap = put(url, KEY_A, data[half + 10 :], sha256=digest, offset=half + 10, total=len(data))
    assert gap.status_code == 409 and gap.json() == {"error": "offset_mismatch", "received": half}
    assert time.monotonic() - started < 3
    # A malformed announcement is refused, not guessed at.
    bad = requests_put(url, data[half:], digest, half, len(data), {"X-Follows-Piece": str(half)})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_header"
    done = put(url, KEY_A, data[half:], sha256=digest, offset=half, total=len(data))
    assert done.status_code == 201


def requests_put(url, body, digest, offset, total, headers):
    import requests

    return requests.put(
        url,
        data=body,
        params={"sha256": digest, "offset": offset, "total": total},
        headers={"Authorization": f"Bearer {KEY_A}", **headers},
        timeout=30,
    )


@pytest.mark.parametrize("predecessor", ["arrives", "breaks off"])
def test_a_piece_ahead_is_held_only_while_the_piece_before_it_is_arriving(
    tmp_path, collector, predecessor
):
    # Pieces of whole MiB blocks of the collector's reads, so a stalled body shows in the staged file.
    data = write_segment_of_size(tmp_path / "big.h5", 8 << 20).read_bytes()
    digest, q = sha(data), 2 << 20
    url = collector.url + segment_path("m", "v", "r", 0, "seg.h5")
    assert put(url, KEY_A, data[:q], sha256=digest, offset=0, total=len(data)).status_code == 202
    middle, tail = data[q : 3 * q], data[3 * q :]
    with _raw_put(collector.port, digest, q, len(data), len(middle)) as before:
        before.sendall(middle[: 3 * q // 4])  # the piece before: arriving, then stalled
        deadline = time.monotonic() + 10
        while _staged_size(collector) <= q and time.monotonic() < deadline:
            time.sleep(0.005)
        assert _staged_size(collector) > q
        # The piece after it (not announced): held while the one before is arriving.
        after = _raw_put(collector.port, digest, 3 * q, len(data), len(tail))
        after.sendall(tail)
        assert _no_answer_within(after, 0.5)
        started = time.monotonic()
        if predecessor == "arrives":
            before.sendall(middle[3 * q // 4 :])
            assert read_answer(before, False)[:2] == (202, {"status": "partial", "received": 3 * q})
            status, body, _ = read_answer(after, False)
            assert (status, body["status"]) == (201, "stored")
            stored = collector.root / "tenant-a" / "m" / "v" / "r" / "seg.h5"
            assert stored.read_bytes() == data
        else:
            before.shutdown(socket.SHUT_RDWR)  # the client of the piece before went away
            status, body, _ = read_answer(after, False)
            # What arrived of the piece before stays staged: the client resumes from there.
            arrived = q + 3 * q // 4
            assert (status, body) == (409, {"error": "offset_mismatch", "received": arrived})
        assert time.monotonic() - started < 3
        after.close()
    if predecessor == "breaks off":
        rest = put(url, KEY_A, data[arrived:], sha256=digest, offset=arrived, total=len(data))
        assert rest.status_code == 201
        (stored,) = collector.segments("tenant-a", "m", "v", "r")
        assert stored.read_bytes() == data


def test_a_piece_announced_as_following_one_not_yet_arrived_waits_for_it(tmp_path, collector):
    data = write_segment_of_size(tmp_path / "big.h5", 4 << 20).read_bytes()
    digest, half = sha(data), len(data) // 2
    url = collector.url + segment_path("m", "v", "r", 0, "seg.h5")
    # The second piece reaches the collector before the first (two connections): announced, it is
    # held for the first, which then arrives; the segment is stored once, verified.
    with _raw_put(
        collector.port, digest, half, len(data), len(data) - half, {"X-Follows-Piece": "0"}
    ) as after:
        after.sendall(data[half:])
        assert _no_answer_within(after, 0.3)
        first = put(url, KEY_A, data[:half], sha256=digest, offset=0, total=len(data))
        status, body, _ = read_answer(after, False)
    assert first.status_code == 202 and first.json()["received"] == half
    assert (status, body["status"]) == (201, "stored")
    (stored,) = collector.segments("tenant-a", "m", "v", "r")
    assert stored.read_bytes() == data


def test_pieces_in_flight_resume_after_the_collector_is_killed_mid_upload(
    tmp_path, collector, monkeypatch
):
    import threading

    from pyodlog.sync import CollectorClient, SyncConfig, SyncError
    from tests.test_sync import FAST

    # How many pieces are on their way at once (the real requests, counted).
    lock, state = threading.Lock(), {"now": 0, "most": 0}
    real_put = CollectorClient.put_piece

    def counted(self, *args, **kwargs):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            return real_put(self, *args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(CollectorClient, "put_piece", counted)
    sync = SyncConfig(**dict(FAST, chunk_bytes=64 << 10))
    logger = make_logger(tmp_path / "local", collector.url, heavy=True, sync=sync)
    log_calls(logger, 8)  # ~9 MB of uncompressed features in one segment
    logger.wait_for_save()
    logger.sink.rotate()
    (segment,) = logger.sink.segments()
    size = segment.stat().st_size
    killer, killed_at = kill_when_a_quarter_is_staged(collector, size)
    with pytest.raises(SyncError, match="cannot reach the collector"):
        logger.upload()
    killer.join()
    assert killed_at and killed_at[0] < size
    assert state["most"] == 2  # the next piece was on its way while one was taken in
    assert collector.segments("tenant-a", "tiny", "v1", "run") == []  # nothing half-visible
    collector.start()  # same port, same root: the running hashes are gone, the staged bytes not
    summary = logger.upload()
    assert summary.segments == 1 and summary.bytes <= size - killed_at[0] + 2 * sync.chunk_bytes
    (stored,) = collector.segments("tenant-a", "tiny", "v1", "run")
    assert sha256_file(stored) == sha256_file(segment)
    assert acks(logger)[segment.name + ".ack"]["sha256"] == sha256_file(segment)
    staging = collector.root / "tenant-a" / ".staging" / "tiny" / "v1" / "run"
    assert list(staging.glob("*")) == []
    logger.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_segment_truncated_mid_upload_is_an_error_not_a_crash(tmp_path, monkeypatch, scheme):
    """Over HTTP the pieces are views of the mapped file, over TLS reads into buffers: a file cut
    short under a map must not kill the process (SIGBUS), whichever way it is sent."""
    from pyodlog.sync import CollectorClient, SyncConfig, SyncError
    from tests.helpers.collector_process import make_tls_files
    from tests.test_sync import FAST

    options, config = [], dict(FAST, chunk_bytes=64 << 10)
    if scheme == "https":
        ca, cert, key = make_tls_files(tmp_path / "tls")
        options, config["ca_bundle"] = ["--tls-cert", str(cert), "--tls-key", str(key)], str(ca)
    server = CollectorProcess(tmp_path / "collector", write_keys(tmp_path / "keys.txt"), options)
    server.start()
    try:
        endpoint = f"{scheme}://{'localhost' if scheme == 'https' else '127.0.0.1'}:{server.port}"
        logger = make_logger(tmp_path / "local", endpoint, heavy=True, sync=SyncConfig(**config))
        log_calls(logger, 2)
        logger.wait_for_save()
        logger.sink.rotate()
        (segment,) = logger.sink.segments()
        real_put = CollectorClient.put_piece

        def truncating(self, *args, **kwargs):
            answer = real_put(self, *args, **kwargs)
            with open(segment, "r+b") as f:  # another file copied over it (cp truncates first)
                f.truncate(100 << 10)
            return answer

        monkeypatch.setattr(CollectorClient, "put_piece", truncating)
        with pytest.raises(SyncError, match="shorter than when its upload began"):
            logger.upload()
        assert server.segments("tenant-a", "tiny", "v1", "run") == []
        logger.close()
    finally:
        server.stop()
