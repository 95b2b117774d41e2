"""pyodlog: a drop-in monitoring logger for PyTorch object-detection models.

    import pyodlog
    logger = pyodlog.create_logger(model, model_name="detector", version_name="v1")
    detections = logger(images)          # exactly what model(images) returns

Importing pyodlog loads its compiled operators (``torch.ops.pyodlog.*``);
:func:`build_info` says how they were built.
"""

from pyodlog import ops
from pyodlog._extension import ExtensionNotBuiltError, build_info
from pyodlog.distributed import DistributedLoggingError
from pyodlog.io import (
    CorruptResultError,
    HDF5Store,
    ResultData,
    StorageError,
    WriterConfig,
    WriterFailedError,
    open_result,
)
from pyodlog.models import (
    FCOSLogger,
    RetinaNetLogger,
    SSDLogger,
    TorchvisionRCNNLogger,
    UnsupportedModelError,
    create_logger,
    register_logger,
    registered_loggers,
)
from pyodlog.monitoring import (
    InMemorySink,
    LoggerClosedError,
    MonitoringLogger,
    NmsConfig,
    ObjectDetectionTorchLogger,
    ObjectDetectionTorchTracer,
    SchemaMismatchError,
    Sink,
)
from pyodlog.structures import CallRecord, DetectionBatch, DetectionOutput
from pyodlog.sync import SyncConfig, SyncError, UploadSummary

__version__ = "0.1.0"

__all__ = [
    "CallRecord",
    "CorruptResultError",
    "DetectionBatch",
    "DetectionOutput",
    "DistributedLoggingError",
    "ExtensionNotBuiltError",
    "FCOSLogger",
    "HDF5Store",
    "InMemorySink",
    "LoggerClosedError",
    "MonitoringLogger",
    "NmsConfig",
    "ObjectDetectionTorchLogger",
    "ObjectDetectionTorchTracer",
    "ResultData",
    "RetinaNetLogger",
    "SSDLogger",
    "SchemaMismatchError",
    "Sink",
    "StorageError",
    "SyncConfig",
    "SyncError",
    "TorchvisionRCNNLogger",
    "UnsupportedModelError",
    "UploadSummary",
    "WriterConfig",
    "WriterFailedError",
    "__version__",
    "build_info",
    "create_logger",
    "open_result",
    "ops",
    "register_logger",
    "registered_loggers",
]
