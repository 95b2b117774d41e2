"""The production part of ``logger.stats()``: calls, drops by reason, bytes, segments, sync lag, errors.

:meth:`MonitoringLogger.stats` merges the sink's counters with :func:`production_stats`; the keys
are documented there and in ``docs/specification.md`` (*Health: stats() and metrics*). Everything
here reads counters the logger, the writer, the syncer and the disk budget keep anyway, plus one
folder listing for the sync state: nothing runs on the inference path.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyodlog.monitoring.monitoring_logger import MonitoringLogger

__all__ = ["STATS_KEYS", "production_stats"]

#: Every key :meth:`MonitoringLogger.stats` has, whatever the sink (a sink may add its own).
STATS_KEYS = (
    "calls_seen",
    "calls_logged",
    "calls_sampled_out",
    "logging_errors",
    "last_logging_error",
    "dropped",
    "dropped_by_reason",
    "quarantined",
    "queued",
    "queue_depth",
    "bytes_written",
    "segments_open",
    "segments_closed",
    "segments_synced",
    "segments_pending",
    "sync_lag_seconds",
    "sync_bytes_sent",
    "local_bytes",
    "local_budget_bytes",
    "over_budget",
    "segments_deleted",
    "segments_dropped_unsynced",
    "last_error",
)


def production_stats(logger: MonitoringLogger, stats: dict[str, Any]) -> dict[str, Any]:
    """Completes ``stats`` (the sink's counters and the logging errors) with the production keys."""
    with logger._errors_lock:
        seen = getattr(logger, "_calls_seen", 0)
        sampled_out = getattr(logger, "_calls_sampled_out", 0)
        submitted_by_logger = getattr(logger, "_records_submitted", 0)
    stats["calls_seen"] = seen
    # Left out by sampling: the writer's count for a segment store (every call whose rows the
    # policy left out, decided before the model ran or from its output); for another sink, which
    # applies no policy, the calls the logger sampled out before their model ran.
    stats["calls_sampled_out"] = stats.get("sampled_out", sampled_out)
    # Stored: the writer's count for a segment store; what was handed over for another sink,
    # less the calls sampled out.
    stats["calls_logged"] = stats.get("written", submitted_by_logger - sampled_out)
    stats.setdefault("dropped", 0)
    stats.setdefault("dropped_by_reason", {})
    stats.setdefault("quarantined", 0)
    stats.setdefault("queued", 0)
    stats.setdefault("queue_depth", 0)
    stats.setdefault("bytes_written", 0)
    stats.setdefault("segments_open", 0)
    stats.setdefault("segments_closed", 0)
    for key, default in (
        ("local_bytes", None),
        ("local_budget_bytes", None),
        ("over_budget", False),
        ("segments_deleted", 0),
        ("segments_dropped_unsynced", 0),
    ):
        stats.setdefault(key, default)
    syncer = getattr(logger, "_syncer", None)
    synced = pending = 0
    lag = 0.0
    sent = 0
    errors: list[str] = []
    writer = getattr(logger.sink, "writer", None)
    disk_error = getattr(writer, "last_disk_error", None)
    if disk_error is not None:
        errors.append(f"disk: {getattr(disk_error, 'strerror', None) or disk_error}")
    if syncer is not None:
        try:
            synced = len(syncer.state.acknowledged_names())
            waiting = syncer.pending()
            pending = len(waiting)
            oldest = None
            for path in waiting:
                try:
                    mtime = os.stat(path).st_mtime
                except FileNotFoundError:
                    continue
                oldest = mtime if oldest is None else min(oldest, mtime)
            if oldest is not None:
                lag = max(0.0, time.time() - oldest)
        except Exception as error:  # stats() never raises for the sync state
            errors.append(f"sync state: {type(error).__name__}: {error}")
        sent = int(getattr(getattr(syncer, "total", None), "bytes", 0) or 0)
        if syncer.last_error is not None:
            errors.append(f"sync: {syncer.last_error}")
    guard = getattr(logger.sink, "retention", None)
    if guard is not None and guard.last_error:
        errors.append(f"retention: {guard.last_error}")
    if stats.get("last_logging_error"):
        errors.append(f"logging: {stats['last_logging_error']}")
    stats["segments_synced"] = synced
    stats["segments_pending"] = pending
    stats["sync_lag_seconds"] = lag
    stats["sync_bytes_sent"] = sent
    last = errors[0] if errors else None
    if last is not None and syncer is not None:
        last = syncer.client.redact(last)  # never the key, even if an error echoed it
    stats["last_error"] = last
    return stats
