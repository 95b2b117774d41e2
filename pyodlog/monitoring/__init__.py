"""The logger classes: MonitoringLogger, ObjectDetectionTorchTracer, ObjectDetectionTorchLogger, sinks."""

from pyodlog.io.sink import InMemorySink, ResultInfo, SchemaMismatchError, Sink
from pyodlog.monitoring.detection_logger import NmsConfig, ObjectDetectionTorchLogger, unwrap_model
from pyodlog.monitoring.monitoring_logger import LoggerClosedError, MonitoringLogger
from pyodlog.monitoring.tracer import ObjectDetectionTorchTracer

__all__ = [
    "InMemorySink",
    "LoggerClosedError",
    "MonitoringLogger",
    "NmsConfig",
    "ObjectDetectionTorchLogger",
    "ObjectDetectionTorchTracer",
    "ResultInfo",
    "SchemaMismatchError",
    "Sink",
    "unwrap_model",
]
