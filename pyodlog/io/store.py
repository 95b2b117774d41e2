"""HDF5Store: the sink that writes records to HDF5 segment files.

Layout: ``PYODLOG_HOME`` (or ``./pyodlog_data``) / model / version / result /
with ``result.json`` (the schema, written once) and numbered segment files, one
writer (process, rank) per file. See :mod:`pyodlog.io.segment` for a segment's
life and :mod:`pyodlog.io.writer` for the thread that writes it.
"""

from __future__ import annotations

import atexit
import datetime
import fcntl
import json
import logging
import os
import shutil
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from pyodlog.io.copier import DeviceCopier
from pyodlog.io.export import export_zip, write_tables
from pyodlog.io.reader import CorruptResultError, read_epochs, read_segment, trim_to_consistent
from pyodlog.io.segment import fsync_dir, quarantine_segment
from pyodlog.io.sink import ResultInfo, SchemaMismatchError, Sink, new_result_name
from pyodlog.io.writer import RecordWriter, WriterConfig
from pyodlog.structures import CallRecord

__all__ = ["HDF5Store", "data_root", "recover_segments"]

log = logging.getLogger("pyodlog")
_LIVE: weakref.WeakSet[HDF5Store] = weakref.WeakSet()


def data_root(root: str | Path | None = None) -> Path:
    """``root``, else ``PYODLOG_HOME``, else ``./pyodlog_data``."""
    return Path(root or os.environ.get("PYODLOG_HOME") or "pyodlog_data").absolute()


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".pyodlog-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise PermissionError(
            f"pyodlog cannot write to {directory} ({error.strerror or error}): set PYODLOG_HOME, or pass root=..., "
            f"to a folder this process can write"
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
            final = part.with_name(part.name[: -len(".part")])
            try:
                tables = trim_to_consistent(read_segment(part, swmr=True))
                tmp = final.with_name(final.name + ".recovering")
                write_tables(tmp, tables, dict(tables.attrs, recovered_from=part.name))
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
                part.unlink()
                fsync_dir(directory)
                recovered.append(final)
                log.warning(
                    "pyodlog recovered %s (%d images flushed before its writer died)",
                    final.name,
                    tables.n_images,
                )
            except Exception as error:
                quarantine = directory / "quarantine"
                quarantine.mkdir(exist_ok=True)
                shutil.move(str(part), quarantine / part.name)
                log.error(
                    "pyodlog could not read %s (%s): moved to %s", part.name, error, quarantine
                )
            lock_path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return recovered


class HDF5Store(Sink):
    """Writes records to HDF5 segments off the inference path.

    Args:
        root: data root (default ``PYODLOG_HOME`` or ``./pyodlog_data``).
        rank: this writer's rank (default: the ``torch.distributed`` rank, else 0).
        config: batching, rotation and backpressure (:class:`~pyodlog.io.writer.WriterConfig`).
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
        self._pid = os.getpid()
        self._child_warned = False
        self.dropped_in_child = 0
        self.closed = False
        _LIVE.add(self)

    # -- Sink -------------------------------------------------------------------------------

    def open_result(
        self, model_name, version_name, result_name, schema, force_recreate
    ) -> ResultInfo:
        version_dir = self.root / model_name / version_name
        _check_writable(version_dir)
        if result_name is None:
            existing = sorted(
                (p for p in version_dir.iterdir() if (p / "result.json").exists()),
                key=lambda p: json.loads((p / "result.json").read_text()).get("created", ""),
            )
            result_name = existing[-1].name if existing else new_result_name()
        directory = version_dir / result_name
        directory.mkdir(exist_ok=True)
        manifest_path = directory / "result.json"
        if manifest_path.exists():
            stored = json.loads(manifest_path.read_text())
            if stored.get("schema") != json.loads(json.dumps(schema)):
                if not force_recreate:
                    raise SchemaMismatchError(
                        f"result {result_name!r} in {directory} was created with another schema "
                        f"(additional_fields, n_class or target_layers differ): pass force_table_recreate=True to "
                        f"drop its records and start again, or use another result_name"
                    )
        if force_recreate and manifest_path.exists():
            log.warning("pyodlog: force_table_recreate=True removes the records of %s", directory)
            for item in directory.iterdir():
                if item.is_dir():
                    shutil.rmtree(item)
                else:
                    item.unlink()
        if not manifest_path.exists():
            from pyodlog._version import __version__

            # A name of this process and thread: workers starting together each write their own.
            tmp = directory / f"result.json.{os.getpid()}-{threading.get_ident()}.tmp"
            tmp.write_text(
                json.dumps(
                    {
                        "schema": schema,
                        "model_name": model_name,
                        "version_name": version_name,
                        "result_name": result_name,
                        "pyodlog_version": __version__,
                        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    },
                    indent=2,
                )
            )
            os.replace(tmp, manifest_path)
            fsync_dir(directory)
        recover_segments(directory)
        self.directory = directory
        from pyodlog._version import __version__

        self._attrs = {
            "pyodlog_version": __version__,
            "model_name": model_name,
            "version_name": version_name,
            "result_name": result_name,
            "n_class": schema.get("n_class", -1),
            "schema": schema,
            "class_names": json.dumps(schema.get("class_names")),
        }
        self._writer = RecordWriter(directory, self._attrs, self.rank, self.config)
        self._writer.copier = self.copier
        return ResultInfo(result_name, self.latest_epoch())

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
        self._writer_or_error().segment_listeners.append(listener)

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
            raise RuntimeError(
                "HDF5Store.open_result() must be called before records are submitted"
            )
        return self._writer

    def submit(self, record: CallRecord) -> None:
        if self._in_forked_child():
            self.dropped_in_child += 1
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
        if self._in_forked_child():
            return
        self._writer_or_error().barrier(rotate=False, interval=interval)

    def rotate(self, interval: float = 3.0) -> None:
        """Closes the open segment once everything submitted is in it."""
        if self._in_forked_child():
            return
        self._writer_or_error().barrier(rotate=True, interval=interval)

    def stats(self) -> dict[str, int]:
        """Counts of calls: ``submitted == written + dropped + queued``; ``durable``; closed segments."""
        if not self._writer:
            return {}
        stats = self._writer.stats()
        # One consistent snapshot while other threads log: outcomes first, then what was submitted.
        written, dropped = self._writer.written, self._writer.dropped
        submitted = self._writer.submitted
        stats.update(
            submitted=submitted,
            written=written,
            dropped=dropped,
            queued=submitted - written - dropped,
            dropped_device_copies=self.copier.dropped,
        )
        return stats

    @property
    def writer(self) -> RecordWriter | None:
        """The writer thread's state (for tests and diagnostics)."""
        return self._writer

    def export(self, logger, output_path: str | None) -> Path:
        self.rotate()
        output = _zip_path(output_path, logger)
        return export_zip(
            self.segments(),
            output,
            logger.n_epoch,
            dict(self._attrs, schema=self._attrs.get("schema")),
        )

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._writer is not None and os.getpid() == self._pid:
            self._writer.stop()


def _zip_path(output_path: str | None, logger) -> Path:
    epoch = "all" if logger.n_epoch is None else f"epoch{logger.n_epoch}"
    default = f"{logger.model_name}_{logger.version_name}_{logger.result_name}_{epoch}.zip"
    if output_path is None:
        return Path.cwd() / default
    path = Path(output_path)
    return path if path.suffix == ".zip" else path / default


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
            store.close()
        except Exception:
            log.exception("pyodlog could not close a store at exit")
