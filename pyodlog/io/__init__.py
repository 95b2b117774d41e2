"""Storage: the HDF5 segment store, its writer thread, export and read-back."""

from pyodlog.io.reader import CorruptResultError, ResultData, open_result
from pyodlog.io.retention import Retention
from pyodlog.io.store import HDF5Store, data_root, recover_segments
from pyodlog.io.writer import StorageError, WriterConfig, WriterFailedError

__all__ = [
    "CorruptResultError",
    "HDF5Store",
    "ResultData",
    "Retention",
    "StorageError",
    "WriterConfig",
    "WriterFailedError",
    "data_root",
    "open_result",
    "recover_segments",
]
