"""Sync: sending closed segments to a collector (see ``docs/protocol.md``)."""

from pyodlog.sync.client import (
    CollectorClient,
    SyncConfig,
    SyncError,
    check_api_key,
    check_endpoint,
)
from pyodlog.sync.s3 import S3Target, check_s3_endpoint
from pyodlog.sync.secret import Secret
from pyodlog.sync.state import SyncState
from pyodlog.sync.syncer import Syncer, UploadSummary

__all__ = [
    "CollectorClient",
    "S3Target",
    "Secret",
    "SyncConfig",
    "SyncError",
    "SyncState",
    "Syncer",
    "UploadSummary",
    "check_api_key",
    "check_endpoint",
    "check_s3_endpoint",
]
