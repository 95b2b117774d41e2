"""The collector's files: staged uploads, verified segments, their metadata.

Layout under the collector's root::

    <tenant>/<model>/<version>/<result>/<segment_id>          a verified segment (pyodlog reads the folder)
    <tenant>/<model>/<version>/<result>/.meta/<segment_id>.json  its rank, SHA-256, size, arrival time
    <tenant>/.staging/<model>/<version>/<result>/<segment_id>.<sha256>.part   an upload in progress

A segment becomes visible only once all its bytes arrived and their SHA-256
matches what the client announced: the staged file is fsynced, its metadata
written (temporary name, fsync, rename), then the file is renamed into place
and the folder fsynced. A staged upload survives a restart of the server, so a
client resumes where the last acknowledged byte ended. Every name was
validated against :data:`pyodlog_protocol.NAME_PATTERN` before it
gets here, so no path leaves the root.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path

from pyodlog_protocol import is_valid_name
from pyodlog_protocol.files import READ_BLOCK, fsync_path, sha256_file
from pyodlog_protocol.layout import META, STAGING, meta_path, stored_segments_in

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start time)

__all__ = ["BodyReadError", "CollectorStorage", "PieceResult", "SegmentKey"]

log = logging.getLogger("pyodlog.collector")
# '<segment id>.<sha256>.part' (an upload in progress) and '<segment id>.<sha256>.<token>.piece'
# (one request's body on its way in).
_STAGED_NAME = re.compile(r"(?P<segment>.+)\.(?P<sha>[0-9a-f]{64})\.part")
_PIECE_NAME = re.compile(r"(?P<segment>.+)\.(?P<sha>[0-9a-f]{64})\.[0-9a-f]{16}\.piece")
# Running SHA-256 states of staged uploads kept at most (a dropped one means one more read at commit).
MAX_RUNNING_HASHES = 4096
# A piece may start this far beyond what is staged; it is held only while a piece before it is on its
# way (being received, or announced by the client with X-Follows-Piece: then it waits at most
# ANNOUNCED_WAIT seconds for that piece to begin arriving). A real gap is answered at once.
AHEAD_BYTES = 256 << 20
ANNOUNCED_WAIT = 5.0
# The longest a piece is held for a piece before it still on its way (a client sending the piece
# before it slowly, or stalled until its connection times out): then it is told where to resume
# (409 with ``received``), so no request waits on another one's timeout.
HOLD_TIMEOUT = 60.0


class BodyReadError(Exception):
    """The request body could not be read (the client went away or stalled): not a storage failure."""


if TYPE_CHECKING:
    # For the type checker only: the collector does not import typing's runtime (start time).
    from typing import Any, BinaryIO, NamedTuple

    class SegmentKey(NamedTuple):
        """Where a segment belongs: tenant, model, version, result, rank and segment id."""

        tenant: str
        model: str
        version: str
        result: str
        rank: int
        segment_id: str

    class PieceResult(NamedTuple):
        """What happened to an uploaded piece: an HTTP status and a JSON body."""

        status: int
        body: dict[str, object]

else:
    SegmentKey = namedtuple("SegmentKey", "tenant model version result rank segment_id")
    SegmentKey.__doc__ = (
        "Where a segment belongs: tenant, model, version, result, rank and segment id."
    )
    PieceResult = namedtuple("PieceResult", "status body")
    PieceResult.__doc__ = "What happened to an uploaded piece: an HTTP status and a JSON body."


class _KeyedLocks:
    """One lock per segment, kept only while someone holds or waits for it (the table never grows)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._entries: dict[tuple[str, ...], list] = {}

    @contextlib.contextmanager
    def hold(self, key: tuple[str, ...]) -> Iterator[None]:
        with self._guard:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = [threading.Lock(), 0]
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._entries[key]

    def __len__(self) -> int:
        with self._guard:
            return len(self._entries)


