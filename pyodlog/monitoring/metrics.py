"""Prometheus metrics of pyodlog loggers, read from ``logger.stats()`` at scrape time.

One custom collector per registry (``prometheus_client``'s default registry unless another is
given) reports every live logger exposed on it, labelled ``model``, ``version``, ``result`` and
``rank`` (no endpoint, no key, nothing secret). Nothing runs on the inference path: the numbers
are the counters the logger keeps anyway, read when Prometheus scrapes.

``prometheus_client`` is an optional dependency (``pip install pyodlog[metrics]``); pyodlog
imports it only here, when metrics are asked for.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyodlog.monitoring.monitoring_logger import MonitoringLogger

__all__ = ["METRICS", "PyodlogCollector", "expose_metrics", "prometheus_available"]

log = logging.getLogger("pyodlog")

#: name (without ``pyodlog_``), kind, the ``stats()`` key, help text. Counters get ``_total``.
METRICS: list[tuple[str, str, str, str]] = [
    (
        "calls_seen",
        "counter",
        "calls_seen",
        "Calls the model answered while logged (logged or not).",
    ),
    ("calls_logged", "counter", "calls_logged", "Calls whose records were stored."),
    (
        "calls_sampled_out",
        "counter",
        "calls_sampled_out",
        "Calls not recorded by the sampling policy (their aggregates are kept).",
    ),
    (
        "logging_errors",
        "counter",
        "logging_errors",
        "Calls whose output was returned but whose record could not be made.",
    ),
    (
        "quarantined",
        "counter",
        "quarantined",
        "Calls kept aside under quarantine/ (could not become rows).",
    ),
    ("bytes_written", "counter", "bytes_written", "Bytes of records appended to segments."),
    (
        "segments_deleted",
        "counter",
        "segments_deleted",
        "Acknowledged segments deleted to stay under the local disk budget.",
    ),
    (
        "segments_dropped_unsynced",
        "counter",
        "segments_dropped_unsynced",
        "Unacknowledged segments deleted (Retention(drop_unsynced=True) only).",
    ),
    ("queue_depth", "gauge", "queue_depth", "Calls waiting in the writer's queue."),
    (
        "queued_calls",
        "gauge",
        "queued",
        "Calls submitted but not yet written, dropped or quarantined.",
    ),
    ("local_bytes", "gauge", "local_bytes", "Bytes the result folder uses on the local disk."),
    ("local_budget_bytes", "gauge", "local_budget_bytes", "The result folder's local disk budget."),
    ("over_budget", "gauge", "over_budget", "1 while new records are dropped for the disk budget."),
    (
        "sync_lag_seconds",
        "gauge",
        "sync_lag_seconds",
        "Age of the oldest closed segment the collector has not acknowledged (0: none).",
    ),
    ("sync_bytes_sent", "counter", "sync_bytes_sent", "Bytes sent to the collector."),
]
SEGMENT_STATES = ("open", "closed", "synced", "pending")
# Reported (0 until they happen) so that rate() and alerts work from the first scrape.
DROP_REASONS = ("queue_full", "disk_budget", "disk_error", "closing")
LABELS = ("model", "version", "result", "rank")


def prometheus_available() -> bool:
    """Whether ``prometheus_client`` can be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class PyodlogCollector:
    """A ``prometheus_client`` custom collector over the loggers exposed on one registry."""

    def __init__(self) -> None:
        self._loggers: weakref.WeakSet[MonitoringLogger] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, logger: MonitoringLogger) -> None:
        with self._lock:
            self._loggers.add(logger)

    def describe(self) -> list[Any]:
        # Nothing to check at registration (the loggers come and go); collect() runs at scrape.
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            loggers = list(self._loggers)
        families: dict[str, Any] = {}
        for name, kind, _, doc in METRICS:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            families[name] = cls(f"pyodlog_{name}", doc, labels=LABELS)
        dropped = CounterMetricFamily(
            "pyodlog_dropped",
            "Calls whose records were dropped, by reason (queue_full, disk_budget, disk_error, "
            "closing, device_copies, forked_child).",
            labels=(*LABELS, "reason"),
        )
        segments = GaugeMetricFamily(
            "pyodlog_segments",
            "Segments of the result: open (this process), closed (by this process), synced "
            "(acknowledged), pending (closed, not yet acknowledged).",
            labels=(*LABELS, "state"),
        )
        up = GaugeMetricFamily(
            "pyodlog_logger_error",
            "1 while the logger reports an error (stats()['last_error']; the text is in stats()).",
            labels=LABELS,
        )
        for logger in loggers:
            if getattr(logger, "_closed", True):
                continue
            try:
                stats = logger.stats()
            except Exception as error:  # a scrape never fails because of one logger
                log.debug("pyodlog: stats() failed during a scrape: %r", error)
                continue
            labels = [str(v) for v in _labels(logger)]
            for name, _, key, _ in METRICS:
                value = stats.get(key)
                if isinstance(value, (bool, int, float)):
                    families[name].add_metric(labels, float(value))
            reasons = dict.fromkeys(DROP_REASONS, 0)
            reasons.update(stats.get("dropped_by_reason") or {})
            for reason, count in sorted(reasons.items()):
                dropped.add_metric([*labels, str(reason)], float(count))
            for state in SEGMENT_STATES:
                value = stats.get(f"segments_{state}")
                if isinstance(value, (int, float)):
                    segments.add_metric([*labels, state], float(value))
            up.add_metric(labels, 1.0 if stats.get("last_error") else 0.0)
        yield from families.values()
        yield dropped
        yield segments
        yield up


def _labels(logger: MonitoringLogger) -> tuple[str, str, str, int]:
    dist = getattr(logger, "_dist", None)
    rank = dist.rank if dist is not None else getattr(logger.sink, "rank", 0)
    return logger.model_name, logger.version_name, logger.result_name, int(rank)


_COLLECTORS: weakref.WeakKeyDictionary[Any, PyodlogCollector] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def expose_metrics(logger: MonitoringLogger, registry: Any = None) -> Any:
    """Reports ``logger.stats()`` as Prometheus metrics (names ``pyodlog_*``) on ``registry``.

    Registers, once per registry, a custom collector that reads the stats of every logger exposed
    on it when the registry is scraped (``prometheus_client.generate_latest``, ``make_asgi_app``,
    ``start_http_server``): no cost on the inference path. A closed logger disappears from the
    scrape. ``create_logger(..., metrics=...)`` calls this for you.

    Args:
        logger: a pyodlog logger.
        registry: a ``prometheus_client.CollectorRegistry``; None: ``prometheus_client.REGISTRY``
            (the default registry a serving app's ``/metrics`` already shows).

    Returns:
        The registry used.

    Raises:
        ImportError: ``prometheus_client`` is not installed (``pip install pyodlog[metrics]``).
    """
    try:
        import prometheus_client
    except ImportError as error:
        raise ImportError(
            "pyodlog's Prometheus metrics need prometheus_client: pip install 'pyodlog[metrics]' "
            "(or prometheus-client), or pass metrics=False"
        ) from error
    if registry is None:
        registry = prometheus_client.REGISTRY
    with _REGISTRY_LOCK:
        collector = _COLLECTORS.get(registry)
        if collector is None:
            collector = PyodlogCollector()
            registry.register(collector)
            _COLLECTORS[registry] = collector
    collector.add(logger)
    return registry
