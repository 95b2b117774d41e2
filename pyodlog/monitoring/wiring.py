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
from pyodlog.io.sink import SchemaMismatchError, SegmentStore, Sink
from pyodlog.monitoring.validation import check_n_epoch, check_name
from pyodlog.sync import CollectorClient, SyncConfig, Syncer, check_api_key, check_endpoint
from pyodlog.sync.secret import Secret

__all__ = [
    "SyncSettings",
    "check_logger_args",
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
) -> tuple[str, int | None]:
    """Resolves the result and the epoch (``'latest'``: the highest in the result, 0 if none).

    Under ``torch.distributed`` rank 0 decides and every rank follows, so all ranks write one result.
    """

    def resolve() -> tuple[str, int | None]:
        info = open_with_class_names(
            sink, model_name, version_name, result_name, schema, force_recreate
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
            open_with_class_names(sink, model_name, version_name, resolved_result, schema, False)
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
    syncer = Syncer(
        CollectorClient(sync.endpoint, sync.key, sync.config),
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


def open_with_class_names(
    sink: Sink,
    model_name: str,
    version_name: str,
    result_name: str | None,
    schema: dict[str, Any],
    force_recreate: bool,
) -> Any:
    """``sink.open_result``; a result created without class names (by a pyodlog that stored none)
    is opened without them, with a warning, instead of refusing its schema.

    Class names read from the model (Ultralytics ``names``, transformers ``id2label``) would
    otherwise make every result logged before they were stored a schema mismatch. Names that
    differ from the stored ones are still a :class:`SchemaMismatchError`.
    """
    try:
        return sink.open_result(model_name, version_name, result_name, schema, force_recreate)
    except SchemaMismatchError:
        if "class_names" not in schema or force_recreate:
            raise
        without = {k: v for k, v in schema.items() if k != "class_names"}
        try:
            info = sink.open_result(model_name, version_name, result_name, without, False)
        except SchemaMismatchError:
            pass
        else:
            schema.pop("class_names")
            logging.getLogger("pyodlog").warning(
                "pyodlog: result %s of %s/%s was created without class names, so the class names "
                "are not stored in it (pass another result_name, or force_table_recreate=True, "
                "to store them)",
                info.result_name,
                model_name,
                version_name,
            )
            return info
        raise
