"""The syncer: sends a result's closed segments to the collector, from disk, off the inference path.

As in wandb's split, records reach the disk first (the writer) and a separate
sender uploads from disk, so the network never blocks the writer or the
caller. ``upload()`` sends everything not yet acknowledged and waits; with
``auto_sync`` a background thread sends segments as they close, backing off
(exponentially, with jitter) while the collector is unreachable.

A segment goes in pieces of ``SyncConfig.chunk_bytes``; before sending, the
syncer asks the collector how much of it is already there, so an upload cut
off by a crash on either side resumes at the last byte the collector kept.

A segment the collector refuses for good (a 4xx other than 401/403/404/405/408/429:
too large, not a valid segment, another file under its id; a piece too large is a
setting to fix, not a refusal) is recorded next to
the acknowledgements, reported and skipped with a warning; the other segments
are still sent. Errors that may pass (the network, 5xx, the key) stop the pass
and are retried.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pyodlog.io.reader import read_epochs
from pyodlog.io.segment import read_checksum, segment_rank
from pyodlog.sync.client import CollectorClient, SyncConfig, SyncError, _is_count
from pyodlog.sync.state import SyncState
from pyodlog_protocol.files import sha256_file

if TYPE_CHECKING:
    from pyodlog.sync.s3 import S3Target

__all__ = ["Syncer", "UploadSummary"]

log = logging.getLogger("pyodlog")


@dataclass
class UploadSummary:
    """What one ``upload()`` did, and what the collector holds of the logger's segments.

    Attributes:
        segments: segments sent now (the collector stored them during this call).
        bytes: bytes sent over the network during this call.
        already_stored: segments the collector had already when asked now (nothing sent).
        sent_earlier: segments acknowledged before this call: sent by ``auto_sync``'s
            background thread, an earlier ``upload()`` or an earlier process.
        pending: segments still not acknowledged (a failure stopped the pass).
        refused: segment name -> why the collector refused it (now or earlier); never retried
            (delete its ``.refused`` marker under ``<result>/.sync/`` to try again).
        seconds: how long the call took.
        failed: the segment a failure stopped at (the call then raised).
    """

    segments: int = 0
    bytes: int = 0
    already_stored: int = 0
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)
    sent_earlier: int = 0
    pending: int = 0
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def held(self) -> int:
        """Segments of this result (and epoch) the collector holds: sent now, earlier, or already there."""
        return self.segments + self.already_stored + self.sent_earlier

    @property
    def mb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e6


class _Refused(Exception):
    """The collector refused one segment for good (the pass goes on with the others)."""


class _SidecarDoubt(Exception):
    """An answer that the SHA-256 read from a sidecar cannot be trusted for: hash the file, send again."""


# Buffers of finished uploads, for the next ones (any Syncer of this process): a new buffer's pages
# are faulted in on first use, which costs about as much as the copy into it.
_FREE_BUFFERS: list[bytearray] = []
_FREE_LOCK = threading.Lock()
_MAX_FREE_BYTES = 32 << 20  # kept at most (three pieces of TLS_PIECE_BYTES)
#: Over TLS a piece is read into a buffer (three turn round): pieces there are at most this large.
TLS_PIECE_BYTES = 8 << 20


def _take_buffers(count: int, size: int) -> list[bytearray]:
    with _FREE_LOCK:
        taken = [b for b in _FREE_BUFFERS if len(b) == size][:count]
        for buffer in taken:
            _FREE_BUFFERS.remove(buffer)
    return taken + [bytearray(size) for _ in range(count - len(taken))]


@contextlib.contextmanager
def _given_back(buffers: list[bytearray] | None):
    """Returns the buffers for reuse once no piece in them is on its way any more."""
    try:
        yield
    finally:
        with _FREE_LOCK:
            _FREE_BUFFERS.extend(buffers or [])
            while sum(map(len, _FREE_BUFFERS)) > _MAX_FREE_BYTES:
                _FREE_BUFFERS.pop(0)


class _SegmentBytes:
    """A closed segment's pieces, as views handed to ``socket.sendall`` as they are.

    Over plain HTTP (a loopback collector, or a trusted network) the views are of the
    file mapped into memory: only the kernel reads them (``send``), so a piece goes
    from the page cache to the socket in one copy, and a file truncated meanwhile
    makes ``send`` fail (EFAULT), it cannot kill the process. Over TLS the encryption
    reads the bytes in this process, where a page past a truncated file's end is a
    SIGBUS: there the pieces are read (``preadv``) into reused buffers (``buffers``;
    three turn round, and at most two pieces are on their way at once). Either way a
    file found shorter than at the start is a :class:`SyncError`.
    """

    def __init__(self, path: Path, size: int, buffers: list[bytearray] | None, chunk: int) -> None:
        self._path, self._size, self._buffers, self._chunk = path, size, buffers, chunk
        self._next = 0
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None

    def __enter__(self) -> _SegmentBytes:
        self._fd = os.open(self._path, os.O_RDONLY)
        if self._buffers is None and self._size:
            try:
                self._map = mmap.mmap(self._fd, self._size, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # shorter already, or cannot be mapped: read it
                self._buffers = []
            else:
                self._view = memoryview(self._map)
        return self

    def _short(self, at: int) -> SyncError:
        return SyncError(
            f"{self._path.name} is shorter than when its upload began ({at} of {self._size} "
            "bytes): a closed segment must not change"
        )

    def piece(self, offset: int, length: int) -> memoryview | bytes:
        if length == 0:
            return b""
        assert self._fd is not None
        if self._view is not None:
            if os.fstat(self._fd).st_size < offset + length:
                raise self._short(os.fstat(self._fd).st_size)
            return self._view[offset : offset + length]
        assert self._buffers is not None
        if not self._buffers:  # the file could not be mapped: read it as over TLS
            self._buffers.extend(bytearray(self._chunk) for _ in range(3))
        buffer = self._buffers[self._next % len(self._buffers)]
        self._next += 1
        if len(buffer) < length:
            raise SyncError(f"a piece of {length} bytes does not fit a buffer of {len(buffer)}")
        view = memoryview(buffer)[:length]
        done = 0
        while done < length:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise self._short(offset + done)
            done += n
        return view

    def __exit__(self, *exc: object) -> None:
        if self._view is not None:
            self._view.release()  # a piece still referenced keeps the mapping until it is collected
            with contextlib.suppress(BufferError):
                assert self._map is not None
                self._map.close()
            self._view = self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Syncer:
    """Uploads one result's closed segments to one collector.

    Args:
        client: the collector client, or an object store's target (``s3://``, :mod:`pyodlog.sync.s3`).
        segments: returns the result's closed segment files.
        result_dir: the result folder (for the acknowledgement markers).
        model_name, version_name, result_name: the result.
        rank: this process's rank (auto-sync sends the segments its rank wrote).
        n_epoch: send only segments holding records of this epoch (None: all).
        config: :class:`~pyodlog.sync.client.SyncConfig`.
        auto: start the background thread.
    """

    def __init__(
        self,
        client: CollectorClient | S3Target,
        segments: Callable[[], list[Path]],
        result_dir: Path,
        model_name: str,
        version_name: str,
        result_name: str,
        rank: int,
        n_epoch: int | None,
        config: SyncConfig,
        auto: bool,
    ) -> None:
        self.client = client
        self._segments = segments
        self.state = SyncState(result_dir, client.endpoint)
        self.names = (model_name, version_name, result_name)
        self.rank = rank
        self.n_epoch = n_epoch
        self.config = config
        self._epochs: dict[str, set[int]] = {}
        self._checksums: dict[str, tuple[int, int, str, bool]] = {}
        self._pass_lock = threading.Lock()
        self._warned: set[str] = set()  # refused segments already warned about
        self.sidecar_mismatches = 0  # segments whose checksum file disagreed with their bytes
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.last_error: BaseException | None = None
        self.total = UploadSummary()
        self._thread: threading.Thread | None = None
        self._stop_deadline = 0.0
        if auto:
            self._thread = threading.Thread(
                target=self._run, name=f"pyodlog-sync-{result_name}", daemon=True
            )
            self._thread.start()
            self._wake.set()  # send what earlier processes left unsent

    # -- what to send ------------------------------------------------------------------------------

    def _holds_epoch(self, path: Path) -> bool:
        if self.n_epoch is None:
            return True
        epochs = self._epochs.get(path.name)
        if epochs is None:  # closed segments never change: read once
            epochs = self._epochs[path.name] = {int(e) for e in read_epochs(path).tolist()}
        # A segment without images holds only aggregates (every call sampled out): always sent.
        return self.n_epoch in epochs or not epochs

    def _checksum(self, path: Path, trust_sidecar: bool = True) -> tuple[str, int, bool]:
        """SHA-256 and size of a closed segment, and whether the SHA-256 is the sidecar's.

        The writer recorded the SHA-256 in ``<segment>.sha256`` when it closed the
        segment (:func:`pyodlog.io.segment.read_checksum`): that one is used, so the
        segment is not read once more before its first byte is sent. Without a
        trusted sidecar (or with ``trust_sidecar=False``) the file is hashed, once: a
        retried pass does not read it again.
        """
        stat = path.stat()
        cached = self._checksums.get(path.name)
        if (
            cached is None
            or cached[:2] != (stat.st_size, stat.st_mtime_ns)
            or (cached[3] and not trust_sidecar)
        ):
            recorded = read_checksum(path) if trust_sidecar else None
            cached = self._checksums[path.name] = (
                stat.st_size,
                stat.st_mtime_ns,
                recorded if recorded is not None else sha256_file(path),
                recorded is not None,
            )
        return cached[2], cached[0], cached[3]

    def _selected(self, own_rank_only: bool) -> list[Path]:
        """The result's closed segments of the selected epoch (and of this rank's, if asked)."""
        return [
            path
            for path in self._segments()
            if not (own_rank_only and segment_rank(path.name) not in (None, self.rank))
            and self._holds_epoch(path)
        ]

    def pending(self, own_rank_only: bool = False) -> list[Path]:
        """Closed segments of the selected epoch that the collector has neither acknowledged nor refused."""
        done = self.state.acknowledged_names() | self.state.refused_names()
        out = []
        for path in self._segments():
            if path.name in done:
                continue
            if own_rank_only and segment_rank(path.name) not in (None, self.rank):
                continue
            if self._holds_epoch(path):
                out.append(path)
        return out

    # -- sending ------------------------------------------------------------------------------------

    def _send(self, path: Path, summary: UploadSummary, progress, stored: dict[str, str]) -> None:
        """Sends one segment; ``stored`` is the collector's listing (segment id -> SHA-256) of this pass.

        The SHA-256 comes from the segment's sidecar when the writer left one
        (:meth:`_checksum`). It is trusted only where the collector checks it: an
        upload of every byte that the collector verified and stored. Wherever the
        collector's answer rests on the SHA-256 alone (already stored, another
        SHA-256 under this id, an upload resumed from bytes sent earlier, a
        checksum mismatch), the file is hashed first and the segment sent again
        with its own SHA-256, so a stale or forged sidecar never gets a segment
        acknowledged that the collector does not hold.

        Raises:
            _Refused: the collector refused this segment for good.
            SyncError: anything else (the pass stops, and is retried later).
        """
        rank = segment_rank(path.name)
        rank = self.rank if rank is None else rank
        if hasattr(self.client, "send_segment"):  # an object store (pyodlog.sync.s3)
            # The store keeps the SHA-256 it is given as the object's metadata: hash the file.
            sha, size, _ = self._checksum(path, trust_sidecar=False)
            self._send_object(path, rank, sha, size, summary, progress)
            return
        sha, size, recorded = self._checksum(path)
        if recorded:
            try:
                self._send_to_collector(path, rank, sha, size, True, summary, progress, stored)
                return
            except _SidecarDoubt as doubt:
                actual, size, _ = self._checksum(path, trust_sidecar=False)
                if actual != sha:
                    log.warning(
                        "pyodlog: the checksum file of segment %s says SHA-256 %s but the segment "
                        "hashes to %s (%s); sending it with its own SHA-256. The sidecar is stale or "
                        "damaged, or the segment changed after it was closed: check the disk",
                        path.name,
                        sha,
                        actual,
                        doubt,
                    )
                    self.sidecar_mismatches += 1
                sha = actual
        self._send_to_collector(path, rank, sha, size, False, summary, progress, stored)

    def _send_to_collector(
        self,
        path: Path,
        rank: int,
        sha: str,
        size: int,
        recorded: bool,
        summary: UploadSummary,
        progress,
        stored: dict[str, str],
    ) -> None:
        """Sends one segment under ``sha`` (``recorded``: the sidecar's, not yet checked; see :meth:`_send`).

        Raises:
            _SidecarDoubt: ``recorded`` and an answer that rests on the SHA-256 alone.
            _Refused, SyncError: as :meth:`_send`.
        """
        model, version, result = self.names
        client = cast(CollectorClient, self.client)  # an object store went to _send_object
        if path.name in stored:  # the listing answered: no status request for this segment
            status = {"status": "stored", "sha256": stored[path.name]}
        else:  # how much of it the collector has staged (an upload cut off earlier resumes there)
            status = client.status(model, version, result, rank, path.name, sha)
        if status["status"] == "stored":
            if recorded:
                if status.get("sha256") != sha:
                    raise _SidecarDoubt("the collector holds this segment id with another SHA-256")
                self._vouch(path, sha, "the collector holds a segment of this id already")
            if status.get("sha256") != sha:
                raise _Refused(
                    "HTTP 409 checksum_conflict: the collector holds this segment id with another "
                    "SHA-256 than the local file (two different files share one segment id)"
                )
            self.state.acknowledge(path.name, sha, size, self.client.endpoint)
            summary.already_stored += 1
            if progress is not None:
                progress.update(size)
            return
        offset = min(int(status["received"]), size)
        # Whether every byte staged at the collector was sent by this call: only then does the
        # collector's check of the SHA-256 vouch for a SHA-256 read from the sidecar.
        ours = offset == 0
        restarted = False
        if progress is not None:
            progress.update(offset)
        # Pieces of chunk_bytes, at most the largest request body the collector announces, and
        # over TLS at most TLS_PIECE_BYTES (they are read into buffers there, three of them).
        chunk = self.config.chunk_bytes
        largest = status.get("max_request")
        if _is_count(largest) and largest:
            chunk = min(chunk, largest)
        if not client.endpoint.startswith("http://"):
            chunk = min(chunk, TLS_PIECE_BYTES)
        # A collector that keeps answering without progress must not keep us here forever.
        rounds_left = 2 * (size // chunk + 1) + 16
        # A collector that holds a piece until the bytes before it arrived ("ahead", protocol
        # 1.1) gets the next piece while it takes in this one, on a second connection: no pause
        # at the end of every piece. Otherwise one piece after the other.
        ahead = status.get("ahead")
        pool = (
            ThreadPoolExecutor(2, thread_name_prefix="pyodlog-sync-piece")
            if _is_count(ahead) and ahead >= chunk and size - offset > chunk
            else None
        )
        in_flight: dict[int, tuple[memoryview | bytes, Future]] = {}

        def send(at: int, data: memoryview | bytes, follows: int | None = None) -> tuple[int, dict]:
            return client.put_piece(
                model, version, result, rank, path.name, sha, at, size, data, follows
            )

        # Mapped over plain HTTP, read into reused buffers over TLS (see _SegmentBytes).
        buffers = (
            _take_buffers(3 if pool is not None else 1, chunk)
            if not client.endpoint.startswith("http://")
            else None
        )
        with (
            _given_back(buffers),
            _SegmentBytes(path, size, buffers, chunk) as body,
            _settled(pool, in_flight),
        ):
            while True:
                rounds_left -= 1
                if rounds_left < 0:
                    raise SyncError(
                        f"the collector at {self.client.endpoint} makes no progress with {path.name} "
                        "(it keeps asking for bytes it already got); is it a pyodlog collector?"
                    )
                length = min(chunk, size - offset)
                sent = in_flight.pop(offset, None)
                if sent is not None and len(sent[0]) != length:  # not this piece: let it finish
                    with contextlib.suppress(Exception):
                        sent[1].result()
                    sent = None
                piece = sent[0] if sent is not None else body.piece(offset, length)
                if pool is not None:
                    after = offset + length
                    if sent is None:
                        sent = (piece, pool.submit(send, offset, piece))
                    if after < size and after not in in_flight:
                        nxt = body.piece(after, min(chunk, size - after))
                        # Announced: the collector holds it while this piece is on its way.
                        in_flight[after] = (nxt, pool.submit(send, after, nxt, offset))
                    code, answer = sent[1].result()
                else:
                    code, answer = send(offset, piece)
                error = answer.get("error")
                if code != 202 or answer.get("received") != offset + length:
                    _settle(in_flight)  # an answer off the plan: what was sent ahead is moot
                if code in (200, 201):
                    if recorded and (code == 200 or not ours):
                        self._vouch(
                            path,
                            sha,
                            "the collector holds a segment of this id already"
                            if code == 200
                            else "the upload was resumed from bytes sent earlier",
                        )
                    summary.bytes += len(piece) if code == 201 else 0
                    if progress is not None:
                        progress.update(size - offset)
                    break
                if code == 202 or (code == 409 and error == "offset_mismatch"):
                    received = answer.get("received")
                    if not _is_count(received) or received > size:
                        raise SyncError(
                            f"the collector's answer to a piece of {path.name} (HTTP {code}) is "
                            f"malformed: 'received' is {_describe(received)}, not a byte count up to "
                            f"{size}"
                        )
                    if code == 202:
                        summary.bytes += len(piece)
                        if progress is not None:
                            progress.update(len(piece))
                    # Not where our own pieces lead: another sender, or a lost answer.
                    if received != (offset + len(piece) if code == 202 else offset):
                        ours = received == 0
                    offset = received
                    continue
                if code == 422 and error == "checksum_mismatch":
                    if recorded:
                        raise _SidecarDoubt("the collector found another SHA-256 in the bytes")
                    if not restarted:
                        # The bytes were damaged on the way: send once more from the start.
                        restarted, offset, ours = True, 0, True
                        continue
                if code == 409 and error == "checksum_conflict" and recorded:
                    raise _SidecarDoubt("the collector holds this segment id with another SHA-256")
                detail = answer.get("detail", "")
                if code == 413 and error != "segment_too_large":
                    # The piece, not the segment, is too large: every segment would be refused.
                    raise SyncError(
                        f"the collector at {self.client.endpoint} refused a piece of "
                        f"{len(piece)} bytes as too large (HTTP 413 {_describe(error, text=True)}: "
                        f"{_describe(detail, text=True)}); pass a smaller "
                        "SyncConfig(chunk_bytes=...) (or raise the collector's --max-request-bytes)"
                    )
                raise _Refused(
                    f"HTTP {code} {_describe(error, text=True)}: {_describe(detail, text=True)}"
                )
        self.state.acknowledge(path.name, sha, size, self.client.endpoint)
        summary.segments += 1

    def _vouch(self, path: Path, sha: str, why: str) -> None:
        """Hashes the file: the collector's answer (``why``) rests on ``sha``, read from the sidecar.

        Raises:
            _SidecarDoubt: the file does not hash to ``sha``.
        """
        if self._checksum(path, trust_sidecar=False)[0] != sha:
            raise _SidecarDoubt(why)

    def _send_object(
        self, path: Path, rank: int, sha: str, size: int, summary: UploadSummary, progress
    ) -> None:
        """Sends one segment to an object store (:class:`pyodlog.sync.s3.S3Target`)."""
        from pyodlog.sync.s3 import ObjectRefused, S3Target

        assert isinstance(self.client, S3Target)
        try:
            outcome, sent = self.client.send_segment(
                self.names, rank, path, sha, size, self.state, progress
            )
        except ObjectRefused as refusal:
            raise _Refused(str(refusal)) from None
        summary.bytes += sent
        self.state.acknowledge(path.name, sha, size, self.client.endpoint)
        if outcome == "exists":
            summary.already_stored += 1
        else:
            summary.segments += 1

    def _skip_refused(self, names: list[str], summary: UploadSummary, warn: bool) -> None:
        """Reports segments refused earlier; warns about each once per process (``warn``: again)."""
        for name in names:
            reason = self.state.refusal(name)
            summary.refused[name] = reason
            if warn or name not in self._warned:
                self._warned.add(name)
                log.warning(
                    "pyodlog: not sending segment %s: %s refused it earlier (%s); delete %s to try again",
                    name,
                    self.client.endpoint,
                    reason,
                    self.state.refusal_marker(name),
                )

    def sync_once(
        self, own_rank_only: bool = False, progress: bool | None = False, warn_refused: bool = False
    ) -> UploadSummary:
        """Sends every pending segment once; segments refused for good are recorded and skipped.

        ``warn_refused``: warn again about segments refused earlier (``upload()`` does;
        the background thread warns once per process).

        Raises:
            SyncError: a failure that may pass (network, 5xx, the key); the pass stops there.
        """
        summary = UploadSummary()
        start = time.monotonic()
        with self._pass_lock:
            selected = self._selected(own_rank_only)
            acked, refused = self.state.acknowledged_names(), self.state.refused_names()
            summary.sent_earlier = sum(p.name in acked for p in selected)
            self._skip_refused(
                [p.name for p in selected if p.name in refused], summary, warn_refused
            )
            todo = [p for p in selected if p.name not in acked and p.name not in refused]
            summary.pending = len(todo)
            # One listing tells what the collector holds already (e.g. acknowledgements lost with a disk).
            stored = (
                {s["segment_id"]: s["sha256"] for s in self.client.list_segments(*self.names)}
                if todo and not hasattr(self.client, "send_segment")
                else {}
            )
            bar = None
            if progress and todo:
                from tqdm import tqdm

                bar = tqdm(
                    total=sum(p.stat().st_size for p in todo),
                    unit="B",
                    unit_scale=True,
                    desc=f"pyodlog upload {self.names[2]}",
                    file=sys.stderr,
                )
            try:
                for path in todo:
                    try:
                        self._send(path, summary, bar, stored)
                    except _Refused as refusal:
                        reason = self.client.redact(str(refusal))[:400]
                        self.state.refuse(
                            path.name, self._checksum(path, False)[0], reason, self.client.endpoint
                        )
                        self._warned.add(path.name)
                        summary.refused[path.name] = reason
                        log.warning(
                            "pyodlog: %s refused segment %s for good (%s); it is skipped from now on "
                            "(delete %s to try again), the other segments are sent",
                            self.client.endpoint,
                            path.name,
                            reason,
                            self.state.refusal_marker(path.name),
                        )
                    except SyncError:
                        summary.failed.append(path.name)
                        raise
                    summary.pending -= 1
            finally:
                if bar is not None:
                    bar.close()
                summary.seconds = time.monotonic() - start
                for name in ("segments", "bytes", "already_stored"):
                    setattr(self.total, name, getattr(self.total, name) + getattr(summary, name))
        return summary

    def upload_all(self) -> UploadSummary:
        """``logger.upload()``: sends every pending segment of the result (every rank's), and waits."""
        progress = self.config.progress if self.config.progress is not None else sys.stderr.isatty()
        try:
            summary = self.sync_once(own_rank_only=False, progress=progress, warn_refused=True)
        except SyncError as error:
            self.last_error = SyncError(self.client.redact(str(error)))
            raise self.last_error from None
        self.last_error = None
        log.info(
            "pyodlog uploaded %d segments (%d bytes) in %.2f s; %d were already stored, %d sent "
            "earlier, %d refused",
            summary.segments,
            summary.bytes,
            summary.seconds,
            summary.already_stored,
            summary.sent_earlier,
            len(summary.refused),
        )
        return summary

    # -- the background thread ------------------------------------------------------------------------

    def notify(self) -> None:
        """A segment closed (called from the writer thread): send it soon."""
        self._wake.set()

    def _run(self) -> None:
        failures = 0
        while True:
            delay = None
            if failures:
                delay = min(self.config.max_retry_interval, self.config.backoff * 2**failures) * (
                    0.5 + random.random()
                )
                if self._stopping.is_set():
                    delay = min(delay, max(0.0, self._stop_deadline - time.monotonic()))
            self._wake.wait(delay)
            self._wake.clear()
            try:
                self.sync_once(own_rank_only=True)
                failures, self.last_error = 0, None
            except Exception as error:
                error = SyncError(self.client.redact(f"{error}" or error.__class__.__name__))
                if self.last_error is None or str(error) != str(self.last_error):
                    log.warning("pyodlog auto-sync failed, retrying with backoff: %s", error)
                failures, self.last_error = failures + 1, error
            if self._stopping.is_set() and (
                failures == 0 or time.monotonic() >= self._stop_deadline
            ):
                return

    def close(self) -> None:
        """Stops the background thread after a last pass, waiting at most ``close_timeout`` seconds."""
        if self._thread is not None and self._thread.is_alive():
            self._stop_deadline = time.monotonic() + self.config.close_timeout
            self._stopping.set()
            self._wake.set()
            self._thread.join(self.config.close_timeout)
            if self._thread.is_alive() or self.pending(own_rank_only=True):
                log.warning(
                    "pyodlog closed with segments not yet acknowledged by %s; the next logger on this result "
                    "sends them (or call upload())",
                    self.client.endpoint,
                )
        self.client.close()

    def stats(self) -> dict[str, object]:
        """Totals of this process (segments and bytes sent, segments already stored), segments pending and
        refused (recorded on disk), and the last error (redacted of the key)."""
        return {
            "segments_sent": self.total.segments,
            "bytes_sent": self.total.bytes,
            "already_stored": self.total.already_stored,
            "pending": len(self.pending()),
            "refused": len(self.state.refused_names()),
            "last_error": None
            if self.last_error is None
            else self.client.redact(str(self.last_error)),
        }


def _settle(in_flight: dict[int, tuple[memoryview | bytes, Future]]) -> None:
    """Waits for the pieces sent ahead and forgets them (their answers no longer matter)."""
    for _, future in in_flight.values():
        with contextlib.suppress(Exception):
            future.result()
    in_flight.clear()


@contextlib.contextmanager
def _settled(pool: ThreadPoolExecutor | None, in_flight: dict):
    """No piece is still on its way when the segment's pass ends (also when it fails)."""
    try:
        yield
    finally:
        _settle(in_flight)
        if pool is not None:
            pool.shutdown(wait=True)


def _describe(value: object, text: bool = False) -> str:
    """A value from the collector's answer for a message: short strings as they are (``text``), else its type."""
    if text and isinstance(value, str):
        return value  # cut only after redaction (a cut key would escape it)
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return f"a {type(value).__name__}"
