"""How a logger is put together when it is built, one step each.

:meth:`MonitoringLogger._init_monitoring` calls these in order: check the model-agnostic
arguments, resolve the endpoint and key, open the result (agreed across ``torch.distributed``
ranks), then make the syncer that sends closed segments to the collector. Each step raises a
``ValueError`` naming the argument before anything is written.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from pyodlog.distributed import DistContext, agree
from pyodlog.io.retention import Retention
from pyodlog.io.sink import SchemaMismatchError, SegmentStore, Sink
from pyodlog.monitoring.validation import check_n_epoch, check_name
from pyodlog.sync import CollectorClient, SyncConfig, Syncer, check_api_key, check_endpoint
from pyodlog.sync.secret import Secret

__all__ = [
    "SyncSettings",
    "attach_metrics",
    "attach_retention",
    "check_logger_args",
    "check_metrics",
    "check_retention",
    "make_syncer",
    "open_result",
    "open_with_class_names",
    "resolve_sync",
]


@dataclass(frozen=True)
class SyncSettings:
    """Where closed segments go: the endpoint (None: nowhere), its key, the client's settings."""

    endpoint: str | None
    key: Secret | None
    config: SyncConfig
    auto: bool


def check_logger_args(
    model_name: Any,
    version_name: Any,
    result_name: Any,
    n_epoch: Any,
    auto_sync: Any,
    force_table_recreate: Any,
) -> tuple[str, str, str | int | None]:
    """The checked ``(model_name, version_name, n_epoch)``; ``result_name`` is checked too."""
    model_name = check_name(model_name, "model_name")
    version_name = check_name(version_name, "version_name")
    check_name(result_name, "result_name", allow_none=True)
    for name, value in (("auto_sync", auto_sync), ("force_table_recreate", force_table_recreate)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    return model_name, version_name, check_n_epoch(n_epoch)


def resolve_sync(
    api_endpoint: str | None, api_key: str | None, auto_sync: bool, config: SyncConfig | None
) -> SyncSettings:
    """The endpoint and key from the arguments, else ``PYODLOG_API_ENDPOINT`` / ``PYODLOG_API_KEY``.

    Raises:
        ValueError: a malformed endpoint or key (the message never shows the key), or an endpoint
            without a key.
    """
    if config is None:
        config = SyncConfig()
    elif not isinstance(config, SyncConfig):
        raise ValueError(f"sync_config must be a pyodlog.SyncConfig, got {type(config).__name__}")
    endpoint = api_endpoint if api_endpoint is not None else os.environ.get("PYODLOG_API_ENDPOINT")
    if endpoint and endpoint.startswith("s3://"):
        # An object store: credentials come from the AWS chain, not an API key.
        from pyodlog.sync.s3 import check_s3_endpoint

        return SyncSettings(check_s3_endpoint(endpoint), None, config, auto_sync)
    endpoint = check_endpoint(endpoint, config.allow_insecure_http) if endpoint else None
    key = api_key if api_key is not None else os.environ.get("PYODLOG_API_KEY") or None
    if key is not None:
        check_api_key(key)  # visible ASCII only; the error never shows the key
    if endpoint is not None and key is None:
        raise ValueError(
            f"api_endpoint {endpoint!r} needs an API key: pass api_key=... or set PYODLOG_API_KEY"
        )
    # The key is held in a Secret: never part of repr(), str() or an error message.
    return SyncSettings(
        endpoint, None if key is None else Secret(key), config, auto_sync and endpoint is not None
    )


def open_result(
    sink: Sink,
    dist: DistContext | None,
    model_name: str,
    version_name: str,
    result_name: str | None,
    n_epoch: str | int | None,
    schema: dict[str, Any],
    force_recreate: bool,
    defaulted: tuple[str, ...] = (),
) -> tuple[str, int | None]:
    """Resolves the result and the epoch (``'latest'``: the highest in the result, 0 if none).

    Under ``torch.distributed`` rank 0 decides and every rank follows, so all ranks write one result.
    ``defaulted``: schema keys a default filled in (see :func:`open_with_class_names`).
    """

    def resolve() -> tuple[str, int | None]:
        info = open_with_class_names(
            sink, model_name, version_name, result_name, schema, force_recreate, defaulted
        )
        if dist is not None:
            # The other ranks open the result that rank 0 made: any replacement happens now.
            sink.activate()
        # check_n_epoch leaves one str: 'latest'.
        epoch = (info.latest_epoch or 0) if isinstance(n_epoch, str) else n_epoch
        return info.result_name, epoch

    resolved_result, resolved_epoch = agree(dist, resolve)
    if dist is not None and dist.rank != 0:
        try:
            open_with_class_names(
                sink, model_name, version_name, resolved_result, schema, False, defaulted
            )
        except SchemaMismatchError:
            if not force_recreate:
                raise
            # Rank 0 recreated the result already; a mismatch here means this rank's data folder is
            # not rank 0's (no shared file system) and holds an older schema.
            sink.open_result(model_name, version_name, resolved_result, schema, True)
    return resolved_result, resolved_epoch


def make_syncer(
    sink: Sink,
    sync: SyncSettings,
    model_name: str,
    version_name: str,
    result_name: str,
    n_epoch: int | None,
) -> Syncer | None:
    """The uploader of closed segments (None without an endpoint, or for a sink that stores none).

    Closed segments go to the collector from disk, never from the inference path; with ``auto``
    the syncer is told each time the store closes one.
    """
    if sync.endpoint is None or not isinstance(sink, SegmentStore) or sink.directory is None:
        return None
    if sync.endpoint.startswith("s3://"):
        from pyodlog.sync.s3 import S3Target

        target: CollectorClient | S3Target = S3Target(sync.endpoint, sync.config)
    else:
        target = CollectorClient(sync.endpoint, sync.key, sync.config)
    syncer = Syncer(
        target,
        sink.segments,
        sink.directory,
        model_name,
        version_name,
        result_name,
        sink.rank,
        n_epoch,
        sync.config,
        auto=sync.auto,
    )
    if sync.auto:
        sink.add_segment_listener(lambda path: syncer.notify())
    return syncer


def check_retention(retention: Any, sink: Sink | None) -> Retention | None:
    """The disk budget to keep: ``Retention()`` for None/True, None for False (no budget).

    Raises:
        ValueError: not a ``pyodlog.Retention`` / bool / None, or an explicit ``Retention`` for a sink
            that stores no segments in a folder.
    """
    if retention is None or retention is True:
        # The default budget: only for a sink that can apply it (the default HDF5Store can).
        return Retention() if sink is None or hasattr(sink, "enable_retention") else None
    if retention is False:
        return None
    if not isinstance(retention, Retention):
        raise ValueError(
            f"retention must be a pyodlog.Retention(max_local_bytes=..., max_age=..., ...), True/None "
            f"(the default budget) or False (no budget), got {type(retention).__name__}"
        )
    if sink is not None and not hasattr(sink, "enable_retention"):
        raise ValueError(
            f"retention={retention} needs a sink that stores segments in a local folder (HDF5Store); "
            f"this logger's sink is {type(sink).__name__}: pass retention=False, or drop sink="
        )
    return retention


def attach_retention(sink: Sink, policy: Retention | None, syncer: Syncer | None) -> None:
    """Puts the opened result folder under ``policy``; acknowledgements come from ``syncer``.

    Without a syncer (a local-only logger) no segment is ever acknowledged, so nothing is deleted
    (unless ``drop_unsynced=True``); the budget then only drops new records.
    """
    enable = getattr(sink, "enable_retention", None)
    if policy is None or enable is None or getattr(sink, "directory", None) is None:
        return
    guard = enable(policy)
    if syncer is not None:
        guard.add_ack_source(syncer.state.acknowledged_names)
        syncer.state.ack_listeners.append(lambda name: guard.notify())


def check_metrics(metrics: Any) -> Any:
    """The Prometheus registry to expose the logger on: ``"default"``, a registry, or None (none).

    None means "the default registry if prometheus_client is installed".

    Raises:
        ImportError: ``metrics=True`` without prometheus_client.
        ValueError: not a bool, None or a registry.
    """
    from pyodlog.monitoring.metrics import prometheus_available

    if metrics is False:
        return None
    if metrics is None:
        return "default" if prometheus_available() else None
    if metrics is True:
        if not prometheus_available():
            raise ImportError(
                "metrics=True needs prometheus_client: pip install 'pyodlog[metrics]' (or "
                "prometheus-client), or pass metrics=False"
            )
        return "default"
    if callable(getattr(metrics, "register", None)) and callable(getattr(metrics, "collect", None)):
        return metrics
    raise ValueError(
        f"metrics must be True, False, None (the default registry when prometheus_client is "
        f"installed) or a prometheus_client.CollectorRegistry, got {type(metrics).__name__}"
    )


def attach_metrics(logger: Any, registry: Any) -> None:
    """Exposes ``logger.stats()`` as ``pyodlog_*`` metrics on ``registry`` (see :mod:`pyodlog.monitoring.metrics`)."""
    if registry is None:
        return
    from pyodlog.monitoring.metrics import expose_metrics

    expose_metrics(logger, None if registry == "default" else registry)


def open_with_class_names(
    sink: Sink,
    model_name: str,
    version_name: str,
    result_name: str | None,
    schema: dict[str, Any],
    force_recreate: bool,
    defaulted: tuple[str, ...] = (),
) -> Any:
    """``sink.open_result``; a result created by an older pyodlog, before a schema key existed, is
    continued as it was written, with a warning, instead of refusing its schema.

    The keys that may be left out: ``class_names`` (read from the model: Ultralytics ``names``,
    transformers ``id2label``; without this, every result logged before names were stored would
    be a mismatch), and those in ``defaulted`` — keys a default filled in, not the user (today
    ``storage``: a result written before compact records keeps its float32 rows). A value that
    differs from a stored one, or a key the user asked for, is still a
    :class:`SchemaMismatchError`. The keys left out are removed from ``schema``.
    """
    try:
        return sink.open_result(model_name, version_name, result_name, schema, force_recreate)
    except SchemaMismatchError:
        if force_recreate:
            raise
        optional = [k for k in ("class_names", *defaulted) if k in schema]
        candidates = [{k} for k in optional] + ([set(optional)] if len(optional) > 1 else [])
        for dropped in candidates:
            without = {k: v for k, v in schema.items() if k not in dropped}
            try:
                info = sink.open_result(model_name, version_name, result_name, without, False)
            except SchemaMismatchError:
                continue
            for key in dropped:
                schema.pop(key)
            logging.getLogger("pyodlog").warning(
                "pyodlog: result %s of %s/%s was created by an earlier pyodlog without %s, so it is "
                "continued as it was written (%s); pass another result_name, or "
                "force_table_recreate=True, to use the new defaults",
                info.result_name,
                model_name,
                version_name,
                " and ".join(sorted(dropped)),
                "; ".join(_WHAT_IT_MEANS[k] for k in sorted(dropped)),
            )
            return info
        raise


_WHAT_IT_MEANS = {
    "class_names": "no class names are stored in it",
    "storage": "logits and embeddings stay float32, not the compact default",
}