class SegmentStorageBase:
    """What every collector storage (local folder, S3 bucket) answers the same way.

    The protocol's answers that depend only on whether a segment is stored (and with which
    SHA-256) and on how many bytes of an upload are staged: :meth:`status`, :meth:`check_piece`,
    :meth:`stored_answer`; and the lazily started segment checker. A backend provides
    :meth:`_stored_meta` and :meth:`_received`, and sets ``max_segment_bytes`` and
    ``check_segments`` (and calls :meth:`_init_checker`).
    """

    max_segment_bytes: int
    check_segments: bool
    #: How far beyond what is staged a piece may start: it is held (its body unread) until the
    #: bytes before it arrived on other connections (pieces in flight). 0: refused at once (409).
    ahead_bytes: int = 0

    def _init_checker(self) -> None:
        self._checker = None
        self._checker_lock = threading.Lock()

    def _segment_checker(self):
        with self._checker_lock:
            if self._checker is None:
                from pyodlog_collector.segment_check import SegmentChecker

                self._checker = SegmentChecker()
            return self._checker

    def close(self) -> None:
        """Stops the segment check's worker processes."""
        with self._checker_lock:
            if self._checker is not None:
                self._checker.close()

    def _stored_meta(self, key: SegmentKey) -> dict[str, Any] | None:
        """``{"sha256", "bytes", ...}`` of the stored segment, or None when it is not stored."""
        raise NotImplementedError

    def _received(self, key: SegmentKey, sha256: str) -> int:
        """How many bytes of the upload of ``sha256`` are staged (0: none)."""
        raise NotImplementedError

    @staticmethod
    def stored_answer(meta: dict[str, Any], sha256: str) -> PieceResult:
        """The answer to a piece of a segment that is already stored: the same SHA-256 is "exists",
        another one a ``checksum_conflict``."""
        if meta["sha256"] == sha256:
            return PieceResult(
                200, {"status": "exists", "sha256": sha256, "received": meta["bytes"]}
            )
        return PieceResult(
            409,
            {
                "error": "checksum_conflict",
                "detail": "this segment id is stored with another SHA-256",
                "sha256": meta["sha256"],
            },
        )

    def status(self, key: SegmentKey, sha256: str | None) -> dict[str, object]:
        """Whether the segment is stored (and with which checksum), or how many bytes of it are staged.

        Takes no lock: an upload in progress (even a stalled one) never delays it.
        The metadata is in place before the segment becomes visible, so a visible
        segment always has it.
        """
        meta = self._stored_meta(key)
        if meta is not None:
            return {
                "status": "stored",
                "sha256": meta["sha256"],
                "bytes": meta["bytes"],
                "received": meta["bytes"],
            }
        if sha256 is None:
            return {"status": "absent", "received": 0}
        received = self._received(key, sha256)
        return {"status": "partial" if received else "absent", "received": received}

    def check_piece(
        self,
        key: SegmentKey,
        sha256: str,
        offset: int,
        total: int,
        length: int,
        ahead: bool = False,
    ) -> PieceResult | None:
        """The answer to a piece that is refused (or not needed) before its body is read, else None.

        ``ahead``: a piece up to :attr:`ahead_bytes` beyond what is staged passes (it waits
        for the bytes before it); otherwise a piece beyond what is staged is a 409.
        """
        if total > self.max_segment_bytes:
            return PieceResult(
                413,
                {
                    "error": "segment_too_large",
                    "detail": f"total {total} is above this collector's "
                    f"--max-segment-bytes {self.max_segment_bytes}",
                    "max_segment_bytes": self.max_segment_bytes,
                },
            )
        if offset + length > total:
            return PieceResult(
                400,
                {
                    "error": "bad_range",
                    "detail": f"offset {offset} + {length} bytes > total {total}",
                },
            )
        meta = self._stored_meta(key)
        if meta is not None:
            return self.stored_answer(meta, sha256)
        received = self._received(key, sha256)
        if offset > received + (self.ahead_bytes if ahead else 0):
            return PieceResult(409, {"error": "offset_mismatch", "received": received})
        return None


