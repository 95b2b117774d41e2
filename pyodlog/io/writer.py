"""The writer thread: the one owner of a process's open segment.

The inference path only enqueues records (a bounded queue; when it is full the
call's records are dropped and counted, or with ``backpressure="block"`` the
call waits up to ``block_timeout``); this thread turns them into column
batches, appends a batch per flush (by size or time), rotates segments, and
answers barriers (``wait_for_save``) once everything before them is fsynced.
Like TensorBoard's EventFileWriter it stores its exception and the next public
call re-raises it.

What never stops the thread:

* A record that cannot become rows (any exception in ``record_to_columns``)
  is quarantined: pickled, with a JSON description of why, under
  ``<result>/quarantine/``, and counted (``stats()["quarantined"]``).
* A disk error (``OSError``, e.g. ENOSPC) while appending, syncing or
  closing rolls the segment back to its last complete append: the file is
  reopened and every dataset cut back to where that append ended (if it cannot
  be reopened, it is closed as a rewrite of those images instead). A segment
  is never renamed torn and a batch never lands twice: the failed batch stays
  pending and is retried, with backoff, after the rollback. While the disk
  fails at most one batch is held; later calls are dropped and counted.
  Logging resumes by itself when the disk does.

Every wait has a bound or a reason: ``submit`` waits at most ``block_timeout``
(never with the default ``"drop"``); ``barrier`` and ``stop`` wait for the
thread only while it is alive, and the thread makes one write attempt per
barrier and at ``stop``, so they return once the disk answers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import queue
import secrets
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from pyodlog._checks import check_number
from pyodlog.io.aggregates import (
    Aggregates,
    CallsSummary,
    CallSummary,
    summarize_call,
    summarize_calls,
    summary_fits,
)
from pyodlog.io.columns import ColumnBatch, ColumnsDiffer, record_to_columns
from pyodlog.io.copier import DeviceCopier, PendingRecord
from pyodlog.io.export import write_tables
from pyodlog.io.reader import Tables, read_segment, trim_to_consistent
from pyodlog.io.segment import CHUNK_BYTES, SegmentWriter, fsync_dir, segment_name, write_checksum
from pyodlog.structures import CallRecord, RecordStorage

if TYPE_CHECKING:
    from pyodlog.io.retention import RetentionGuard

__all__ = [
    "RecordWriter",
    "StorageError",
    "WriterConfig",
    "WriterFailedError",
    "read_complete",
    "write_closed",
]

log = logging.getLogger("pyodlog")


# Retries after a disk error: the first after this many seconds, doubling up to the cap.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 5.0
# At most one drop warning per this many seconds (the count is in stats()).
DROP_LOG_INTERVAL = 10.0


def _first_images(tables: Tables, n_images: int) -> Tables:
    """The tables cut to their first ``n_images`` images (detections and features follow in trimming)."""
    return Tables(
        {k: (v[:n_images] if k.startswith("images/") else v) for k, v in tables.numeric.items()},
        {k: (v[:n_images] if k.startswith("images/") else v) for k, v in tables.strings.items()},
        tables.payload,
        tables.attrs,
    )


def read_complete(part: Path, n_images: int | None = None) -> Tables:
    """The complete images of a ``.part`` (at most its first ``n_images``), read as a SWMR reader would.

    The images of a failed append are cut off by ``n_images`` (they are
    retried elsewhere); a crash's half-flushed rows by trimming to the images
    whose every row is present.
    """
    tables = read_segment(part, swmr=True)
    if n_images is not None:
        tables = _first_images(tables, n_images)
    return trim_to_consistent(tables)


def write_closed(part: Path, tables: Tables, **attrs: Any) -> Path | None:
    """Writes ``tables`` as the closed segment of ``<name>.h5.part`` (``<name>.h5``) and removes the ``.part``.

    Written under a temporary name, fsynced, renamed; a segment with no image
    is just removed. On failure (e.g. the disk is still full) the ``.part`` is
    untouched and no temporary file is left.

    Returns:
        The closed segment's path, or None when there was no image to keep.
    """
    part = Path(part)
    final = part.with_name(part.name[: -len(".part")])
    if tables.n_images == 0:
        part.unlink()
        fsync_dir(part.parent)
        return None
    tmp = final.with_name(final.name + ".recovering")
    try:
        write_tables(tmp, tables, dict(tables.attrs, **attrs))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    part.unlink()
    fsync_dir(part.parent)
    write_checksum(final)  # verified by readers, like any closed segment
    return final


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
        backpressure: what a call does when ``queue_size`` calls are queued:
            ``"drop"`` (the default: its records are dropped at once, so a
            call is never held; counted in ``stats()["dropped"]`` and reported
            by ``wait_for_save``) or ``"block"`` (opt-in: wait up to
            ``block_timeout`` seconds for room, then drop).
        block_timeout: see ``backpressure``.
        summary_thread: summarise a full batch's calls (aggregates and sampling) on a helper
            thread while the writer thread appends the batch before it. Off by default: it pays
            only where the writer has a core of its own, and it holds one more batch in memory
            (taken from the queue before the batch ahead of it is written).
    """

    flush_interval: float = 1.0
    batch_images: int = 256
    batch_bytes: int = 64 << 20
    segment_max_records: int = 100_000
    segment_max_bytes: int = 1 << 30
    segment_max_age: float = 3600.0
    queue_size: int = 64
    backpressure: str = "drop"
    block_timeout: float = 30.0
    summary_thread: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.summary_thread, bool):
            raise ValueError(f"summary_thread must be True or False, got {self.summary_thread!r}")
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
            check_number(value, name)


