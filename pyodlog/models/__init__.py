"""One logger subclass per model family, and the registry that picks one."""

from pyodlog.models.registry import (
    UnsupportedModelError,
    create_logger,
    register_logger,
    registered_loggers,
)
from pyodlog.models.torchvision_dense import FCOSLogger, RetinaNetLogger, SSDLogger
from pyodlog.models.torchvision_rcnn import TorchvisionRCNNLogger
from pyodlog.models.transformers_detr import TransformersDetrLogger
from pyodlog.models.ultralytics_yolo import UltralyticsYOLOLogger

__all__ = [
    "FCOSLogger",
    "RetinaNetLogger",
    "SSDLogger",
    "TorchvisionRCNNLogger",
    "TransformersDetrLogger",
    "UltralyticsYOLOLogger",
    "UnsupportedModelError",
    "create_logger",
    "register_logger",
    "registered_loggers",
]