class CollectorStorage(SegmentStorageBase):
    """Stores uploaded segments under ``root``, one folder tree per tenant.

    Args:
        root: the collector's data folder (created if missing).
        max_segment_bytes: the largest segment accepted (announced ``total``).
        ahead_bytes: how far beyond what is staged a piece may start; it is held (its body
            unread) only while a piece before it is on its way, else it is a 409 at once.
        announced_wait: how long a piece announced as following another one
            (``X-Follows-Piece``) waits for that piece to begin arriving.
        hold_timeout: the longest a piece is held while a piece before it is on its way; then it
            is answered 409 ``offset_mismatch`` with ``received`` (the client resumes there).
        check_segments: check each complete upload with
            :func:`pyodlog_collector.segment_check.check_segment` (in a worker process)
            before it becomes visible (refused with 422 ``invalid_segment`` otherwise).
    """

    def __init__(
        self,
        root: str | Path,
        max_segment_bytes: int = 8 << 30,
        check_segments: bool = True,
        ahead_bytes: int = AHEAD_BYTES,
        announced_wait: float = ANNOUNCED_WAIT,
        hold_timeout: float = HOLD_TIMEOUT,
    ) -> None:
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_segment_bytes = int(max_segment_bytes)
        self.check_segments = check_segments
        self._locks = _KeyedLocks()
        self._init_checker()
        # (tenant, model, version, result, segment id, sha256) -> (SHA-256 of the staged bytes so far,
        # how many): each piece is hashed as it arrives, so a complete upload is not read again to be
        # verified. Replaced (never changed in place) under the segment's lock; dropped whenever the
        # staged file changes in any other way. A restart forgets them: the commit then hashes the file.
        self._running: dict[tuple[str, ...], tuple[Any, int]] = {}
        self._running_guard = threading.Lock()
        # Upload id -> the inode of the staged file that one request is appending its body to
        # (see _append_piece); read and changed under the segment's lock.
        self._appenders: dict[tuple[str, ...], int] = {}
        # Pieces in flight wait for the staged uploads to grow: every change is a new generation.
        self.ahead_bytes, self.announced_wait = int(ahead_bytes), float(announced_wait)
        self.hold_timeout = float(hold_timeout)
        self._progress = threading.Condition()
        self._generation = 0
        # Upload id -> the offsets of its pieces inside write_piece now (received, or held), and the
        # offsets of every piece that began while any was inside; under self._progress, dropped
        # when the last one leaves.
        self._arriving: dict[tuple[str, ...], tuple[list[int], set[int]]] = {}

    # -- paths -----------------------------------------------------------------------------------

    def result_dir(self, tenant: str, model: str, version: str, result: str) -> Path:
        return self.root / tenant / model / version / result

    def _final(self, key: SegmentKey) -> Path:
        return self.result_dir(key.tenant, key.model, key.version, key.result) / key.segment_id

    def _meta(self, key: SegmentKey) -> Path:
        return meta_path(self._final(key))

    def _staging_dir(self, key: SegmentKey) -> Path:
        return self.root / key.tenant / STAGING / key.model / key.version / key.result

    def _staged(self, key: SegmentKey, sha256: str) -> Path:
        return self._staging_dir(key) / f"{key.segment_id}.{sha256}.part"

    def _lock(self, key: SegmentKey):
        return self._locks.hold((key.tenant, key.model, key.version, key.result, key.segment_id))

    @staticmethod
    def _upload_id(key: SegmentKey, sha256: str) -> tuple[str, ...]:
        return (key.tenant, key.model, key.version, key.result, key.segment_id, sha256)

    def _running_hash(self, key: SegmentKey, sha256: str) -> tuple[Any, int] | None:
        with self._running_guard:
            return self._running.get(self._upload_id(key, sha256))

    def _set_running_hash(
        self, key: SegmentKey, sha256: str, state: tuple[Any, int] | None
    ) -> None:
        """Under the segment's lock: records (or, with None, forgets) the staged upload's running hash."""
        upload = self._upload_id(key, sha256)
        with self._running_guard:
            self._running.pop(upload, None)
            if state is not None:
                while len(self._running) >= MAX_RUNNING_HASHES:  # the oldest go first
                    del self._running[next(iter(self._running))]
                self._running[upload] = state

    def _stored_meta(self, key: SegmentKey) -> dict[str, object] | None:
        if not self._final(key).exists():
            return None
        try:
            return json.loads(self._meta(key).read_text())
        except (OSError, ValueError):
            # Written before the segment was renamed into place, so this means damage: recompute.
            return {
                "segment_id": key.segment_id,
                "rank": key.rank,
                "sha256": sha256_file(self._final(key)),
                "bytes": self._final(key).stat().st_size,
            }

    def _received(self, key: SegmentKey, sha256: str) -> int:
        try:
            return self._staged(key, sha256).stat().st_size
        except FileNotFoundError:
            return 0

    # -- the protocol's operations -----------------------------------------------------------------

    def write_piece(
        self,
        key: SegmentKey,
        sha256: str,
        offset: int,
        total: int,
        body: BinaryIO | io.BufferedIOBase,
        length: int,
        follows: int | None = None,
    ) -> PieceResult:
        """Writes ``length`` bytes read from ``body`` at ``offset`` of the segment's ``total`` bytes.

        A piece that continues the staged upload at its end goes straight into the
        staged file (:meth:`_append_piece`): no copy. Any other piece goes to a file
        of its own first; only then, under the segment's lock, it joins the staged
        upload. Neither holds a lock while the body arrives, so a slow or stalled
        client delays nobody. Repeating a piece is harmless: a piece at an offset
        below what is staged overwrites the same bytes.

        A piece that starts beyond what is staged (by at most ``ahead_bytes``: pieces
        in flight on several connections) is held, its body unread, only while a piece
        of the same upload that starts before it is inside this method (being received,
        or itself held), and, when the client announced the piece it follows
        (``follows``: that piece's offset), up to ``announced_wait`` seconds for that
        piece to begin arriving. Otherwise, and as soon as none of that holds any
        more, it is refused (409, with ``received``) so the client resumes at the
        right place: a real gap is answered at once. Every byte is hashed as it
        arrives, so the commit does not read the upload again (unless a restart or
        overlapping pieces lost the running hash).

        Raises:
            BodyReadError: the body could not be read (what arrived of a piece appended to the
                staged upload stays staged; nothing of any other).
            OSError: the collector cannot write.
        """
        upload = self._upload_id(key, sha256)
        with self._progress:
            active, begun = self._arriving.setdefault(upload, ([], set()))
            active.append(offset)
            begun.add(offset)
            self._generation += 1
            self._progress.notify_all()
        try:
            early = self.check_piece(key, sha256, offset, total, length, ahead=True)
            if early is None and offset:
                early = self._wait_for_predecessors(key, sha256, offset, total, length, follows)
            if early is not None:
                self._drop_body(body, length)
                return early
            return self._receive(key, sha256, offset, total, body, length)
        finally:
            with self._progress:  # pieces waiting for this one look again
                active.remove(offset)
                if not active:
                    del self._arriving[upload]
                self._generation += 1
                self._progress.notify_all()

    def _wait_for_predecessors(
        self,
        key: SegmentKey,
        sha256: str,
        offset: int,
        total: int,
        length: int,
        follows: int | None = None,
    ) -> PieceResult | None:
        """Holds a piece ahead (no lock held, the body unread) while a piece before it is on its way.

        Returns None once the staged upload reaches ``offset`` and no piece before it is inside
        :meth:`write_piece` any more; else the answer: 409
        ``offset_mismatch`` as soon as no piece before it is inside :meth:`write_piece`
        (and the announced one, ``follows``, began or did not begin within
        ``announced_wait`` seconds), or the segment was stored meanwhile. Held
        ``hold_timeout`` seconds at most: then it goes on if the bytes before it are staged
        (a copy of the staged file, rather than an append), else it is that 409.
        """
        upload = self._upload_id(key, sha256)
        announced = follows is not None and follows < offset
        started = time.monotonic()
        deadline = started + self.announced_wait
        give_up = started + self.hold_timeout
        while True:
            with self._progress:
                generation = self._generation
                active, begun = self._arriving.get(upload, ([], set()))
                before = any(o < offset for o in active)
                awaited = announced and follows not in begun
            early = self.check_piece(key, sha256, offset, total, length)
            now = time.monotonic()
            left, held_left = deadline - now, give_up - now
            if held_left <= 0:
                before = False  # held long enough: a piece before it still on its way is slow
            if early is None:
                # The bytes before it are staged; it goes on once no piece before it is still
                # being written (so it appends, rather than copying the staged file).
                if not before:
                    return None
            elif early.body.get("error") != "offset_mismatch" or (
                not before and not (awaited and left > 0 and held_left > 0)
            ):
                return early  # stored meanwhile, or nothing before it is on its way any more
            with self._progress:
                if self._generation == generation:
                    self._progress.wait(min(left, held_left) if not before else held_left)

    @staticmethod
    def _drop_body(body: BinaryIO | io.BufferedIOBase, length: int) -> None:
        """Reads a body that is not used, so the connection stays in step with the client."""
        left = length
        while left:
            try:
                block = body.read(min(READ_BLOCK, left))
            except OSError as error:
                raise BodyReadError(
                    f"reading the body failed after {length - left} of {length} bytes "
                    f"({error.__class__.__name__})"
                ) from None
            if not block:
                raise BodyReadError(f"the client sent {length - left} of {length} bytes")
            left -= len(block)

    def _receive(
        self,
        key: SegmentKey,
        sha256: str,
        offset: int,
        total: int,
        body: BinaryIO | io.BufferedIOBase,
        length: int,
    ) -> PieceResult:
        """:meth:`write_piece` for a piece that starts within what is staged."""
        appended = self._append_piece(key, sha256, offset, total, body, length)
        if appended is not None:
            return appended
        folder = self._staging_dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        piece = folder / f"{key.segment_id}.{sha256}.{os.urandom(8).hex()}.piece"
        # The piece continues the running hash of what is staged, if it starts where that ends.
        base = self._running_hash(key, sha256) if offset else None
        running = (
            hashlib.sha256()
            if offset == 0
            else base[0].copy()
            if base and base[1] == offset
            else None
        )
        try:
            with open(piece, "wb") as f:
                left = length
                while left:
                    try:
                        block = body.read(min(READ_BLOCK, left))
                    except OSError as error:  # a timeout or a reset: the client's side
                        raise BodyReadError(
                            f"reading the body failed after {length - left} of {length} bytes "
                            f"({error.__class__.__name__})"
                        ) from None
                    if not block:
                        raise BodyReadError(f"the client sent {length - left} of {length} bytes")
                    f.write(block)
                    if running is not None:
                        running.update(block)  # releases the GIL, like the write
                    left -= len(block)
            with self._lock(key):
                # Still the state this piece continues (no other piece was applied meanwhile)?
                if offset and (base is None or self._running_hash(key, sha256) is not base):
                    running = None
                return self._apply(key, sha256, offset, total, piece, length, running)
        finally:
            with contextlib.suppress(FileNotFoundError):
                piece.unlink()

    def _append_piece(
        self,
        key: SegmentKey,
        sha256: str,
        offset: int,
        total: int,
        body: BinaryIO | io.BufferedIOBase,
        length: int,
    ) -> PieceResult | None:
        """Writes a piece that starts where the staged upload ends straight into the staged file.

        The first piece (offset 0, nothing staged) creates the staged file. One
        request at a time per upload appends (it is registered, under the
        segment's lock, with the staged file's inode); it holds no lock while its
        body arrives. A piece that arrives meanwhile takes the other way, and
        replaces the staged file with a copy rather than changing it in place
        (:meth:`_apply`): an appender whose file was replaced wrote into a file
        nobody sees any more, and answers with what is staged now. A body that
        breaks off (the client went away or stalled) keeps what arrived of it
        staged, hashed: the client resumes at that byte, so the size of a piece
        costs nothing when a connection fails (a write that fails cuts the piece
        off again). Returns None when the piece cannot be appended now (not at
        the end, or another request is appending): the caller takes the other way.

        Raises:
            BodyReadError: the body could not be read.
            OSError: the collector cannot write.
        """
        upload = self._upload_id(key, sha256)
        staged = self._staged(key, sha256)
        with self._lock(key):
            if upload in self._appenders:
                return None
            try:
                fd = os.open(staged, os.O_WRONLY)
            except FileNotFoundError:
                if offset:
                    return None
                staged.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                info = os.fstat(fd)
                if info.st_size != offset:
                    os.close(fd)
                    return None
            except OSError:
                os.close(fd)
                raise
            base = self._running_hash(key, sha256)
            if base is not None and base[1] != offset:
                base = None
            self._appenders[upload] = info.st_ino
            self._set_running_hash(key, sha256, None)  # the staged file changes now
        running = base[0].copy() if base is not None else hashlib.sha256() if not offset else None
        failure: BodyReadError | None = None
        written = 0
        try:
            while written < length:
                try:
                    block = body.read(min(READ_BLOCK, length - written))
                except OSError as error:  # a timeout or a reset: the client's side
                    failure = BodyReadError(
                        f"reading the body failed after {written} of {length} bytes "
                        f"({error.__class__.__name__})"
                    )
                    break
                if not block:
                    failure = BodyReadError(f"the client sent {written} of {length} bytes")
                    break
                view = memoryview(block)
                while view:
                    n = os.pwrite(fd, view, offset + written)
                    view, written = view[n:], written + n
                if running is not None:
                    running.update(block)  # releases the GIL, like the write
        except BaseException:
            with self._lock(key):
                self._end_append(upload, fd, staged, info.st_ino, offset, base, cut=True)
            raise
        with self._lock(key):
            ours = self._end_append(
                upload,
                fd,
                staged,
                info.st_ino,
                offset,
                base,
                cut=failure is not None and not written,
            )
            if failure is not None:
                # What arrived stays staged (every block was written whole, then hashed).
                if ours and written and running is not None:
                    self._set_running_hash(key, sha256, (running, offset + written))
                raise failure
            if not ours:  # replaced meanwhile: these bytes went nowhere
                meta = self._stored_meta(key)
                if meta is not None:
                    return self.stored_answer(meta, sha256)
                received = self._received(key, sha256)
                return PieceResult(202, {"status": "partial", "received": received})
            received = offset + length
            if received < total:
                if running is not None:
                    self._set_running_hash(key, sha256, (running, received))
                return PieceResult(202, {"status": "partial", "received": received})
            return self._commit(key, staged, sha256, total, running)

    def _end_append(
        self,
        upload: tuple[str, ...],
        fd: int,
        staged: Path,
        inode: int,
        offset: int,
        base: tuple[Any, int] | None,
        cut: bool,
    ) -> bool:
        """Under the segment's lock: ends an append; ``cut``: drops what it wrote. Whether the file it
        appended to is still the staged one."""
        self._appenders.pop(upload, None)
        try:
            try:
                ours = os.stat(staged).st_ino == inode
            except FileNotFoundError:
                ours = False
            if ours and cut:
                os.ftruncate(fd, offset)
                if base is not None:
                    self._set_running_hash(*self._key_of(upload), base)
        finally:
            os.close(fd)
        return ours

    @staticmethod
    def _key_of(upload: tuple[str, ...]) -> tuple[SegmentKey, str]:
        tenant, model, version, result, segment_id, sha256 = upload
        return SegmentKey(tenant, model, version, result, 0, segment_id), sha256

    def _apply(
        self,
        key: SegmentKey,
        sha256: str,
        offset: int,
        total: int,
        piece: Path,
        length: int,
        running: Any = None,
    ) -> PieceResult:
        """Under the segment's lock: adds a received piece to the staged upload; commits when complete.

        ``running``: the SHA-256 of the staged bytes before ``offset`` and of the piece,
        when known (see :meth:`write_piece`); else the commit reads the staged file.
        """
        early = self.check_piece(key, sha256, offset, total, length)  # again: others ran meanwhile
        if early is not None:
            return early
        self._set_running_hash(key, sha256, None)  # the staged file changes now
        staged = self._staged(key, sha256)
        if offset == 0:
            os.replace(piece, staged)  # the same as truncating to 0 and writing the piece
        elif self._upload_id(key, sha256) in self._appenders:
            # Another request is appending to the staged file: leave that file alone, stage a copy.
            copy = piece.with_name(f"{key.segment_id}.{sha256}.{os.urandom(8).hex()}.piece")
            try:
                with open(copy, "wb") as f, open(staged, "rb") as old, open(piece, "rb") as src:
                    left = offset
                    while left:
                        block = old.read(min(READ_BLOCK, left))
                        if not block:
                            raise OSError(f"the staged upload is shorter than {offset} bytes")
                        f.write(block)
                        left -= len(block)
                    shutil.copyfileobj(src, f, READ_BLOCK)
                os.replace(copy, staged)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    copy.unlink()
        else:
            with open(staged, "r+b") as f, open(piece, "rb") as src:
                f.truncate(offset)
                f.seek(offset)
                shutil.copyfileobj(src, f, READ_BLOCK)
        received = offset + length
        if received < total:
            if running is not None:
                self._set_running_hash(key, sha256, (running, received))
            return PieceResult(202, {"status": "partial", "received": received})
        return self._commit(key, staged, sha256, total, running)

    def _commit(
        self, key: SegmentKey, staged: Path, sha256: str, total: int, running: Any = None
    ) -> PieceResult:
        # Every byte was hashed as it arrived (one pass), or, after a restart or an overlap, is read now.
        actual = running.hexdigest() if running is not None else sha256_file(staged)
        if actual != sha256:
            staged.unlink()
            return PieceResult(
                422,
                {
                    "error": "checksum_mismatch",
                    "detail": "the bytes received do not have the "
                    "announced SHA-256; upload the segment again",
                    "received_sha256": actual,
                },
            )
        if self.check_segments:
            error = self._segment_checker().check(staged)  # in a worker process
            if error is not None:
                staged.unlink()
                log.warning(
                    "refused segment %s/%s/%s/%s/%s: %s",
                    key.tenant,
                    key.model,
                    key.version,
                    key.result,
                    key.segment_id,
                    error,
                )
                return PieceResult(
                    422,
                    {
                        "error": "invalid_segment",
                        "detail": f"not a pyodlog segment: {error}",
                    },
                )
        fsync_path(staged)
        meta_path = self._meta(key)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = meta_path.with_name(meta_path.name + ".tmp")
        meta = {
            "segment_id": key.segment_id,
            "rank": key.rank,
            "sha256": sha256,
            "bytes": total,
            "received_at": time.time(),
        }
        with open(tmp, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, meta_path)
        final = self._final(key)
        os.replace(staged, final)  # visible only now, verified and durable
        fsync_path(meta_path.parent)
        fsync_path(final.parent)
        # Uploads of this id with another SHA-256 can never be stored now: drop what they staged.
        for other in self._files(self._staging_dir(key)):
            match = _STAGED_NAME.fullmatch(other.name)
            if match and match["segment"] == key.segment_id:
                self._set_running_hash(key, match["sha"], None)
                with contextlib.suppress(FileNotFoundError):
                    other.unlink()
        return PieceResult(201, {"status": "stored", "sha256": sha256, "received": total})

    def expire_staged(
        self, ttl: float, now: float | None = None, piece_ttl: float | None = None
    ) -> int:
        """Removes staged uploads untouched for ``ttl`` seconds, and request bodies for ``piece_ttl``.

        Abandoned uploads and the losers of concurrent uploads would otherwise
        stay forever. A request body in progress is removed by its request; one
        left by a crash goes after ``piece_ttl`` (default ``ttl``; the server
        passes at least its request timeout, so no body still arriving is
        removed). Returns how many files were removed.
        """
        now = time.time() if now is None else now
        cutoff = now - ttl
        piece_cutoff = now - (ttl if piece_ttl is None else max(ttl, piece_ttl))
        removed = 0
        for tenant_dir in self._dirs(self.root):
            staging = tenant_dir / STAGING
            for folder in self._dirs(staging, depth=3):
                model, version, result = folder.relative_to(staging).parts
                for entry in self._files(folder):
                    match = _STAGED_NAME.fullmatch(entry.name)
                    limit = cutoff
                    if match is None:
                        match, limit = _PIECE_NAME.fullmatch(entry.name), piece_cutoff
                    if match is None or not is_valid_name(match["segment"]):
                        continue
                    key = SegmentKey(tenant_dir.name, model, version, result, 0, match["segment"])
                    with self._lock(key):
                        try:
                            if entry.stat().st_mtime >= limit:
                                continue
                            if entry.name.endswith(".part"):
                                self._set_running_hash(key, match["sha"], None)
                            entry.unlink()
                        except FileNotFoundError:
                            continue
                    removed += 1
                    log.info(
                        "expired staged upload %s/%s/%s/%s/%s (untouched for more than %gs)",
                        tenant_dir.name,
                        model,
                        version,
                        result,
                        match["segment"],
                        ttl,
                    )
        return removed

    @staticmethod
    def _dirs(folder: Path, depth: int = 1) -> list[Path]:
        """Sub-folders ``depth`` levels down whose names are valid names (never a symlink)."""
        level = [folder]
        for _ in range(depth):
            nxt = []
            for parent in level:
                try:
                    entries = list(os.scandir(parent))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                nxt += [
                    Path(e.path)
                    for e in entries
                    if e.is_dir(follow_symlinks=False) and is_valid_name(e.name)
                ]
            level = nxt
        return level

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        try:
            return [Path(e.path) for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    def content_path(self, key: SegmentKey) -> Path | None:
        """The stored segment's file, or None."""
        final = self._final(key)
        return final if final.is_file() else None

    def list_segments(
        self, tenant: str, model: str, version: str, result: str
    ) -> list[dict[str, object]]:
        """The verified segments of one result."""
        out = []
        for segment in stored_segments_in(self.result_dir(tenant, model, version, result)):
            try:
                out.append(json.loads(meta_path(segment).read_text()))
            except ValueError:
                continue
        return out

    def list_results(self, tenant: str) -> list[dict[str, object]]:
        """Every result of a tenant with its segment count and bytes."""
        base = self.root / tenant
        out = []
        for result_dir in self._dirs(base, depth=3):
            if not (result_dir / META).is_dir():
                continue
            model, version, result = result_dir.relative_to(base).parts
            segments = self.list_segments(tenant, model, version, result)
            out.append(
                {
                    "model": model,
                    "version": version,
                    "result": result,
                    "segments": len(segments),
                    "bytes": sum(int(str(s["bytes"])) for s in segments),
                }
            )
        return sorted(out, key=lambda r: (r["model"], r["version"], r["result"]))

    def tenants(self) -> list[str]:
        return sorted(p.name for p in self._dirs(self.root))