@dataclass
class _Barrier:
    upto: int
    rotate: bool
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


_STOP = object()


class _Segment(SegmentWriter):
    """A segment as the writer uses it: no litter when it cannot be created, and a rollback after a failed write.

    ``column_fault`` (tests) is called before each column is appended, and
    with ``"<close>"`` before the segment is closed: raising there fails an
    append half-way, or a rotation, as a full disk does.
    """

    def __init__(
        self,
        path: Path,
        attrs: dict[str, Any],
        first: ColumnBatch,
        column_fault: Callable[[str], None] | None = None,
    ) -> None:
        self.column_fault = column_fault
        try:
            super().__init__(path, attrs, first)
        except BaseException:
            self._discard_unborn()
            raise
        # Each dataset's length at the end of the last complete append.
        self._committed = dict(self._lengths)

    def append(self, batch: ColumnBatch) -> None:
        super().append(batch)
        self._committed = dict(self._lengths)

    def _append_direct(self, name: str, pieces) -> None:
        if self.column_fault is not None:
            self.column_fault(name)
        super()._append_direct(name, pieces)

    def close(self) -> Path:
        if self.column_fault is not None:
            self.column_fault("<close>")
        return super().close()

    def roll_back(self) -> None:
        """Cuts every dataset back to the end of the last complete append; the segment takes appends again.

        The file is reopened (its failed writes are never trusted), each
        dataset resized to its committed length, flushed and put back in SWMR
        mode; the partial last chunk of each column is read back into its tail
        buffer. Needs almost no free space (metadata only).

        Raises:
            OSError: the disk still refuses (retry later), or the file cannot
                be reopened (then close it as its complete prefix instead).
        """
        self.let_go()
        f = h5py.File(self.part, "r+", libver="latest", rdcc_nbytes=8 * CHUNK_BYTES)
        try:
            for name, length in self._committed.items():
                ds = f[name]
                if ds.shape[0] < length:
                    raise OSError(f"{self.part.name}: {name} lost rows that were flushed")
                if ds.shape[0] != length:
                    ds.resize(length, axis=0)
            f.flush()
            f.swmr_mode = True
            datasets = {name: f[name] for name in self._datasets}
            for name, ds in datasets.items():
                tail = self._tails.get(name)
                length = self._committed[name]
                filled = length % ds.chunks[0]
                if tail is not None and filled:
                    tail[:filled] = ds[length - filled : length]
        except BaseException:
            with contextlib.suppress(Exception):
                f.close()
            raise
        self._file = f
        self._datasets = datasets
        self._lengths = dict(self._committed)

    def _discard_unborn(self) -> None:
        """Creation failed (e.g. ENOSPC): remove its files; it never held a record."""
        f = getattr(self, "_file", None)
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()
        for suffix in (".creating", ".part"):
            self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
        if hasattr(self, "_lock_fd"):
            self._release_lock()

    def let_go(self) -> None:
        """After a failed append, sync or close: close the file, whatever state HDF5 is in.

        The on-disk content past the last complete append is never trusted:
        :meth:`roll_back` cuts it off (or, if the file cannot be reopened, the
        writer rewrites the segment cut to ``counts["images"]``, see
        :func:`read_complete`). The lock stays held until then.
        """
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
        if self._sync_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._sync_fd)
            self._sync_fd = None

    def unlock(self) -> None:
        self._release_lock()

    def write_aggregates(self, data: bytes) -> None:
        """Writes the aggregates (JSON bytes) into the segment's ``aggregates`` dataset, just before closing.

        Not committed: a failed close rolls it back with everything else after the last append.
        """
        self._append_direct("aggregates", [np.frombuffer(data, np.uint8)])
        self._file.flush()


