"""HDF5Store: the sink that writes records to HDF5 segment files.

Layout: ``PYODLOG_HOME`` (or ``./pyodlog_data``) / model / version / result /
with ``result.json`` (the schema, written once) and numbered segment files, one
writer (process, rank) per file. See :mod:`pyodlog.io.segment` for a segment's
life and :mod:`pyodlog.io.writer` for the thread that writes it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pyodlog.io.copier import DeviceCopier
from pyodlog.io.export import export_zip
from pyodlog.io.reader import CorruptResultError, read_epochs
from pyodlog.io.retention import Retention, RetentionGuard
from pyodlog.io.segment import fsync_dir, quarantine_segment
from pyodlog.io.sink import (
    ResultInfo,
    ResultInUseError,
    SchemaMismatchError,
    SegmentStore,
    new_result_name,
)
from pyodlog.io.writer import (
    RecordWriter,
    StorageError,
    WriterConfig,
    read_complete,
    write_closed,
)
from pyodlog.structures import BOX_FORMAT, CallRecord

__all__ = ["HDF5Store", "ResultInUseError", "data_root", "recover_segments"]

log = logging.getLogger("pyodlog")
_LIVE: weakref.WeakSet[HDF5Store] = weakref.WeakSet()


def data_root(root: str | Path | None = None) -> Path:
    """``root``, else ``PYODLOG_HOME``, else ``./pyodlog_data``."""
    return Path(root or os.environ.get("PYODLOG_HOME") or "pyodlog_data").absolute()


_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)


def _check_writable(directory: Path) -> None:
    """Creates ``directory`` and writes a probe file there.

    Raises:
        PermissionError: the folder cannot be written (no permission,
            read-only file system, a file in the way).
        StorageError: another OSError, as what it is (e.g. ENOSPC: the disk is full).
    """
    probe = directory / f".pyodlog-write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        with contextlib.suppress(OSError):
            probe.unlink()
        if error.errno in _PERMISSION or isinstance(
            error, (PermissionError, FileExistsError, NotADirectoryError)
        ):
            raise PermissionError(
                f"pyodlog cannot write to {directory} ({error.strerror or error}): set PYODLOG_HOME, or pass "
                f"root=..., to a folder this process can write"
            ) from error
        raise StorageError(
            error.errno,
            f"pyodlog cannot write to {directory} ({error.strerror or error}): free space there (or fix the "
            f"disk), or set PYODLOG_HOME / pass root=... to another folder",
        ) from error


def recover_segments(directory: Path) -> list[Path]:
    """Turns leftover ``.h5.part`` files of dead writers into closed segments.

    A ``.part`` whose lock is free belongs to a writer that died: what it had
    flushed is read (SWMR reader: a crashed file opens up to its last flush) and
    written to a closed segment; the ``.part`` is then removed. A file that
    cannot be read is moved to ``quarantine/`` (never deleted) and logged.
    """
    recovered = []
    for creating in sorted(directory.glob("*.h5.creating")):
        lock_path = creating.with_name(creating.name[: -len(".creating")] + ".lock")
        fd = os.open(str(lock_path), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        # Died while creating its datasets, before any record could be written.
        creating.unlink()
        lock_path.unlink(missing_ok=True)
        os.close(fd)
        log.warning("pyodlog removed %s: its writer died before writing any record", creating.name)
    for part in sorted(directory.glob("*.h5.part")):
        lock_path = part.with_name(part.name[: -len(".part")] + ".lock")
        fd = os.open(str(lock_path), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            try:
                tables = read_complete(part)
            except Exception as error:
                quarantine = directory / "quarantine"
                quarantine.mkdir(exist_ok=True)
                shutil.move(str(part), quarantine / part.name)
                log.error(
                    "pyodlog could not read %s (%s): moved to %s", part.name, error, quarantine
                )
            else:
                final = write_closed(part, tables, recovered_from=part.name)
                if final is not None:
                    recovered.append(final)
                log.warning(
                    "pyodlog recovered %s (%d images flushed before its writer died)",
                    part.name[: -len(".part")],
                    tables.n_images,
                )
            lock_path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return recovered


@dataclass
class _Opening:
    """What :meth:`HDF5Store.open_result` decided; :meth:`HDF5Store.activate` carries it out."""

    directory: Path
    manifest: dict[str, Any]
    replace: bool  # force_recreate with another schema: the old result moves aside


RESULT_LOCK = "writers.lock"
# How long activate() waits for a concurrent replacement (which holds its lock for one rename).
LOCK_WAIT = 10.0


class HDF5Store(SegmentStore):
    """Writes records to HDF5 segments off the inference path.

    One store writes one result at a time; loggers on the same result may
    share it (it closes when the last of them does).

    Args:
        root: data root (default ``PYODLOG_HOME`` or ``./pyodlog_data``).
        rank: this writer's rank (default: the ``torch.distributed`` rank, else 0).
        config: batching, rotation and backpressure (:class:`~pyodlog.io.writer.WriterConfig`).

    Raises:
        PermissionError: ``root`` cannot be written.
        pyodlog.io.StorageError: another disk error (e.g. ENOSPC), as what it is.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        rank: int | None = None,
        config: WriterConfig | None = None,
    ) -> None:
        self.root = data_root(root)
        _check_writable(self.root)
        self.rank = rank if rank is not None else _default_rank()
        self.config = config or WriterConfig()
        self.copier = DeviceCopier(
            policy=self.config.backpressure, block_timeout=self.config.block_timeout
        )
        self.directory: Path | None = None
        self._writer: RecordWriter | None = None
        self._attrs: dict[str, Any] = {}
        self._opening: _Opening | None = None
        self._users = 0  # loggers that activated this store and have not closed it
        self._result_lock: int | None = None  # shared flock on <result>/writers.lock while writing
        self._listeners: list = []
        self._pid = os.getpid()
        self._child_warned = False
        self.dropped_in_child = 0
        self.closed = False
        self.retention: RetentionGuard | None = None  # the local disk budget (enable_retention)
        _LIVE.add(self)

    # -- Sink -------------------------------------------------------------------------------

    def open_result(
        self, model_name, version_name, result_name, schema, force_recreate
    ) -> ResultInfo:
        """Checks and resolves the result; nothing is replaced and no thread starts until :meth:`activate`.

        Raises:
            SchemaMismatchError: another schema, without ``force_recreate``.
            ResultInUseError: ``force_recreate`` would replace a result that
                another live writer (logger, process) still writes.
            ValueError: this store already writes another result.
        """
        version_dir = self.root / model_name / version_name
        _check_writable(version_dir)
        if result_name is None:
            existing = sorted(
                (p for p in version_dir.iterdir() if (p / "result.json").exists()),
                key=lambda p: json.loads((p / "result.json").read_text()).get("created", ""),
            )
            result_name = existing[-1].name if existing else new_result_name()
        directory = version_dir / result_name
        if self._is_writing() and directory != self.directory:
            raise ValueError(
                f"this HDF5Store already writes {self.directory} for another logger: pass each logger of "
                f"another result its own HDF5Store (sink=HDF5Store(...)), or close the first logger"
            )
        manifest_path = directory / "result.json"
        replace = False
        if manifest_path.exists():
            stored = json.loads(manifest_path.read_text())
            if stored.get("schema") != json.loads(json.dumps(schema)):
                if not force_recreate:
                    raise SchemaMismatchError(
                        f"result {result_name!r} in {directory} was created with another schema "
                        f"(additional_fields, n_class, target_layers or storage differ; a result written before segment format 3 "
                        f"opens with storage='float32'): pass force_table_recreate=True to "
                        f"start it again (its records are moved aside to {result_name}.replaced-<UTC time>, "
                        f"never deleted), or use another result_name"
                    )
                replace = True
                self._refuse_if_written(directory)
            elif force_recreate:
                log.warning(
                    "pyodlog: force_table_recreate=True, but result %s already has this schema: it is kept "
                    "as it is and new records are added to it",
                    directory,
                )
        from pyodlog._version import __version__

        manifest = {
            "schema": schema,
            "model_name": model_name,
            "version_name": version_name,
            "result_name": result_name,
            "pyodlog_version": __version__,
            "box_format": BOX_FORMAT,
        }
        if directory.exists() and not replace:
            recover_segments(directory)
        self._opening = _Opening(directory, manifest, replace)
        self.directory = directory
        self._attrs = {
            "pyodlog_version": __version__,
            "model_name": model_name,
            "version_name": version_name,
            "result_name": result_name,
            "n_class": schema.get("n_class", -1),
            "box_format": BOX_FORMAT,
            "schema": schema,
            "class_names": json.dumps(schema.get("class_names")),
        }
        return ResultInfo(result_name, None if replace else self.latest_epoch())

    def activate(self) -> None:
        """Starts writing the result :meth:`open_result` resolved (the logger calls it once its constructor passed every check).

        A replacement (``force_recreate`` with another schema) happens here:
        the old result folder is renamed to ``<result>.replaced-<UTC time>``
        (named in a warning), never deleted. Loggers on the same result share
        this store's writer.

        Raises:
            ResultInUseError: another live writer took the result meanwhile.
        """
        opening, self._opening = self._opening, None
        if opening is None:
            return
        if self._is_writing():  # a second logger on the result this store writes
            self._users += 1
            return
        directory = opening.directory
        if opening.replace:
            self._move_aside(directory)
        directory.mkdir(parents=True, exist_ok=True)
        manifest_path = directory / "result.json"
        if not manifest_path.exists():
            # A name of this process and thread: workers starting together each write their own.
            tmp = directory / f"result.json.{os.getpid()}-{threading.get_ident()}.tmp"
            tmp.write_text(
                json.dumps(
                    dict(
                        opening.manifest,
                        created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    ),
                    indent=2,
                )
            )
            os.replace(tmp, manifest_path)
            fsync_dir(directory)
        self._result_lock = _hold_result(directory)
        self.directory = directory
        self.closed = False
        self._writer = RecordWriter(directory, self._attrs, self.rank, self.config, self._listeners)
        self._writer.copier = self.copier
        self._users = 1
        self._start_retention()

    # -- the local disk budget (pyodlog.Retention) --------------------------------------------------

    def enable_retention(self, policy: Retention) -> RetentionGuard:
        """Keeps the open result's folder under a disk budget (see :mod:`pyodlog.io.retention`).

        Called after :meth:`open_result`; the guard starts with the writer. A store keeps the first
        policy it was given (loggers sharing it share the budget; another policy is ignored with a
        warning).

        Returns:
            The guard: add sources of acknowledgements with ``guard.add_ack_source(...)``.
        """
        if self.directory is None:
            raise RuntimeError("HDF5Store.open_result() must be called before enable_retention()")
        if self.retention is not None and self.retention.directory == self.directory:
            if self.retention.policy != policy:
                log.warning(
                    "pyodlog: this HDF5Store already keeps %s under %s; another logger's %s is ignored "
                    "(loggers sharing a store share its budget)",
                    self.directory,
                    self.retention.policy,
                    policy,
                )
            return self.retention
        if self.retention is not None:
            self.retention.stop()
        guard = RetentionGuard(self.directory, policy)
        guard.drop_count = lambda: (
            self._writer.dropped_by_reason.get("disk_budget", 0) if self._writer else 0
        )
        self.retention = guard
        self._listeners.append(guard.closed)
        if self._writer is not None and self._writer.alive:
            self._start_retention()
        return guard

    def _start_retention(self) -> None:
        guard = self.retention
        if guard is None or self._writer is None or guard.directory != self._writer.directory:
            return
        self._writer.retention = guard
        guard.start()

    @property
    def over_budget(self) -> bool:
        """True while the local disk budget is full of unacknowledged data and new records are
        dropped (reason ``"disk_budget"``); a sampler may read it to sample down."""
        guard = self.retention
        return guard is not None and guard.over_budget

    def _is_writing(self) -> bool:
        return self._writer is not None and self._writer.alive and not self.closed

    def _refuse_if_written(self, directory: Path, result_lock_held: bool = False) -> None:
        """A replacement needs the result to itself: no live store holds it, no live writer holds a segment."""
        busy = _live_writers(directory, result_lock_held)
        if busy:
            raise ResultInUseError(
                f"force_table_recreate=True cannot replace result {directory}: {busy} still writes it. "
                f"Close that logger (or end that process) first, or use another result_name"
            )

    def _move_aside(self, directory: Path) -> None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        aside = directory.with_name(f"{directory.name}.replaced-{stamp}")
        lock_path = directory / RESULT_LOCK
        fd = os.open(str(lock_path), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ResultInUseError(
                    f"force_table_recreate=True cannot replace result {directory}: another logger started "
                    f"writing it. Close it first, or use another result_name"
                ) from None
            self._refuse_if_written(directory, result_lock_held=True)
            os.rename(
                directory, aside
            )  # with its lock: a writer that waited for it sees the folder moved
            fsync_dir(directory.parent)
        finally:
            os.close(fd)
        log.warning(
            "pyodlog: force_table_recreate=True: result %s had another schema; its records were moved to %s "
            "(nothing was deleted) and the result starts empty",
            directory,
            aside,
        )

    def latest_epoch(self) -> int | None:
        """The highest epoch among the closed segments of the result (None if none).

        A segment that cannot be read is moved to ``quarantine/`` with a warning naming it.
        """
        best = None
        for segment in self.segments():
            try:
                epochs = read_epochs(segment)
            except CorruptResultError as error:
                quarantine_segment(segment, error)
                continue
            if len(epochs):
                top = int(np.max(epochs))
                if top >= 0 and (best is None or top > best):
                    best = top
        return best

    def add_segment_listener(self, listener) -> None:
        """Calls ``listener(path)`` (on the writer thread: return quickly) whenever a segment is closed."""
        if self.directory is None:
            raise RuntimeError("HDF5Store.open_result() must be called before adding listeners")
        self._listeners.append(listener)

    def segments(self) -> list[Path]:
        """The closed segments of the open result."""
        return sorted(self.directory.glob("*.h5")) if self.directory else []

    def _in_forked_child(self) -> bool:
        """After os.fork() the child must never touch the parent's open segment.

        The parent's writer thread does not exist in the child and may have held
        h5py's global lock at the fork, so the child makes no HDF5 call at all:
        logging is disabled there, with a warning, and its calls are counted as
        dropped.
        """
        if os.getpid() == self._pid:
            return False
        if not self._child_warned:
            self._child_warned = True
            if self._writer is not None:
                self._writer.abandon()
            log.warning(
                "pyodlog: logging is disabled in this forked child (pid %d); create a new logger in the "
                "child to log from it",
                os.getpid(),
            )
        return True

    def _writer_or_error(self) -> RecordWriter:
        if self._writer is None:
            if self._opening is not None:
                self.activate()  # a logger that never called activate(): start at first use
            if self._writer is None:
                raise RuntimeError(
                    "HDF5Store.open_result() must be called before records are submitted"
                )
        return self._writer

    def submit(self, record: CallRecord) -> None:
        if self._in_forked_child():
            self.dropped_in_child += 1
            return
        guard = self.retention
        if guard is not None and guard.over_budget and self._writer is not None:
            self._writer.count_dropped(1, "disk_budget")  # before any device copy starts
            return
        pending = self.copier.to_host(record)  # CUDA: copies start on a side stream; CPU: as is
        if pending is None:
            log.warning(
                "pyodlog dropped a call's records: %d bytes of device copies are in flight (max %d)",
                self.copier.inflight_bytes,
                self.copier.max_inflight_bytes,
            )
            return
        self._writer_or_error().submit(pending if pending.ready is not None else record)

    def wait_for_save(self, interval: float = 3.0) -> None:
        """Returns once everything submitted is durable; at once after :meth:`close`."""
        if self._in_forked_child():
            return
        self._writer_or_error().barrier(rotate=False, interval=interval)

    def rotate(self, interval: float = 3.0) -> None:
        """Closes the open segment once everything submitted is in it (nothing to do after :meth:`close`)."""
        if self._in_forked_child():
            return
        self._writer_or_error().barrier(rotate=True, interval=interval)

    def stats(self) -> dict[str, Any]:
        """Counts of calls: ``submitted == written + dropped + quarantined + queued``; ``durable``; closed segments.

        ``dropped`` counts calls whose records were not stored: the writer was
        ``queue_size`` calls behind (backpressure), or the disk failed while a
        batch was already held; ``quarantined`` counts calls kept under
        ``<result>/quarantine/`` because they could not become rows.
        ``dropped_by_reason`` splits ``dropped`` (``queue_full``, ``disk_error``, ``closing``,
        ``disk_budget``) and adds calls dropped before the writer (``device_copies``,
        ``forked_child``); with a disk budget, :meth:`RetentionGuard.stats` is merged in.
        """
        if not self._writer:
            return {}
        stats: dict[str, Any] = dict(self._writer.stats())
        # One consistent snapshot while other threads log: outcomes first, then what was submitted.
        written, dropped = self._writer.written, self._writer.dropped
        quarantined = self._writer.quarantined
        sampled_out = self._writer.sampled_out
        submitted = self._writer.submitted
        stats.update(
            submitted=submitted,
            written=written,
            dropped=dropped,
            quarantined=quarantined,
            sampled_out=sampled_out,
            queued=submitted - written - sampled_out - dropped - quarantined,
            dropped_device_copies=self.copier.dropped,
        )
        by_reason = dict(self._writer.dropped_by_reason)
        for reason, count in (
            ("device_copies", self.copier.dropped),
            ("forked_child", self.dropped_in_child),
        ):
            if count:
                by_reason[reason] = count
        stats["dropped_by_reason"] = by_reason
        if self.retention is not None:
            stats.update(self.retention.stats())
        return stats

    @property
    def writer(self) -> RecordWriter | None:
        """The writer thread's state (for tests and diagnostics)."""
        return self._writer

    def export(
        self, n_epoch: int | None, names: tuple[str, str, str], output_path: str | Path | None
    ) -> Path:
        """Closes the open segment (unless closed already) and writes the ZIP from the closed segments.

        Args:
            n_epoch: the epoch whose images are exported (None: all).
            names: ``(model_name, version_name, result_name)``, for the default file name.
            output_path: a ``.zip`` path (any case), a folder, or None (the current folder).

        Raises:
            OSError: the ZIP cannot be written there (the message names ``output_path``).
        """
        if not self.closed:
            self.rotate()
        output = _zip_path(output_path, n_epoch, names)
        _check_export_target(output, output_path)
        try:
            return export_zip(
                self.segments(),
                output,
                n_epoch,
                dict(self._attrs, schema=self._attrs.get("schema")),
            )
        except OSError as error:
            # Name what the user gave, not the temporary name the ZIP is written under.
            if not _about_export_target(error, output):
                raise
            raise OSError(
                error.errno,
                f"pyodlog cannot write the export {output_path if output_path is not None else output} "
                f"({os.strerror(error.errno) if error.errno else error}): free space there or pass another "
                f"output_path",
            ) from error

    def close(self) -> None:
        """Writes everything, closes the segment and stops the writer (when the last logger sharing the store closes).

        Raises:
            pyodlog.io.WriterFailedError: the writer thread had failed.
            pyodlog.io.StorageError: records could not be written at close.
        """
        if self.closed:
            return
        if self._users > 1:  # another logger still writes through this store
            self._users -= 1
            if os.getpid() == self._pid and self._writer is not None and self._writer.alive:
                self._writer.barrier(rotate=False, interval=3.0)
            return
        self._shut_down()

    def _shut_down(self) -> None:
        """Stops the writer whoever still uses the store (``close()`` of the last logger, and at exit)."""
        if self.closed:
            return
        self.closed = True
        self._users = 0
        self._opening = None
        try:
            if self._writer is not None and os.getpid() == self._pid:
                self._writer.stop()
        finally:
            if self.retention is not None and os.getpid() == self._pid:
                self.retention.stop()
            if self._result_lock is not None:
                os.close(self._result_lock)
                self._result_lock = None


def _hold_result(directory: Path) -> int:
    """A shared lock on ``<result>/writers.lock``, held while this store writes the result.

    A replacement takes it exclusively for one rename; if the folder moved
    while this waited, the lock is taken again on the new folder's file.
    """
    deadline = time.monotonic() + LOCK_WAIT
    lock_path = directory / RESULT_LOCK
    while True:
        fd = os.open(str(lock_path), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise ResultInUseError(
                    f"result {directory} is being replaced by another logger (force_table_recreate): "
                    f"try again, or use another result_name"
                ) from None
            time.sleep(0.01)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the folder was moved aside meanwhile: lock the new one's
        directory.mkdir(parents=True, exist_ok=True)


def _live_writers(directory: Path, result_lock_held: bool = False) -> str | None:
    """Who still writes ``directory``: a store holding its result lock, or a writer holding a segment lock."""
    candidates = []
    if not result_lock_held:
        candidates.append((directory / RESULT_LOCK, "another logger (in this or another process)"))
    candidates += [
        (p, f"the writer of {p.name[: -len('.lock')]}") for p in directory.glob("*.h5.lock")
    ]
    for path, who in candidates:
        if not path.exists():
            continue
        try:
            fd = os.open(str(path), os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return who
        finally:
            os.close(fd)
    return None


def _about_export_target(error: OSError, output: Path) -> bool:
    """Whether a failed export's error concerns the ZIP being written (not a segment being read)."""
    if error.filename is not None:
        return output.parent in Path(error.filename).parents
    return error.errno in (errno.ENOSPC, errno.EDQUOT, *_PERMISSION)


def _check_export_target(output: Path, given) -> None:
    """The export's folder exists (created) and is writable; errors name the path the user gave."""
    probe = output.parent / f".pyodlog-export-test-{os.getpid()}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise OSError(
            error.errno,
            f"pyodlog cannot write the export to {given if given is not None else output} "
            f"({error.strerror or error}): pass an output_path in a folder this process can write",
        ) from error


def _zip_path(
    output_path: str | Path | None, n_epoch: int | None, names: tuple[str, str, str]
) -> Path:
    epoch = "all" if n_epoch is None else f"epoch{n_epoch}"
    default = f"{'_'.join(names)}_{epoch}.zip"
    if output_path is None:
        return Path.cwd() / default
    path = Path(output_path)
    return path if path.suffix.lower() == ".zip" else path / default


def _default_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:
        pass
    return 0


@atexit.register
def _close_all() -> None:
    for store in list(_LIVE):
        try:
            store._shut_down()
        except Exception:
            log.exception("pyodlog could not close a store at exit")
