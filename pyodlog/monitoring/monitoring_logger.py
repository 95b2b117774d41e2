"""MonitoringLogger: the model-agnostic part of a logger.

Names and result, epoch resolution, the sink that records go to, the API
endpoint and key, and the lifecycle (``close()``, context manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from abc import ABCMeta
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pyodlog._checks import check_number
from pyodlog.distributed import DistContext, DistributedLoggingError, current_context
from pyodlog.io.segment import segment_rank
from pyodlog.io.sink import SegmentStore, Sink
from pyodlog.structures import CallRecord

if TYPE_CHECKING:
    from pyodlog.sync import SyncConfig, Syncer, UploadSummary

__all__ = ["LoggerClosedError", "MonitoringLogger"]

log = logging.getLogger("pyodlog")
# At most one error line per this many seconds when calls cannot be logged (each is counted).
ERROR_LOG_INTERVAL = 10.0


class LoggerClosedError(RuntimeError):
    """The logger was closed; create a new one."""


class _ActivatesSinkWhenBuilt(ABCMeta):
    """Activates the logger's sink once its whole constructor has returned.

    So a result is replaced (``force_table_recreate``) and a writer thread
    started only after every check of the constructor passed: a constructor
    that fails leaves the stored data as it was and no thread running.
    """

    def __call__(cls, *args, **kwargs):
        logger = super().__call__(*args, **kwargs)
        activate = getattr(getattr(logger, "_sink", None), "activate", None)
        if activate is not None:
            try:
                activate()
            except BaseException:
                with contextlib.suppress(Exception):
                    logger.close()
                raise
        return logger


class MonitoringLogger(metaclass=_ActivatesSinkWhenBuilt):
    """Model-agnostic logger state. Subclasses call :meth:`_init_monitoring` once.

    The sink is activated (a replacement done, its writer started) when the
    subclass's constructor returns.
    """

    def _init_monitoring(
        self,
        model_name: str,
        version_name: str,
        result_name: str | None,
        n_epoch: str | int | None,
        schema: dict[str, Any],
        force_table_recreate: bool,
        auto_sync: bool,
        api_endpoint: str | None,
        api_key: str | None,
        sink: Sink | None,
        sync_config: SyncConfig | None = None,
        retention: Any = None,
        metrics: Any = None,
    ) -> None:
        from pyodlog.monitoring import wiring

        self.model_name, self.version_name, n_epoch = wiring.check_logger_args(
            model_name, version_name, result_name, n_epoch, auto_sync, force_table_recreate
        )
        retention_policy = wiring.check_retention(retention, sink)
        metrics_registry = wiring.check_metrics(metrics)
        sync = wiring.resolve_sync(api_endpoint, api_key, auto_sync, sync_config)
        self.api_endpoint: str | None = sync.endpoint
        self._api_key = sync.key  # a Secret: never part of repr(), str() or an error message
        self.auto_sync = sync.auto
        self.schema = schema
        if sink is None:
            from pyodlog.io.store import HDF5Store  # the embedded default: local HDF5 files

            sink = HDF5Store()
        self._sink: Sink = sink
        self._init_call_state()
        # Under torch.distributed, rank 0 resolves the result and the epoch and every rank follows.
        self._dist: DistContext | None = current_context()
        self.result_name, self.n_epoch = wiring.open_result(
            sink,
            self._dist,
            self.model_name,
            self.version_name,
            result_name,
            n_epoch,
            schema,
            force_table_recreate,
            defaulted=getattr(self, "_schema_defaults", ()),
        )
        self._syncer: Syncer | None = wiring.make_syncer(
            sink, sync, self.model_name, self.version_name, self.result_name, self.n_epoch
        )
        wiring.attach_retention(sink, retention_policy, self._syncer)
        wiring.attach_metrics(self, metrics_registry)

    def _init_call_state(self) -> None:
        """Calls in flight (``close()`` waits for them) and the count of calls that could not be logged."""
        self._closed = False
        self._calls_lock = threading.Condition()
        self._calls_in_flight = 0
        self._calls_in_thread = threading.local()
        self._close_lock = threading.Lock()
        self._sink_closed = False
        self._errors_lock = threading.Lock()
        self._logging_errors = 0
        self._last_logging_error: str | None = None
        self._last_error_report = -ERROR_LOG_INTERVAL
        # stats(): calls the model answered, records handed to the sink, calls a sampler left out
        # (all under _errors_lock).
        self._calls_seen = 0
        self._records_submitted = 0
        self._calls_sampled_out = 0

    def _count_call_seen(self) -> None:
        """One more call the model answered while logged (``stats()["calls_seen"]``)."""
        with self._errors_lock:
            self._calls_seen += 1

    def _count_sampled_out(self) -> None:
        """One more call sampled out before its model ran (``stats()["calls_sampled_out"]`` of a
        sink that applies no sampling policy itself; a segment store counts its own)."""
        with self._errors_lock:
            self._calls_sampled_out += 1

    @property
    def has_api_key(self) -> bool:
        """Whether an API key was given (the key itself is never exposed)."""
        return self._api_key is not None

    @property
    def sink(self) -> Sink:
        """Where this logger's records go."""
        return self._sink

    def _check_open(self) -> None:
        if self._closed:
            raise LoggerClosedError(
                f"{type(self).__name__} for {self.model_name}/{self.version_name} is closed: create a new logger"
            )

    @contextmanager
    def _call_in_flight(self) -> Iterator[None]:
        """Admits one call (``LoggerClosedError`` once ``close()`` began) and counts it until it ends.

        ``close()`` waits for every admitted call, so a call that started before
        it runs to the end and its record is stored; no lock is held meanwhile.
        """
        with self._calls_lock:
            self._check_open()
            self._calls_in_flight += 1
        self._calls_in_thread.depth = getattr(self._calls_in_thread, "depth", 0) + 1
        try:
            yield
        finally:
            self._calls_in_thread.depth -= 1
            with self._calls_lock:
                self._calls_in_flight -= 1
                if not self._calls_in_flight:
                    self._calls_lock.notify_all()

    def _stop_calls(self) -> None:
        """Refuses new calls and waits for those in flight (in other threads) to finish."""
        if getattr(self._calls_in_thread, "depth", 0):
            raise RuntimeError(
                f"close() was called from inside a call of this {type(self).__name__} (e.g. from a model "
                "hook): close the logger after the call returns"
            )
        with self._calls_lock:
            self._closed = True
            self._calls_lock.wait_for(lambda: not self._calls_in_flight)

    async def acall(
        self,
        *args: Any,
        executor: Executor | None = None,
        inference_mode: bool = True,
        **kwargs: Any,
    ) -> Any:
        """``await logger.acall(...)``: the call ``logger(...)``, run in a worker thread.

        For asyncio servers: the model and the logging both run in ``executor``
        (default: the event loop's default thread pool), so the event loop is
        never blocked by inference nor by logging; the arguments and the
        return value are those of ``logger(...)``. The call runs in a copy of
        the caller's ``contextvars`` context. After it, ``get_hooked_features``
        in the awaiting thread returns what this call captured.

        Args:
            *args, **kwargs: as for ``logger(...)`` (``executor`` and
                ``inference_mode`` are this method's own).
            executor: a ``concurrent.futures`` executor to run the call in
                (e.g. a ThreadPoolExecutor sized to the device); None: the loop's default.
            inference_mode: run the call under ``torch.inference_mode()`` (grad
                mode is per thread: the awaiting thread's does not reach the
                worker); False: the worker thread's own grad mode.

        Returns:
            Exactly what ``model(model_input)`` returns.
        """
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        take = getattr(self, "_thread_captures", None)
        adopt = getattr(self, "_adopt_thread_captures", None)

        def work():
            with torch.inference_mode(inference_mode):
                output = self(*args, **kwargs)
            return output, (take() if take is not None else None)

        output, captures = await loop.run_in_executor(executor, context.run, work)
        if adopt is not None and captures is not None:
            adopt(captures)
        return output

    def _logging_failed(self, error: Exception) -> None:
        """A logging problem after the model answered: counted, reported, never raised into the call."""
        now = time.monotonic()
        with self._errors_lock:
            self._logging_errors += 1
            self._last_logging_error = f"{type(error).__name__}: {error}"
            report = now - self._last_error_report >= ERROR_LOG_INTERVAL
            if report:
                self._last_error_report = now
            count = self._logging_errors
        if report:  # the first, then at most one line per interval (the count is in stats())
            log.error(
                "pyodlog could not log a call of %s/%s (the model's output was returned; %d such call(s) "
                "so far): %s",
                self.model_name,
                self.version_name,
                count,
                self._last_logging_error,
                exc_info=error,
            )

    def stats(self) -> dict[str, Any]:
        """What happened to the calls, as one dict (cheap: counters and one folder listing; also after ``close()``).

        The sink's counters (``submitted``, ``written``, ``dropped``, ``quarantined``, ``queued``,
        ``durable``, …), ``logging_errors`` (calls whose output was returned but whose record could
        not be made) and ``last_logging_error`` (its message, or None), and always:

        - ``calls_seen``: calls the model answered while logged; ``calls_logged``: calls whose
          records were stored; ``calls_sampled_out``: calls a sampling policy did not record (0
          without sampling).
        - ``dropped`` (int) and ``dropped_by_reason`` (``{"queue_full", "disk_budget",
          "disk_error", "closing", "device_copies", "forked_child": n}``, reasons that occurred).
        - ``queue_depth`` (calls waiting in the writer's queue), ``queued`` (submitted, not yet
          written, dropped or quarantined), ``bytes_written``.
        - ``segments_open``, ``segments_closed`` (by this process), ``segments_synced``
          (acknowledged by the collector), ``segments_pending`` (closed, not yet acknowledged),
          ``sync_lag_seconds`` (age of the oldest pending segment, 0 if none), ``sync_bytes_sent``.
        - The disk budget (:class:`pyodlog.Retention`): ``local_bytes``, ``local_budget_bytes``
          (None without a budget), ``over_budget``, ``segments_deleted`` (acknowledged, deleted to
          fit), ``segments_dropped_unsynced`` (only with ``drop_unsynced=True``).
        - ``last_error``: the current disk or sync error, else the last logging error (None if
          none); never holds the API key.
        """
        from pyodlog.monitoring.health import production_stats

        stats: dict[str, Any] = dict(self._sink.stats())
        with self._errors_lock:
            stats["logging_errors"] = self._logging_errors
            stats["last_logging_error"] = self._last_logging_error
        return production_stats(self, stats)

    def _submit(self, record: CallRecord) -> None:
        record.model_name, record.version_name, record.result_name = (
            self.model_name,
            self.version_name,
            self.result_name,
        )
        # The sampling policy travels with the record: the store applies it, off the call's path
        # (a call path that drew the call before its model ran set its CallDecision already).
        if record.sampling is None:
            record.sampling = getattr(self, "_sampling", None)
        self._sink.submit(record)
        with self._errors_lock:
            self._records_submitted += 1

    def wait_for_save(self, interval: float = 3) -> None:
        """Blocks until every record submitted so far is stored by the sink.

        Args:
            interval: seconds between progress reports.
        """
        check_number(interval, "interval (seconds)")
        self._sink.wait_for_save(interval)

    def export(self, output_path: str | None = None, *, timeout: float = 300.0) -> Path | None:
        """Exports the records of the resolved ``n_epoch`` as a ZIP archive.

        Waits for pending saves, closes the open segment, and writes a ZIP with
        ``manifest.json`` (names, epoch, counts, schema, checksums) and
        ``records.h5`` (the selected records in the segment layout), atomically.
        Read it back with :func:`pyodlog.open_result`.

        Under ``torch.distributed`` it is collective: every rank saves and
        closes its segment, rank 0 waits for all of them (at most ``timeout``
        seconds) and exports every rank's records in one ZIP; the other ranks
        return None. The ranks must share the data folder (``PYODLOG_HOME``);
        without a shared file system, use ``auto_sync`` to a collector, which
        merges the ranks by result.

        Args:
            output_path: a ``.zip`` path, or a folder (the default file name
                ``<model>_<version>_<result>_epoch<N>.zip`` is appended);
                default the current directory.
            timeout: seconds rank 0 waits for the other ranks (distributed only).

        Returns:
            The ZIP's path (None on ranks other than 0).

        Raises:
            pyodlog.DistributedLoggingError: a rank did not arrive in time, or
                rank 0 cannot see another rank's segments.
        """
        store = self._sink
        if not isinstance(store, SegmentStore):
            raise NotImplementedError(
                f"export() needs records on disk, but this logger's sink ({type(self._sink).__name__}) keeps them "
                f"in memory: read them with logger.sink.records(model_name, version_name, result_name)"
            )
        names = (self.model_name, self.version_name, self.result_name)
        if self._dist is None:
            self.wait_for_save()
            return store.export(self.n_epoch, names, output_path)
        store.rotate()  # saves everything submitted (as wait_for_save does) and closes the segment
        self._dist.barrier(timeout, "export()")
        mine = [p.name for p in store.segments() if segment_rank(p.name) == self._dist.rank]
        by_rank = self._dist.gather_to_rank0(mine)
        if self._dist.rank != 0 or by_rank is None:  # only rank 0 receives the lists
            return None
        visible = {p.name for p in store.segments()}
        for rank, names in enumerate(by_rank):
            missing = [n for n in names if n not in visible]
            if missing:
                raise DistributedLoggingError(
                    f"export() on rank 0 cannot see {len(missing)} segment(s) of rank {rank} in {store.directory} "
                    f"(e.g. {missing[0]}): the ranks do not share PYODLOG_HOME. Point every rank at one shared "
                    "folder, or use auto_sync to a collector, which merges the ranks by result"
                )
        return store.export(self.n_epoch, names, output_path)

    def upload(self) -> UploadSummary:
        """Sends every record not yet acknowledged by the collector at ``api_endpoint``, and waits.

        Waits for pending saves, closes the open segment, then sends every
        closed segment of the result that holds records of the resolved
        ``n_epoch`` (all for None) and that the collector has not acknowledged:
        idempotent, resumable, and a no-op when everything was sent. Shows a
        progress bar in an interactive terminal.

        Returns:
            An :class:`~pyodlog.sync.UploadSummary` (segments, bytes, seconds, already stored).

        Raises:
            RuntimeError: no endpoint is configured.
            pyodlog.SyncError: the collector could not be reached or refused
                (the message names the endpoint and why; what was sent stays sent).
        """
        self._check_open()
        if self.api_endpoint is None:
            raise RuntimeError(
                "upload() needs an endpoint: pass api_endpoint=... and api_key=..., or set "
                "PYODLOG_API_ENDPOINT and PYODLOG_API_KEY"
            )
        if self._syncer is None or not isinstance(self._sink, SegmentStore):
            raise NotImplementedError(
                f"upload() sends stored segments, but this logger's sink ({type(self._sink).__name__}) stores none"
            )
        self._sink.rotate()  # saves everything submitted (as wait_for_save does) and closes the segment
        return self._syncer.upload_all()

    @property
    def syncer(self) -> Syncer | None:
        """The uploader (None without an endpoint): ``syncer.stats()``, ``syncer.pending()``."""
        return self._syncer

    def _close_monitoring(self) -> None:
        self._stop_calls()
        with self._close_lock:  # a second close() returns once the first one is done
            if self._sink_closed:
                return
            self._sink_closed = True
            try:
                self._sink.close()  # closes the last segment, which the syncer then sends
            finally:
                if self._syncer is not None:
                    self._syncer.close()

    def close(self) -> None:
        """Flushes and releases everything; idempotent, callable from any thread.

        New calls raise ``LoggerClosedError`` from the moment it starts; calls
        already running in other threads finish and their records are stored
        before the sink closes.
        """
        self._close_monitoring()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_name={self.model_name!r}, version_name={self.version_name!r}, "
            f"result_name={self.result_name!r}, n_epoch={self.n_epoch!r}, api_endpoint={self.api_endpoint!r}, "
            f"api_key={'<set>' if self.has_api_key else None})"
        )