class RecordWriter:
    """Owns the writer thread of one result directory in one process.

    Counts (``stats()``): ``submitted == written + dropped + quarantined + queued``.
    """

    def __init__(
        self,
        directory: Path,
        attrs: dict[str, Any],
        rank: int,
        config: WriterConfig,
        segment_listeners: list[Callable[[Path], None]] | None = None,
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
        self.quarantined = 0
        self.durable = 0
        self.sampled_out = 0  # calls whose rows sampling left out (their aggregates are kept)
        self.aggregate_errors = 0
        self.last_aggregate_error: str | None = None
        self.lost_at_close = 0
        self._left_open = False
        self.segments_closed: list[Path] = []
        self.last_disk_error: BaseException | None = None
        self._close_error: BaseException | None = None
        self._fatal: BaseException | None = None
        self._segment: _Segment | None = None
        self._broken: _Segment | None = None  # failed; to be closed as its complete prefix
        self._segment_seq = 0
        self._quarantine_seq = 0
        self._token = secrets.token_hex(3)
        self._pending = ColumnBatch()
        # Calls taken but not yet summarised nor turned into rows: done together at the next
        # flush (one aggregate summary over all of them, see _rows_of_inbox).
        self._inbox: list[CallRecord] = []
        self._inbox_images = 0
        self._inbox_bytes = 0
        # Summaries of full inboxes computing on the helper thread (pipelined), oldest first.
        self._jobs: deque[tuple[list[CallRecord], Future[_Summarized]]] = deque()
        self._rows_pool: ThreadPoolExecutor | None = None
        #: Summarise full batches on a helper thread while this one writes (see _pipeline).
        self.pipelined = config.summary_thread
        self._first_pending_at = 0.0
        self._retry_at = 0.0
        self._backoff = FIRST_BACKOFF
        self._rollbacks = 0  # in this disk error episode (the first is logged)
        self._last_drop_log = -DROP_LOG_INTERVAL
        self._reported = {"dropped": 0, "quarantined": 0}
        # Tests: raise at the writer's boundary (before a batch touches the file) ...
        self.fault_injection: Callable[[], None] | None = None
        # ... or before each column of an append (a failure half-way through a batch).
        self.column_fault: Callable[[str], None] | None = None
        self.copier: DeviceCopier | None = None
        schema: dict[str, Any] = attrs["schema"] if isinstance(attrs.get("schema"), dict) else {}
        self.storage = RecordStorage.from_dict(schema.get("storage"))
        self.n_class = max(int(attrs.get("n_class", 0) or 0), 0)
        # Every call's aggregates since the last closed segment (written into the next one).
        self.aggregates = Aggregates(self.n_class)
        # Called on the writer thread with each closed segment's path (the syncer's wake-up).
        self.segment_listeners: list[Callable[[Path], None]] = (
            segment_listeners if segment_listeners is not None else []
        )
        # The local disk budget (pyodlog.Retention): asked before each append (None: no budget).
        self.retention: RetentionGuard | None = None
        self.bytes_written = 0  # bytes of the batches appended (columns and payload)
        # Calls dropped, by why: queue_full, disk_error, closing, disk_budget (sum: ``dropped``).
        self.dropped_by_reason: dict[str, int] = {}
        self._thread = threading.Thread(
            target=self._run, name=f"pyodlog-writer-{self.directory.name}", daemon=True
        )
        self._thread.start()

    # -- called from the inference side -------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the writer thread runs (False once stopped or dead)."""
        return self._thread.is_alive()

    def raise_if_failed(self) -> None:
        if self._fatal is not None:
            raise WriterFailedError(
                f"pyodlog's writer thread failed: {self._fatal!r}"
            ) from self._fatal

    @property
    def queued(self) -> int:
        return self.submitted - self.written - self.sampled_out - self.dropped - self.quarantined

    def submit(self, record: CallRecord | PendingRecord) -> None:
        """Enqueues a call's record; never waits with ``backpressure="drop"`` (the default)."""
        self.raise_if_failed()
        with self._lock:
            self.submitted += 1
            seq = self.submitted
        try:
            if self.config.backpressure == "block":
                self._queue.put((seq, record), timeout=self.config.block_timeout)
            else:
                self._queue.put_nowait((seq, record))
        except queue.Full:
            if isinstance(record, PendingRecord) and self.copier is not None:
                self.copier.release(record)  # its pinned buffers are freed once their copy is done
            self._count_drop(
                1,
                f"the writer is {self.config.queue_size} calls behind "
                f"(backpressure={self.config.backpressure!r})",
                reason="queue_full",
            )

    def count_dropped(self, n: int, reason: str) -> None:
        """Counts ``n`` calls dropped before they reached the queue (submitted and dropped), e.g.
        ``"disk_budget"`` while the local disk budget is full (the budget logs why itself)."""
        with self._lock:
            self.submitted += n
            self.dropped += n
            self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + n

    def _count_drop(self, n: int, why: str, reason: str = "other") -> None:
        with self._lock:
            self.dropped += n
            self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + n
            now = time.monotonic()
            if now - self._last_drop_log < DROP_LOG_INTERVAL:
                return
            self._last_drop_log = now
        log.warning(
            "pyodlog dropped a call's records: %s; %d dropped so far (logger.sink.stats()); "
            "inference goes on",
            why,
            self.dropped,
        )

    def _put(self, item: Any) -> bool:
        """Queues a control item; False if the thread has ended (then nobody would take it)."""
        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def barrier(self, rotate: bool, interval: float) -> None:
        """Returns once every call submitted before it is durable (and, with rotate, in a closed segment).

        After :meth:`stop` it returns at once (everything was written at
        close, or :meth:`stop` reported what could not be). Progress shows as
        a tqdm bar when stderr is a terminal, else as log lines every
        ``interval`` seconds.
        """
        self.raise_if_failed()
        target = self.submitted
        barrier = _Barrier(upto=target, rotate=rotate)
        if self._put(barrier):
            self._wait(barrier, target, interval)
        self.raise_if_failed()
        if barrier.error is not None:
            raise StorageError(
                f"pyodlog could not save the records: {barrier.error}; up to one batch is held in "
                f"memory and retried when the disk allows it, later calls are dropped and counted "
                f"({self.dropped} so far)"
            ) from barrier.error
        self._report_losses()

    def _wait(self, barrier: _Barrier, target: int, interval: float) -> None:
        """Waits while the thread lives (it answers every barrier after one write attempt)."""
        start = time.monotonic()
        bar = None
        step = min(interval, 0.25) if sys.stderr.isatty() else interval
        last_log = start
        try:
            while not barrier.done.wait(step):
                if not self._thread.is_alive():
                    break
                now = time.monotonic()
                if sys.stderr.isatty():
                    if bar is None:
                        from tqdm import tqdm

                        bar = tqdm(
                            total=target,
                            initial=min(self.durable, target),
                            unit="call",
                            desc="pyodlog: saving",
                            file=sys.stderr,
                            leave=False,
                            # A terminal that reports no size (0 columns) would show nothing.
                            ncols=shutil.get_terminal_size().columns,
                        )
                    bar.n = min(self.written, target)
                    bar.refresh()
                elif now - last_log >= interval - 1e-3:
                    last_log = now
                    log.info(
                        "pyodlog: waiting for records to be saved: %d of %d calls written (%.0f s)",
                        self.written,
                        target,
                        now - start,
                    )
        finally:
            if bar is not None:
                bar.close()

    def _report_losses(self) -> None:
        """Logs what was dropped or quarantined since the last barrier (wait_for_save's report)."""
        for name in ("dropped", "quarantined"):
            total = getattr(self, name)
            new = total - self._reported[name]
            if new > 0:
                self._reported[name] = total
                log.warning(
                    "pyodlog %s %d call(s) since the last wait_for_save (%d in all; see "
                    "logger.sink.stats()%s)",
                    name,
                    new,
                    total,
                    "" if name == "dropped" else f"; kept in {self.directory / 'quarantine'}",
                )

    def stop(self) -> None:
        """Writes everything queued, closes the segment and ends the thread (idempotent).

        Raises:
            StorageError: calls could not be written (the disk failed at close).
        """
        if self._thread.is_alive() and self._put(_STOP):
            self._thread.join()  # bounded: after _STOP the thread makes one write attempt and ends
        self.raise_if_failed()
        if self._close_error is not None:
            error, self._close_error = self._close_error, None
            left = (
                "; its open segment is recovered by the next logger on this result"
                if self._left_open
                else ""
            )
            raise StorageError(
                f"pyodlog could not write {self.lost_at_close} call(s) when closing ({error}): they "
                f"are counted in stats()['dropped']{left}"
            ) from error

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
            "quarantined": self.quarantined,
            "queued": self.queued,
            "durable": self.durable,
            "segments_closed": len(self.segments_closed),
            "segments_open": int(self._segment is not None),
            "bytes_written": self.bytes_written,
            "queue_depth": self._queue.qsize(),
            "sampled_out": self.sampled_out,
            "aggregate_errors": self.aggregate_errors,
        }

    # -- the thread: one loop over named steps ------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                item = self._next_item()
                if item is _STOP:
                    self._finish()
                    return
                if isinstance(item, _Barrier):
                    self._answer(item)
                    continue
                if item is not None:
                    self._take(item[1])
                if self._due():
                    self._flush()
        except BaseException as error:
            self._die(error)

    def _next_item(self) -> Any:
        """The next queued item, or None when a pending flush or a retry is due first."""
        timeout = None
        if self._pending.n_records or self._inbox or self._jobs or self._broken is not None:
            wake = max(self._first_pending_at + self.config.flush_interval, self._retry_at)
            timeout = max(0.0, wake - time.monotonic())
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _held_full(self) -> bool:
        p = self._pending
        return (
            p.n_images + self._inbox_images >= self.config.batch_images
            or p.nbytes + self._inbox_bytes >= self.config.batch_bytes
        )

    def _take(self, record: CallRecord | PendingRecord) -> None:
        """Turns a record into pending rows; quarantines it if it cannot be; drops it while the disk fails and a batch is held."""
        if self.last_disk_error is not None and self._held_full():
            if isinstance(record, PendingRecord) and self.copier is not None:
                self.copier.release(record)
            self._count_drop(
                1,
                f"the disk fails ({getattr(self.last_disk_error, 'strerror', None) or self.last_disk_error}) and a "
                f"batch of {self._pending.n_records} calls is already held for retry",
                reason="disk_error",
            )
            return
        call: Any = record
        was_empty = not self._pending.n_records and not self._inbox and not self._jobs
        try:
            if isinstance(record, PendingRecord):
                try:
                    call = record.wait()  # device copies: waited for here, on the writer thread
                finally:
                    if self.copier is not None:
                        self.copier.release(record)
            nbytes = _record_nbytes(call)
        except Exception as error:
            self._quarantine(call, 1, _input_ids_of(call), error)
            return
        # Summarised and turned into rows with the other calls of its flush (_rows_of_inbox).
        self._inbox.append(call)
        self._inbox_images += len(call.input_ids)
        self._inbox_bytes += nbytes
        if was_empty:
            self._first_pending_at = time.monotonic()
        self._pipeline()

    def _rows_of_inbox(self) -> None:
        """Every call taken so far becomes pending rows: the summaries computing on the helper
        thread are waited for and applied in order, then the calls still in the inbox are
        summarised here (see :meth:`_apply_summaries`)."""
        self._drain_jobs()
        if not self._inbox:
            return
        calls, self._inbox = self._inbox, []
        self._inbox_images = self._inbox_bytes = 0
        self._apply_summaries(calls, _summaries_of(calls, self.n_class))

    def _pipeline(self) -> None:
        """A full inbox is summarised on the helper thread while this thread writes the batch
        before it: with two summaries under way, the older is applied and its rows appended.

        Only while the disk takes writes (a failing disk keeps the one-batch bound of
        :meth:`_take`); the order of calls, rows and barriers is unchanged.
        """
        full = (
            self._inbox_images >= self.config.batch_images
            or self._inbox_bytes >= self.config.batch_bytes
        )
        if not full or not self.pipelined or self.last_disk_error is not None or self._broken:
            return
        try:
            if self._rows_pool is None:
                self._rows_pool = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"pyodlog-summary-{self.directory.name}"
                )
            job = self._rows_pool.submit(_summaries_of, self._inbox, self.n_class)
        except RuntimeError:  # the interpreter is shutting down: summarised at the flush instead
            self.pipelined = False
            return
        self._jobs.append((self._inbox, job))
        self._inbox = []
        self._inbox_images = self._inbox_bytes = 0
        while len(self._jobs) > 1:
            self._apply_job()
            if self._held_full() and not self._flush(drain=False):
                break  # the disk failed: the rest waits for the retry (drained in order)

    def _apply_job(self) -> None:
        """The oldest summary under way, waited for and applied. While the disk fails with a
        batch held, its calls are dropped and counted instead, as :meth:`_take` drops them."""
        calls, job = self._jobs.popleft()
        if self.last_disk_error is not None and self._held_full():
            job.cancel()
            self._count_drop(
                len(calls),
                f"the disk fails ({getattr(self.last_disk_error, 'strerror', None) or self.last_disk_error}) "
                f"and a batch of {self._pending.n_records} calls is already held for retry",
                reason="disk_error",
            )
            return
        try:
            summarized = job.result()
        except CancelledError:  # the helper was stopped (interpreter exit): summarise here
            summarized = _summaries_of(calls, self.n_class)
        self._apply_summaries(calls, summarized)

    def _drain_jobs(self) -> None:
        """Applies every summary under way, in order; a batch full by then is appended at once, as
        the writer appends a full batch (a disk error is recorded and retried as any)."""
        while self._jobs:
            self._apply_job()
            if self._held_full() and self.last_disk_error is None:
                self._flush(drain=False)

    def _apply_summaries(self, calls: list[CallRecord], summarized: _Summarized) -> None:
        """Counts the calls in the aggregates, and turns the kept ones into pending rows (a call
        that cannot become rows is quarantined)."""
        for error in summarized.errors:
            self._aggregate_failed(error)
        weights = summarized.weights
        if summarized.batch is not None:
            summarized.batch.add_to(
                self.aggregates, [weights[i] is not None for i in summarized.batch_calls]
            )
        for summary, weight in zip(summarized.summaries, weights):
            if isinstance(summary, CallSummary):  # carried, or summarised alone
                self.aggregates.add(summary, kept=weight is not None)
        for call, weight in zip(calls, weights):
            if weight is None:
                with self._lock:
                    self.sampled_out += 1
                continue
            try:
                record_to_columns(call, self._pending, self.storage, weight)
            except ColumnsDiffer as error:
                if not self._split_for(call, weight):
                    self._quarantine(call, 1, _input_ids_of(call), error)
            except Exception as error:
                self._quarantine(call, 1, _input_ids_of(call), error)

    def _split_for(self, call: CallRecord, weight: float | None) -> bool:
        """A call whose columns cannot join the pending batch (e.g. embeddings of another
        width): the pending batch is appended now and the call starts the next one (which goes
        into a segment of its columns). False, and nothing changed for the call, when that
        cannot be done now: a failed segment awaits its rollback, or the disk fails (the call
        is then quarantined, as any call that cannot become rows)."""
        if self._broken is not None or self.last_disk_error is not None:
            return False
        if self._pending.n_records:
            try:
                self._append_pending()
            except OSError as error:  # the batch stays pending, retried as any
                self._disk_failed(error)
                return False
            if self._pending.n_records:
                return False
        try:
            record_to_columns(call, self._pending, self.storage, weight)
        except Exception:
            return False
        return True

    def _aggregate_failed(self, error: Exception) -> None:
        """Counted (``stats()["aggregate_errors"]``); the first one is logged with its traceback."""
        self.aggregate_errors += 1
        self.last_aggregate_error = f"{type(error).__name__}: {error}"
        if self.aggregate_errors == 1:
            log.error(
                "pyodlog could not summarise a call for its aggregates or sampling (the call's rows are "
                "kept; later failures are only counted in stats()['aggregate_errors']): %s",
                self.last_aggregate_error,
                exc_info=error,
            )

    def _write_aggregates_segment(self) -> None:
        """Aggregates of calls that left no rows (all sampled out) and no open segment: a segment of their own."""
        if not self.aggregates or self._segment is not None:
            return
        self._segment_seq += 1
        name = segment_name(time.time_ns(), self.rank, os.getpid(), self._token, self._segment_seq)
        attrs = dict(self.attrs, rank=self.rank, pid=os.getpid(), created=time.time())
        self._segment = _Segment(
            self.directory / name, attrs, self._empty_batch(), self.column_fault
        )
        self._close_segment()

    def _empty_batch(self) -> ColumnBatch:
        """The columns every segment has, without rows."""
        batch = ColumnBatch()
        for name, dtype, row in (
            ("images/det_offset", np.int64, ()),
            ("images/det_count", np.int64, ()),
            ("images/n_epoch", np.int64, ()),
            ("images/timestamp", np.float64, ()),
            ("images/image_size", np.int32, (2,)),
            ("images/sample_weight", np.float32, ()),
            ("detections/boxes", np.float32, (4,)),
            ("detections/scores", np.float32, ()),
            ("detections/labels", np.int64, ()),
            ("detections/candidate_index", np.int64, ()),
            ("detections/logits", np.float32, (self.n_class,)),
        ):
            batch.rows(name, np.empty((0, *row), dtype))
        batch.text("images/input_id", [])
        batch.text("images/dataset_type", [])
        return batch

    def _due(self) -> bool:
        """Whether to write now: a batch is full or old enough, or a failed segment awaits closing."""
        now = time.monotonic()
        if now < self._retry_at:
            return False
        if self._broken is not None:
            return True
        return bool(self._pending.n_records or self._inbox or self._jobs) and (
            self._held_full() or now >= self._first_pending_at + self.config.flush_interval
        )

    def _flush(self, drain: bool = True) -> bool:
        """Rolls a failed segment back, then appends what is pending (with ``drain``, every call
        taken so far). False on a disk error (a retry is scheduled)."""
        if drain:
            self._rows_of_inbox()
        try:
            self._recover_broken()
            if self._pending.n_records:
                self._append_pending()
        except OSError as error:
            self._disk_failed(error)
            return False
        self._disk_ok()
        return True

    def _settle_aggregates(self, rotate: bool) -> bool:
        """At a rotation with no segment open: the pending aggregates go to a segment of their own."""
        if not rotate or self._segment is not None or not self.aggregates:
            return True
        try:
            self._write_aggregates_segment()
        except OSError as error:
            self._disk_failed(error)
            return False
        return True

    def _settle(self, rotate: bool) -> bool:
        """Makes the open segment durable (or closes it); False on a disk error."""
        if self._segment is None:
            return True
        try:
            if rotate:
                self._close_segment()
            else:
                try:
                    self._segment.sync()
                except BaseException:
                    self._segment_failed()
                    raise
        except OSError as error:
            self._disk_failed(error)
            return False
        return True

    def _answer(self, barrier: _Barrier) -> None:
        """A barrier: one write attempt now (even during backoff), then fsync or rotate."""
        if (
            self._flush()
            and self._settle(barrier.rotate)
            and self._settle_aggregates(barrier.rotate)
        ):
            self.durable = self.written
        else:
            barrier.error = self.last_disk_error
        barrier.done.set()

    def _finish(self) -> None:
        """At stop: one last write attempt and close; what cannot be written is counted and reported."""
        flushed = self._flush()
        settled = self._settle(rotate=True)
        if settled and flushed:
            self._settle_aggregates(rotate=True)
        self._stop_pool()
        if settled and flushed:  # the open segment is closed either way
            self.durable = self.written
            return
        lost = self._pending.n_records
        self._pending = ColumnBatch()
        self.lost_at_close = lost
        self._close_error = self.last_disk_error
        with self._lock:
            self.dropped += lost
            if lost:
                self.dropped_by_reason["closing"] = self.dropped_by_reason.get("closing", 0) + lost
        log.error(
            "pyodlog is closing with %d call(s) it could not write: %s",
            lost,
            self.last_disk_error,
        )
        broken = self._broken
        if broken is not None:  # its complete prefix is recovered by the next logger on this result
            self._broken = None
            self._left_open = True
            broken.unlock()
            log.warning("pyodlog left %s for recovery at the next start", broken.part.name)

    def _stop_pool(self) -> None:
        """Ends the helper thread (its summaries were all applied, or are not needed any more)."""
        pool, self._rows_pool = self._rows_pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _die(self, error: BaseException) -> None:
        self._fatal = error
        self._stop_pool()
        log.exception("pyodlog's writer thread failed")
        # Wake every waiter.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Barrier):
                item.done.set()

    def _disk_failed(self, error: OSError) -> None:
        if self.last_disk_error is None:
            log.error(
                "pyodlog cannot write records (%s); %d call(s) held in memory and retried, later "
                "calls dropped and counted until the disk allows writing; inference goes on",
                error,
                self._pending.n_records,
            )
        self.last_disk_error = error
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _disk_ok(self) -> None:
        if self.last_disk_error is not None:
            log.warning("pyodlog writes records again (the disk error cleared)")
        self.last_disk_error = None
        self._rollbacks = 0
        self._backoff = FIRST_BACKOFF
        self._retry_at = 0.0

    # -- segments ------------------------------------------------------------------------------

    def _append_pending(self) -> None:
        batch = self._pending
        if self.retention is not None and not self._fits_budget(batch):
            return
        try:
            self._write(batch)
        except OSError:
            raise  # kept pending: retried after the rollback
        except Exception as error:  # the file refuses this batch: keep it aside, go on
            self._pending = ColumnBatch()
            self._quarantine(batch, batch.n_records, batch.strings.get("images/input_id"), error)
            return
        # In the segment now: whatever happens to the rotation, it is never appended again.
        self.written += batch.n_records
        self.bytes_written += batch.nbytes
        self._pending = ColumnBatch()
        seg = self._segment
        assert seg is not None  # the batch was just appended to it
        if self.retention is not None:
            self.retention.appended(seg.part)
        if (
            seg.counts["records"] >= self.config.segment_max_records
            or seg.nbytes >= self.config.segment_max_bytes
            or time.monotonic() - seg.opened_at >= self.config.segment_max_age
        ):
            self._close_segment()

    def _fits_budget(self, batch: ColumnBatch) -> bool:
        """Whether the batch fits the local disk budget (acknowledged segments are deleted first if
        needed); if not, it is dropped and counted (``"disk_budget"``): the disk never fills."""
        from pyodlog.io.retention import append_bound

        assert self.retention is not None
        new_segment = self._segment is None or not self._segment.accepts(batch)
        if self.retention.admit(append_bound(batch, new_segment)):
            return True
        self._pending = ColumnBatch()
        with self._lock:
            self.dropped += batch.n_records
            self.dropped_by_reason["disk_budget"] = (
                self.dropped_by_reason.get("disk_budget", 0) + batch.n_records
            )
        return False

    def _write(self, batch: ColumnBatch) -> None:
        """Appends a batch to the open segment (opened, or rotated for other columns, as needed)."""
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
            self._segment = _Segment(self.directory / name, attrs, batch, self.column_fault)
        self._segment.column_fault = self.column_fault
        try:
            self._segment.append(batch)
        except BaseException:
            self._segment_failed()
            raise

    def _close_segment(self) -> None:
        if self._segment is None:
            return
        try:
            if self.aggregates:
                self._segment.write_aggregates(self.aggregates.to_json())
            path = self._segment.close()
        except BaseException:
            self._segment_failed()
            raise
        self._segment = None
        self.aggregates = Aggregates(self.n_class)  # in that segment now
        self._closed(path)

    def _closed(self, path: Path) -> None:
        self.segments_closed.append(path)
        for listener in self.segment_listeners:
            try:
                listener(path)
            except Exception:
                log.exception("pyodlog: a segment listener failed")

    def _segment_failed(self) -> None:
        """The open segment failed mid-write: let it go; it is closed as its complete prefix later."""
        seg, self._segment = self._segment, None
        if seg is not None:
            seg.let_go()
            self._broken = seg

    def _recover_broken(self) -> None:
        """Rolls a failed segment back to its last complete append and keeps writing it.

        If its file cannot be reopened, it is closed instead as the images it
        held before the failure (a rewrite, which needs that much free space).

        Raises:
            OSError: the disk still refuses: retried later.
        """
        seg = self._broken
        if seg is None:
            return
        if seg.part.exists():
            try:
                seg.roll_back()
            except OSError as error:
                if error.errno is not None:  # the disk refused (ENOSPC, EIO, ...): retry later
                    raise
                log.warning("pyodlog cannot reopen %s (%s): closing it", seg.part.name, error)
            except Exception as error:
                log.warning("pyodlog cannot reopen %s (%r): closing it", seg.part.name, error)
            else:
                self._broken, self._segment = None, seg
                self._rollbacks += 1
                (log.warning if self._rollbacks == 1 else log.debug)(
                    "pyodlog rolled %s back to its last complete batch (%d images); the failed "
                    "batch is written again",
                    seg.part.name,
                    seg.counts["images"],
                )
                return
        self._close_broken()

    def _close_broken(self) -> None:
        """Closes a failed segment as the images it held before the failure (needs disk space).

        Raises:
            OSError: the rewrite failed (the disk is still full): retried later.
        """
        seg = self._broken
        if seg is None:
            return
        path: Path | None = None
        if seg.part.exists():
            try:
                tables = read_complete(seg.part, seg.counts["images"])
            except Exception as error:  # unreadable: kept aside, never deleted
                tables = None
                self._move_to_quarantine(seg.part, error)
            if tables is not None:
                tables.aggregates = []  # still held in memory: they go into the next segment
                try:
                    path = write_closed(seg.part, tables, rolled_back=True)
                except OSError:
                    raise
                except (
                    Exception
                ) as error:  # not a disk error: the next start's recovery tries again
                    log.error(
                        "pyodlog could not close %s after a failed write (%r): left for recovery "
                        "at the next start",
                        seg.part.name,
                        error,
                    )
        elif seg.path.exists():  # the failure came after the rename: it is closed
            path = seg.path
        seg.unlock()
        self._broken = None
        if path is not None:
            log.warning(
                "pyodlog closed %s after a failed write with the %d image(s) written before it; "
                "the failed batch is written again in a new segment",
                path.name,
                seg.counts["images"],
            )
            self._closed(path)

    def _move_to_quarantine(self, path: Path, error: BaseException) -> None:
        quarantine = self.directory / "quarantine"
        quarantine.mkdir(exist_ok=True)
        os.replace(path, quarantine / path.name)
        log.error("pyodlog could not read %s (%s): moved to %s", path.name, error, quarantine)

    def _quarantine(self, what: Any, n_calls: int, input_ids, error: BaseException) -> None:
        """Keeps records that cannot be written under ``quarantine/`` (pickle + JSON reason); counts them."""
        with self._lock:
            self.quarantined += n_calls
        self._quarantine_seq += 1
        stem = (
            f"records-{time.time_ns():020d}-p{os.getpid()}-{self._token}-{self._quarantine_seq:06d}"
        )
        folder = self.directory / "quarantine"
        description = {
            "reason": f"{type(error).__name__}: {error}",
            "calls": n_calls,
            "input_ids": list(input_ids or []),
            "what": type(what).__name__,
            "pickle": stem + ".pickle",
            "time": time.time(),
            "pyodlog_version": self.attrs.get("pyodlog_version"),
        }
        try:
            folder.mkdir(exist_ok=True)
            try:
                data = pickle.dumps(what, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as pickle_error:
                data = None
                description["pickle"] = None
                description["not_pickled"] = repr(pickle_error)
            if data is not None:
                _write_atomically(folder / (stem + ".pickle"), data)
            _write_atomically(
                folder / (stem + ".json"), json.dumps(description, indent=2).encode("ascii")
            )
        except Exception as write_error:
            log.error(
                "pyodlog could not store %d call(s) (%s) nor keep them in %s (%s): they are lost; "
                "counted in stats()['quarantined']",
                n_calls,
                description["reason"],
                folder,
                write_error,
            )
            return
        log.error(
            "pyodlog could not store %d call(s) (%s): kept in %s; logging goes on",
            n_calls,
            description["reason"],
            folder / (stem + ".json"),
        )


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class _Summarized:
    """What :func:`_summarize_and_sample` found for a list of calls."""

    weights: list[float | None]  # per call: its sample weight, None when sampled out
    summaries: list[Any]  # per call: its CallSummary (carried, or alone) or CallView, or None
    batch: CallsSummary | None  # the summary of the calls batch_calls, computed together
    batch_calls: list[int]
    errors: list[Exception]  # summaries or sampling decisions that failed (the calls are kept)


def _summarize_and_sample(calls: list[CallRecord], n_class: int) -> _Summarized:
    """The calls' aggregate summaries and sample weights; touches nothing else (it may run on the
    writer's helper thread).

    A call that carries its summary (``aggregate_summary``, e.g. made on the call path) is
    counted from it; the others are summarised together (:func:`summarize_calls`), or one by
    one when that fails (a call whose summary fails is kept, not counted, and its error
    reported).
    """
    summaries: list[Any] = [_precomputed(call, n_class) for call in calls]
    todo = [i for i, summary in enumerate(summaries) if summary is None]
    errors: list[Exception] = []
    batch = None
    if todo:
        try:
            batch = summarize_calls([calls[i] for i in todo], n_class)
        except Exception:  # find the call(s) at fault, one by one
            batch = None
        if batch is not None:
            for j, i in enumerate(todo):
                summaries[i] = batch.call(j)
        else:
            for i in todo:
                try:
                    summaries[i] = summarize_call(calls[i], n_class)
                except Exception as error:
                    errors.append(error)
    weights: list[float | None] = []
    for call, summary in zip(calls, summaries):
        weight: float | None = 1.0
        policy = getattr(call, "sampling", None)
        if _sampled_out_before_its_model(call):
            weight = None  # never rows, whether its summary could be made or not
        elif policy is not None and summary is not None:
            try:
                weight = policy.decide(summary, list(call.input_ids))
            except Exception as error:
                errors.append(error)
                weight = 1.0
        weights.append(weight)
    return _Summarized(weights, summaries, batch, todo if batch is not None else [], errors)


def _sampled_out_before_its_model(call: Any) -> bool:
    """The call's draw failed before its model ran and nothing could keep it
    (:attr:`pyodlog.monitoring.sampling.CallDecision.sampled_out`): it never becomes rows (an
    output-only record could not: it holds no logits)."""
    return bool(getattr(getattr(call, "sampling", None), "sampled_out", False))


def _summaries_of(calls: list[CallRecord], n_class: int) -> _Summarized:
    """:func:`_summarize_and_sample`; if even that fails, every call is kept and left uncounted
    (the error is reported; a call that cannot become rows is quarantined later), but for the
    calls sampled out before their model ran (never rows)."""
    try:
        return _summarize_and_sample(calls, n_class)
    except Exception as error:
        weights = [None if _sampled_out_before_its_model(c) else 1.0 for c in calls]
        return _Summarized(weights, [None] * len(calls), None, [], [error])


def _record_nbytes(call: CallRecord) -> int:
    """Bytes of a call's tensors (what its rows will hold, about), for the batch size limit."""
    total = sum(t.numel() * t.element_size() for t in call.detections.all_tensors())
    return total + sum(f.nbytes for f in call.features.values())


def _precomputed(call: CallRecord, n_class: int) -> CallSummary | None:
    """The call's own summary (``call.aggregate_summary``, what :func:`summarize_call` returns,
    e.g. made on the call path) when it has one that fits these aggregates; else None."""
    summary = getattr(call, "aggregate_summary", None)
    return summary if summary_fits(summary, n_class) else None


def _input_ids_of(record: Any) -> list[str]:
    try:
        return [str(i) for i in record.input_ids]
    except Exception:
        return []
