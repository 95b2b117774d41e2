"""pyodlog: a drop-in monitoring logger for PyTorch object-detection models.

    import pyodlog
    logger = pyodlog.create_logger(model, model_name="detector", version_name="v1")
    detections = logger(images)          # exactly what model(images) returns

The compiled operators (``torch.ops.pyodlog.*``) load on first use; :func:`build_info` says how
they were built. Without them (no compiler on a machine that only reads results) ``import pyodlog``
and :func:`open_result` still work, and an operator raises :class:`ExtensionNotBuiltError`.
"""

import importlib
from typing import TYPE_CHECKING, Any

from pyodlog._version import __version__

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load on first use
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
    from pyodlog.io.retention import Retention
    from pyodlog.io.views import LazyResults, ResultView, open_results
    from pyodlog.models import (
        FCOSLogger,
        RetinaNetLogger,
        SSDLogger,
        TorchvisionRCNNLogger,
        TransformersDetrLogger,
        UltralyticsYOLOLogger,
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
    from pyodlog.monitoring.metrics import expose_metrics
    from pyodlog.monitoring.sampling import Sampling
    from pyodlog.structures import CallRecord, DetectionBatch, DetectionOutput, RecordStorage
    from pyodlog.sync import SyncConfig, SyncError, UploadSummary

# Public name -> the module that defines it. Loading is lazy (PEP 562) so that `import pyodlog`,
# `pyodlog --help` and the collector's commands start without importing torch; the first use of a
# name imports its module (and with it torch and the compiled operators).
_EXPORTS: dict[str, str] = {
    "ops": "pyodlog.ops",
    "ExtensionNotBuiltError": "pyodlog._extension",
    "build_info": "pyodlog._extension",
    "DistributedLoggingError": "pyodlog.distributed",
    "CorruptResultError": "pyodlog.io",
    "HDF5Store": "pyodlog.io",
    "ResultData": "pyodlog.io",
    "StorageError": "pyodlog.io",
    "WriterConfig": "pyodlog.io",
    "WriterFailedError": "pyodlog.io",
    "open_result": "pyodlog.io",
    "Retention": "pyodlog.io.retention",
    "expose_metrics": "pyodlog.monitoring.metrics",
    "metrics": "pyodlog.metrics",
    "open_results": "pyodlog.io.views",
    "ResultView": "pyodlog.io.views",
    "LazyResults": "pyodlog.io.views",
    "analysis": "pyodlog.analysis",
    "FCOSLogger": "pyodlog.models",
    "RetinaNetLogger": "pyodlog.models",
    "SSDLogger": "pyodlog.models",
    "TorchvisionRCNNLogger": "pyodlog.models",
    "TransformersDetrLogger": "pyodlog.models",
    "UltralyticsYOLOLogger": "pyodlog.models",
    "UnsupportedModelError": "pyodlog.models",
    "create_logger": "pyodlog.models",
    "register_logger": "pyodlog.models",
    "registered_loggers": "pyodlog.models",
    "InMemorySink": "pyodlog.monitoring",
    "LoggerClosedError": "pyodlog.monitoring",
    "MonitoringLogger": "pyodlog.monitoring",
    "NmsConfig": "pyodlog.monitoring",
    "ObjectDetectionTorchLogger": "pyodlog.monitoring",
    "ObjectDetectionTorchTracer": "pyodlog.monitoring",
    "SchemaMismatchError": "pyodlog.monitoring",
    "Sink": "pyodlog.monitoring",
    "CallRecord": "pyodlog.structures",
    "DetectionBatch": "pyodlog.structures",
    "DetectionOutput": "pyodlog.structures",
    "RecordStorage": "pyodlog.structures",
    "Sampling": "pyodlog.monitoring.sampling",
    "SyncConfig": "pyodlog.sync",
    "SyncError": "pyodlog.sync",
    "UploadSummary": "pyodlog.sync",
}


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'pyodlog' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name == f"pyodlog.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
    "LazyResults",
    "LoggerClosedError",
    "MonitoringLogger",
    "NmsConfig",
    "ObjectDetectionTorchLogger",
    "ObjectDetectionTorchTracer",
    "RecordStorage",
    "ResultData",
    "ResultView",
    "Retention",
    "RetinaNetLogger",
    "SSDLogger",
    "Sampling",
    "SchemaMismatchError",
    "Sink",
    "StorageError",
    "SyncConfig",
    "SyncError",
    "TorchvisionRCNNLogger",
    "TransformersDetrLogger",
    "UltralyticsYOLOLogger",
    "UnsupportedModelError",
    "UploadSummary",
    "WriterConfig",
    "WriterFailedError",
    "__version__",
    "analysis",
    "build_info",
    "create_logger",
    "expose_metrics",
    "metrics",
    "open_result",
    "open_results",
    "ops",
    "register_logger",
    "registered_loggers",
]
