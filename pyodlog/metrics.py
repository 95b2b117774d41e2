"""Prometheus metrics of pyodlog loggers (optional: ``pip install pyodlog[metrics]``).

    import pyodlog
    logger = pyodlog.create_logger(model, model_name="detector", version_name="v1")  # metrics=None
    # prometheus_client installed: the default registry now reports pyodlog_* for this logger;
    # a serving app's existing /metrics (make_asgi_app(), start_http_server()) shows them.
    pyodlog.expose_metrics(logger, registry=my_registry)  # or on another registry

Metric names, labels and what each one reads from ``logger.stats()``: :data:`METRICS` and the
README's *Running in production*. The implementation is :mod:`pyodlog.monitoring.metrics`.
"""

from pyodlog.monitoring.metrics import (
    METRICS,
    PyodlogCollector,
    expose_metrics,
    prometheus_available,
)

__all__ = ["METRICS", "PyodlogCollector", "expose_metrics", "prometheus_available"]
