"""A local disk budget for a result folder: what may be deleted to stay under it, and when new records are dropped.

Two different things happen when a result folder reaches its budget, and only one of them deletes:

* **Acknowledged segments** (closed segments the collector or object store confirmed it holds,
  ``<result>/.sync/<endpoint id>/<segment>.ack``) are deleted oldest first until the folder fits
  again (and, with ``max_age``, once they are older than that). Their records are safe elsewhere.
* **Unacknowledged data is never deleted to make room** (the default). When it alone fills the
  budget, new records are dropped before they are written (reason ``"disk_budget"`` in
  ``logger.stats()["dropped_by_reason"]``), so the disk never fills; logging resumes by itself once
  the collector acknowledges segments (which can then be deleted). Only
  ``Retention(drop_unsynced=True)`` deletes unacknowledged closed segments, oldest first, and
  counts them (``segments_dropped_unsynced``).

A logger without a collector (local only) has no acknowledged segment: nothing is ever deleted
(unless ``drop_unsynced=True``); over its budget, new records are dropped and counted.

The budget is enforced on the writer thread before each append (an upper bound of the bytes the
append adds is checked against the folder's size: this process's writer never takes the folder
over its budget) and re-checked by a small background thread every ``check_interval`` seconds, when
a segment closes and when the collector acknowledges one. Other processes writing the same result
are seen at those re-checks. The inference path reads one boolean (:attr:`RetentionGuard.over_budget`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyodlog._checks import check_number
from pyodlog.io.columns import ColumnBatch
from pyodlog.io.segment import _rows_per_chunk

__all__ = [
    "DEFAULT_FREE_FRACTION",
    "DEFAULT_MAX_LOCAL_BYTES",
    "Retention",
    "RetentionGuard",
    "append_bound",
    "default_budget",
]

log = logging.getLogger("pyodlog")

#: The default budget is at most this many bytes per result folder ...
DEFAULT_MAX_LOCAL_BYTES = 10 << 30
#: ... and at most this fraction of the file system's free space when the logger starts (plus
#: what the result folder already holds).
DEFAULT_FREE_FRACTION = 0.25
# At most one "budget full" or "deleted" line per this many seconds (the counts are in stats()).
LOG_INTERVAL = 60.0
# HDF5 metadata, the checksum file, the B-tree growth of one append: added to every bound.
_METADATA_SLACK = 256 << 10


@dataclass(frozen=True)
class Retention:
    """How much local disk a result folder may use, and what may be deleted to stay under it.

    Args:
        max_local_bytes: the budget of the result folder in bytes (every file under it: closed
            and open segments, checksums, quarantine, sync markers). None: the default,
            ``min(10 GiB, 25 % of the free space of the data root's file system when the logger
            starts + what the result folder already holds)``.
        max_age: delete acknowledged segments once they are older than this many seconds (since
            they were closed), even under the budget. None: only the budget deletes.
        delete_after_sync: True: segments acknowledged by the collector may be deleted (oldest
            first, only as needed to stay under the budget, or once older than ``max_age``).
            False: nothing acknowledged is deleted; the budget then only drops new records.
        drop_unsynced: opt-in: when acknowledged segments are not enough, delete the oldest
            closed segments that were *not* acknowledged (their records are lost; counted in
            ``stats()["segments_dropped_unsynced"]``), so new records keep being written. Works
            for local-only loggers too (the folder becomes a ring buffer). Default False: new
            records are dropped instead (``dropped_by_reason["disk_budget"]``).
        check_interval: seconds between background re-checks (other processes' segments,
            ``max_age``, acknowledgements that arrive while nothing is written).

    Raises:
        ValueError: a value of the wrong type or not positive.
    """

    max_local_bytes: int | None = None
    max_age: float | None = None
    delete_after_sync: bool = True
    drop_unsynced: bool = False
    check_interval: float = 5.0

    def __post_init__(self) -> None:
        if self.max_local_bytes is not None and (
            isinstance(self.max_local_bytes, bool)
            or not isinstance(self.max_local_bytes, (int, np.integer))
            or self.max_local_bytes < 1
        ):
            raise ValueError(
                f"Retention(max_local_bytes=...) must be a positive number of bytes (an int, e.g. "
                f"20 << 30 for 20 GiB) or None for the default, got {self.max_local_bytes!r}"
            )
        if self.max_age is not None:
            check_number(self.max_age, "Retention(max_age=...) (seconds)")
        check_number(self.check_interval, "Retention(check_interval=...) (seconds)")
        for name in ("delete_after_sync", "drop_unsynced"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"Retention({name}=...) must be True or False, got {getattr(self, name)!r}"
                )


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_bytes(directory: Path) -> int:
    """The bytes of every regular file under ``directory`` (symbolic links are not followed)."""
    total = 0
    stack = [Path(directory)]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
    return total


def default_budget(directory: Path) -> int:
    """``min(10 GiB, 25 % of the free space where directory lives + what directory holds now)``."""
    free = shutil.disk_usage(_existing_ancestor(directory)).free
    return int(min(DEFAULT_MAX_LOCAL_BYTES, folder_bytes(directory) + DEFAULT_FREE_FRACTION * free))


def _chunk_bytes(name: str, row_bytes: int) -> int:
    # The segment's own rule; without the call's size it is the largest chunk the column can get.
    return _rows_per_chunk(name, row_bytes) * max(row_bytes, 1)


def append_bound(batch: ColumnBatch, new_segment: bool) -> int:
    """An upper bound of the bytes appending ``batch`` adds to a segment file.

    Its bytes, plus one whole chunk per column (columns are written in whole chunks: a partial
    last chunk is written whole, and rows that cross into a new chunk allocate all of it), plus
    HDF5 metadata (``new_segment``: the file's own, too).
    """
    total = batch.nbytes + _METADATA_SLACK
    chunks = 0
    for name, pieces in batch.numeric.items():
        if pieces:
            first = pieces[0]
            chunks += _chunk_bytes(name, int(first.dtype.itemsize * np.prod(first.shape[1:])))
    for name, texts in batch.strings.items():
        total += sum(len(t) for t in texts) * 4  # UTF-8: at most 4 bytes a character
        total += 16 * len(texts)  # spans
        chunks += _chunk_bytes(name + ".bytes", 1) + _chunk_bytes(name + ".spans", 16)
    chunks += _chunk_bytes("features_payload", 1) + 2 * _chunk_bytes("features_scale", 4)
    return total + chunks + (_METADATA_SLACK if new_segment else 0)


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class RetentionGuard:
    """Keeps one result folder under its budget (one per :class:`~pyodlog.io.store.HDF5Store`).

    The writer thread calls :meth:`admit` before each append and :meth:`appended` after it; the
    store's segment listener calls :meth:`closed`; sources of acknowledgements are added with
    :meth:`add_ack_source` and call :meth:`notify` when they acknowledge. :attr:`over_budget` is
    what the inference path (and a sampler) reads.

    Args:
        directory: the result folder.
        policy: the :class:`Retention`.
    """

    def __init__(self, directory: Path, policy: Retention) -> None:
        self.directory = Path(directory)
        self.policy = policy
        self.budget = (
            int(policy.max_local_bytes)
            if policy.max_local_bytes is not None
            else default_budget(self.directory)
        )
        self._lock = threading.RLock()
        self._sources: list[Callable[[], set[str]]] = []
        #: True while new records are dropped at the sink because unacknowledged data fills the budget.
        self.over_budget = False
        self._needed = 0  # what the last refused append needed
        self._others = 0  # every file of the folder but this writer's open segment (last scan)
        self._part: Path | None = None  # this writer's open segment and its size
        self._part_size = 0
        self.segments_deleted = 0
        self.bytes_deleted = 0
        self.segments_dropped_unsynced = 0
        self.bytes_dropped_unsynced = 0
        self.refused_appends = 0
        self.last_error: str | None = None
        self._last_log: dict[str, float] = {}
        self._episode_drops = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.drop_count: Callable[[], int] = lambda: (
            0
        )  # the sink's disk_budget drops, for log lines
        with self._lock:
            self._scan()

    # -- sources of acknowledgements ----------------------------------------------------------------

    def add_ack_source(self, acknowledged: Callable[[], set[str]]) -> None:
        """Adds a source of acknowledged segment names (e.g. a syncer's ``state.acknowledged_names``).

        With several sources a segment counts as acknowledged only when every one of them
        acknowledged it.
        """
        with self._lock:
            self._sources.append(acknowledged)
        self.notify()

    def acknowledged(self) -> set[str]:
        """Names of the segments every source acknowledged (empty without a source: nothing is deletable)."""
        with self._lock:
            sources = list(self._sources)
        names: set[str] | None = None
        for source in sources:
            got = set(source())
            names = got if names is None else names & got
        return names or set()

    # -- the writer's side ------------------------------------------------------------------------------

    @property
    def used(self) -> int:
        """The folder's bytes as this guard counts them (last scan + this writer's open segment)."""
        return self._others + self._part_size

    def admit(self, nbytes: int) -> bool:
        """Whether an append adding at most ``nbytes`` fits; makes room (deletes) first if needed.

        Called on the writer thread. False: the caller drops the batch (and counts it).
        """
        with self._lock:
            if self.used + nbytes <= self.budget:
                return True
            self._enforce(nbytes)
            if self.used + nbytes <= self.budget:
                return True
            self.refused_appends += 1
            self._needed = nbytes
            self._set_over_budget(True)
            return False

    def appended(self, part: Path) -> None:
        """After an append: this writer's open segment is ``part`` (its size is read now)."""
        with self._lock:
            self._part = Path(part)
            try:
                self._part_size = self._part.stat().st_size
            except FileNotFoundError:
                self._part_size = 0

    def closed(self, path: Path) -> None:
        """A segment of this writer closed (``.part`` renamed to ``path``); re-check soon."""
        with self._lock:
            if self._part is not None and path.name + ".part" == self._part.name:
                self._part, self._part_size = None, 0
            self._scan()
        self.notify()

    # -- the background re-check ------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the background re-check thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"pyodlog-retention-{self.directory.name}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stops the background thread (idempotent)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    def notify(self) -> None:
        """Something changed (a segment closed, one was acknowledged): re-check soon."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.policy.check_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check()
            except Exception as error:  # never dies: the next check tries again
                self.last_error = f"{type(error).__name__}: {error}"
                self._log("error", log.error, "pyodlog's retention check failed: %s", error)

    def check(self) -> None:
        """Re-measures the folder, deletes what the policy allows and needs, updates :attr:`over_budget`."""
        with self._lock:
            self._enforce(self._needed if self.over_budget else 0)
            if self.over_budget:
                if self.used + self._needed <= self.budget:
                    self._set_over_budget(False)
                else:
                    self._report_full()

    # -- measuring and deleting -------------------------------------------------------------------------

    def _scan(self) -> list[tuple[Path, int, float]]:
        """Measures the folder; returns its closed segments (path, bytes with checksum, mtime), oldest first."""
        others = 0
        segments = []
        part_name = self._part.name if self._part is not None else None
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    others += folder_bytes(Path(entry.path))
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.name == part_name:
                self._part_size = stat.st_size
                continue
            others += stat.st_size
            if entry.name.endswith(".h5"):
                segments.append((Path(entry.path), stat.st_size, stat.st_mtime))
        self._others = others
        segments.sort(key=lambda s: s[0].name)  # names sort in creation order
        return segments

    def _enforce(self, need: int) -> None:
        segments = self._scan()
        policy = self.policy
        if not segments:
            return
        acked = self.acknowledged()
        deletable = [s for s in segments if s[0].name in acked] if policy.delete_after_sync else []
        deleted: list[tuple[Path, int, float]] = []
        if policy.max_age is not None and deletable:
            cutoff = time.time() - policy.max_age
            aged = [s for s in deletable if s[2] < cutoff]
            for seg in aged:
                if self._delete(seg[0]):
                    deleted.append(seg)
            if deleted:
                self._log(
                    "aged",
                    log.info,
                    "pyodlog deleted %d acknowledged segment(s) (%s) older than "
                    "Retention(max_age=%gs) from %s",
                    len(deleted),
                    _mib(sum(s[1] for s in deleted)),
                    policy.max_age,
                    self.directory,
                )
            deletable = [s for s in deletable if s not in deleted]
        by_budget = []
        for seg in deletable:
            if self.used + need <= self.budget:
                break
            if self._delete(seg[0]):
                by_budget.append(seg)
        if by_budget:
            self._log(
                "deleted",
                log.warning,
                "pyodlog deleted %d acknowledged segment(s) (%s, the oldest; their records are held "
                "by the collector) to keep %s under its local disk budget of %s (pyodlog.Retention)",
                len(by_budget),
                _mib(sum(s[1] for s in by_budget)),
                self.directory,
                _mib(self.budget),
            )
        if policy.drop_unsynced and self.used + need > self.budget:
            dropped = []
            for seg in segments:
                if self.used + need <= self.budget:
                    break
                if seg[0].name in acked or seg in deleted or seg in by_budget:
                    continue
                if self._delete(seg[0], acknowledged=False):
                    dropped.append(seg)
            if dropped:
                self._log(
                    "unsynced",
                    log.warning,
                    "pyodlog deleted %d segment(s) NOT acknowledged by any collector (%s, the oldest; "
                    "their records are lost) to keep %s under its local disk budget of %s "
                    "(Retention(drop_unsynced=True)); %d such segment(s) so far "
                    "(stats()['segments_dropped_unsynced'])",
                    len(dropped),
                    _mib(sum(s[1] for s in dropped)),
                    self.directory,
                    _mib(self.budget),
                    self.segments_dropped_unsynced,
                )

    def _delete(self, path: Path, acknowledged: bool = True) -> bool:
        """Deletes a closed segment and its checksum; counts it. False if it could not be deleted."""
        freed = 0
        for p in (path, _checksum_of(path)):
            size = _size(p)
            try:
                p.unlink()
            except FileNotFoundError:
                continue  # another process deleted it
            except OSError as error:
                self.last_error = f"cannot delete {p.name}: {error.strerror or error}"
                return False
            freed += size
        self._others = max(0, self._others - freed)
        if acknowledged:
            self.segments_deleted += 1
            self.bytes_deleted += freed
        else:
            self.segments_dropped_unsynced += 1
            self.bytes_dropped_unsynced += freed
        return True

    # -- reporting ----------------------------------------------------------------------------------------

    def _report_full(self) -> None:
        """The "budget full" line: when it bites, then at most once a minute while it lasts."""
        self._log(
            "full",
            log.warning,
            "pyodlog's local disk budget for %s is full: %s used of %s (pyodlog.Retention), and "
            "nothing more may be deleted (only segments acknowledged by a collector are%s); new "
            "records are dropped and counted in logger.stats()['dropped_by_reason']['disk_budget'] "
            "until there is room%s. Sync to a collector (auto_sync / upload()), raise "
            "Retention(max_local_bytes=...), or opt into Retention(drop_unsynced=True)",
            self.directory,
            _mib(self.used),
            _mib(self.budget),
            "" if self.policy.delete_after_sync else ", and delete_after_sync=False",
            _so_far(self.drop_count() - self._episode_drops),
        )

    def _set_over_budget(self, value: bool) -> None:
        if value:
            if not self.over_budget:
                self._episode_drops = self.drop_count()
            self.over_budget = True
            self._report_full()
        elif self.over_budget:
            self.over_budget = False
            self._last_log.pop("full", None)
            log.warning(
                "pyodlog's local disk budget for %s has room again (%s used of %s): logging "
                "resumes (%d call(s) dropped meanwhile)",
                self.directory,
                _mib(self.used),
                _mib(self.budget),
                self.drop_count() - self._episode_drops,
            )

    def _log(self, kind: str, emit: Callable[..., None], *args: object) -> None:
        now = time.monotonic()
        if now - self._last_log.get(kind, -LOG_INTERVAL) < LOG_INTERVAL:
            return
        self._last_log[kind] = now
        emit(*args)

    def stats(self) -> dict[str, object]:
        """``local_bytes``, ``local_budget_bytes``, ``over_budget``, deletions and drops of segments."""
        with self._lock:
            return {
                "local_bytes": self.used,
                "local_budget_bytes": self.budget,
                "over_budget": self.over_budget,
                "segments_deleted": self.segments_deleted,
                "bytes_deleted": self.bytes_deleted,
                "segments_dropped_unsynced": self.segments_dropped_unsynced,
                "bytes_dropped_unsynced": self.bytes_dropped_unsynced,
            }


def _so_far(n: int) -> str:
    return f" ({n} call(s) dropped so far in this episode)" if n > 0 else ""


def _checksum_of(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _size(path: Path) -> int:
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_size
    return 0
