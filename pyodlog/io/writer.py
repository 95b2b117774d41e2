"""The writer thread: the one owner of a process's open segment.

The inference path only enqueues records (a bounded queue); this thread turns
them into column batches, appends a batch per flush (by size or time), rotates
segments, and answers barriers (``wait_for_save``) once everything before them
is fsynced. Like TensorBoard's EventFileWriter it stores its exception and the
next public call re-raises it. Disk errors (``OSError``, e.g. ENOSPC) are not
fatal: the batch stays in memory and is retried with backoff, the user is told
on the next call and by ``wait_for_save``, and logging resumes when the disk
does.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyodlog.io.columns import ColumnBatch, record_to_columns
from pyodlog.io.copier import DeviceCopier, PendingRecord
from pyodlog.io.segment import SegmentWriter, segment_name
from pyodlog.structures import CallRecord

__all__ = [
    "RecordWriter",
    "StorageError",
    "WriterConfig",
    "WriterFailedError",
]

log = logging.getLogger("pyodlog")


class WriterFailedError(RuntimeError):
    """The writer thread died; the message carries its error."""


class StorageError(OSError):
    """Records could not be written (disk full, unwritable folder); they are held and retried."""


@dataclass
class WriterConfig:
    """How the writer batches, rotates and applies backpressure.

    Attributes:
        flush_interval: seconds a record may wait before its batch is written.
        batch_images: write a batch once it holds this many images.
        batch_bytes: ... or this many bytes.
        segment_max_records: close the segment after this many calls...
        segment_max_bytes: ... or this many bytes ...
        segment_max_age: ... or after this many seconds open.
        queue_size: calls queued before backpressure applies.
        backpressure: ``"block"`` (wait up to ``block_timeout`` seconds, then
            drop) or ``"drop"`` (drop at once); dropped calls are counted.
        block_timeout: see ``backpressure``.
    """

    flush_interval: float = 1.0
    batch_images: int = 256
    batch_bytes: int = 64 << 20
    segment_max_records: int = 100_000
    segment_max_bytes: int = 1 << 30
    segment_max_age: float = 3600.0
    queue_size: int = 64
    backpressure: str = "block"
    block_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.backpressure not in ("block", "drop"):
            raise ValueError(f"backpressure must be 'block' or 'drop', got {self.backpressure!r}")
        for name in (
            "flush_interval",
            "batch_images",
            "batch_bytes",
            "segment_max_records",
            "segment_max_bytes",
            "segment_max_age",
            "queue_size",
            "block_timeout",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass
class _Barrier:
    upto: int
    rotate: bool
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


_STOP = object()


class RecordWriter:
    """Owns the writer thread of one result directory in one process."""

    def __init__(
        self, directory: Path, attrs: dict[str, Any], rank: int, config: WriterConfig
    ) -> None:
        self.directory = Path(directory)
        self.attrs = attrs
        self.rank = rank
        self.config = config
        self.pid = os.getpid()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.queue_size)
        self._lock = threading.Lock()
        self.submitted = 0
        self.written = 0
        self.dropped = 0
        self.durable = 0
        self.segments_closed: list[Path] = []
        self.last_disk_error: BaseException | None = None
        self._warned_disk_error: BaseException | None = None
        self._fatal: BaseException | None = None
        self._segment: SegmentWriter | None = None
        self._segment_seq = 0
        self._token = secrets.token_hex(3)
        self.fault_injection: Callable[[], None] | None = (
            None  # tests: raise at the writer's boundary
        )
        self.copier: DeviceCopier | None = None
        # Called on the writer thread with each closed segment's path (the syncer's wake-up).
        self.segment_listeners: list[Callable[[Path], None]] = []
        self._thread = threading.Thread(
            target=self._run, name=f"pyodlog-writer-{self.directory.name}", daemon=True
        )
        self._thread.start()

    # -- called from the inference side -------------------------------------------------

    def raise_if_failed(self) -> None:
        if self._fatal is not None:
            raise WriterFailedError(
                f"pyodlog's writer thread failed: {self._fatal!r}"
            ) from self._fatal
        error = self.last_disk_error
        if error is not None and error is not self._warned_disk_error:
            self._warned_disk_error = error
            log.error(
                "pyodlog cannot write records (%s); %d calls are held in memory and retried; "
                "inference goes on",
                error,
                self.queued,
            )

    @property
    def queued(self) -> int:
        return self.submitted - self.written - self.dropped

    def submit(self, record: CallRecord | PendingRecord) -> None:
        self.raise_if_failed()
        with self._lock:
            self.submitted += 1
            seq = self.submitted
        try:
            if self.config.backpressure == "drop":
                self._queue.put_nowait((seq, record))
            else:
                self._queue.put((seq, record), timeout=self.config.block_timeout)
        except queue.Full:
            with self._lock:
                self.dropped += 1
            log.warning(
                "pyodlog dropped a call's records: the writer is %d calls behind (backpressure=%r); "
                "%d dropped so far",
                self.config.queue_size,
                self.config.backpressure,
                self.dropped,
            )

    def barrier(self, rotate: bool, interval: float) -> None:
        """Returns once every call submitted before it is durable (and, with rotate, in a closed segment)."""
        self.raise_if_failed()
        target = self.submitted
        barrier = _Barrier(upto=target, rotate=rotate)
        self._queue.put(barrier)
        start = time.monotonic()
        while not barrier.done.wait(interval):
            if self._fatal is not None:
                break
            log.info(
                "pyodlog: waiting for records to be saved: %d of %d calls durable (%.0f s)",
                self.durable,
                target,
                time.monotonic() - start,
            )
        self.raise_if_failed()
        if barrier.error is not None:
            raise StorageError(
                f"pyodlog could not save the records: {barrier.error}; they are held in memory and "
                f"retried when the disk allows it"
            ) from barrier.error

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def abandon(self) -> None:
        """After fork, in the child: never touch the parent's open segment."""
        if self._segment is not None:
            self._segment.abandon()
            self._segment = None

    def stats(self) -> dict[str, int]:
        return {
            "submitted": self.submitted,
            "written": self.written,
            "dropped": self.dropped,
            "queued": self.queued,
            "durable": self.durable,
            "segments_closed": len(self.segments_closed),
        }

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        pending = ColumnBatch()
        first_pending_at = 0.0
        retry_at = 0.0
        backoff = 0.5
        try:
            while True:
                timeout = None
                if pending.n_records:
                    timeout = max(
                        0.0,
                        max(first_pending_at + self.config.flush_interval, retry_at)
                        - time.monotonic(),
                    )
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = None
                if isinstance(item, tuple):
                    _seq, record = item
                    if not pending.n_records:
                        first_pending_at = time.monotonic()
                    if isinstance(record, PendingRecord):
                        # Device copies: wait for them here, on the writer thread.
                        record_to_columns(record.wait(), pending)
                        if self.copier is not None:
                            self.copier.release(record)
                    else:
                        record_to_columns(record, pending)
                    if (
                        pending.n_images < self.config.batch_images
                        and pending.nbytes < self.config.batch_bytes
                    ):
                        continue
                    if time.monotonic() < retry_at:
                        continue
                elif isinstance(item, _Barrier) or item is _STOP:
                    pass
                elif item is None and time.monotonic() < retry_at:
                    continue
                # Write what is pending (by size, by time, or for a barrier/stop).
                try:
                    if pending.n_records:
                        self._write(pending)
                        self.written += pending.n_records
                        pending = ColumnBatch()
                    if isinstance(item, _Barrier) or item is _STOP:
                        if self._segment is not None:
                            if (isinstance(item, _Barrier) and item.rotate) or item is _STOP:
                                self._close_segment()
                            else:
                                self._segment.sync()
                        self.durable = self.written
                    self.last_disk_error = None
                    backoff = 0.5
                    retry_at = 0.0
                    if isinstance(item, _Barrier):
                        item.done.set()
                except (
                    OSError
                ) as error:  # disk full, permissions, ...: keep the records, retry later
                    self.last_disk_error = error
                    retry_at = time.monotonic() + backoff
                    backoff = min(backoff * 2, 30.0)
                    self._drop_broken_segment()
                    if isinstance(item, _Barrier):
                        item.error = error
                        item.done.set()
                    if item is _STOP:
                        log.error(
                            "pyodlog is closing with %d calls it could not write: %s",
                            pending.n_records,
                            error,
                        )
                        return
                if item is _STOP:
                    return
        except BaseException as error:
            self._fatal = error
            log.exception("pyodlog's writer thread failed")
            # Wake every waiter.
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Barrier):
                    item.done.set()

    def _write(self, batch: ColumnBatch) -> None:
        if self.fault_injection is not None:
            self.fault_injection()
        if self._segment is not None and not self._segment.accepts(batch):
            self._close_segment()
        if self._segment is None:
            self._segment_seq += 1
            # Names sort in creation order (nanoseconds first), across processes too.
            name = segment_name(
                time.time_ns(), self.rank, os.getpid(), self._token, self._segment_seq
            )
            attrs = dict(self.attrs, rank=self.rank, pid=os.getpid(), created=time.time())
            self._segment = SegmentWriter(self.directory / name, attrs, batch)
        self._segment.append(batch)
        seg = self._segment
        if (
            seg.counts["records"] >= self.config.segment_max_records
            or seg.nbytes >= self.config.segment_max_bytes
            or time.monotonic() - seg.opened_at >= self.config.segment_max_age
        ):
            self._close_segment()

    def _close_segment(self) -> None:
        if self._segment is not None:
            path = self._segment.close()
            self._segment = None
            self.segments_closed.append(path)
            for listener in self.segment_listeners:
                try:
                    listener(path)
                except Exception:
                    log.exception("pyodlog: a segment listener failed")

    def _drop_broken_segment(self) -> None:
        """After a disk error: close the open segment if possible (recovery handles it otherwise)."""
        if self._segment is None:
            return
        try:
            self._close_segment()
        except Exception:
            log.warning("pyodlog left %s for recovery at the next start", self._segment.part)
            self._segment.abandon()
            self._segment = None
