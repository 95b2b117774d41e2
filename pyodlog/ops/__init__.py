"""Typed wrappers over pyodlog's compiled operators (``torch.ops.pyodlog.*``).

Each operator has a CPU and a CUDA kernel and a fake (meta) implementation so
that it traces under ``torch.compile`` and ``torch.library.opcheck``.
"""

from pyodlog.ops.boxes import scale_boxes
from pyodlog.ops.compression import (
    CompressedFeature,
    compress_features,
    decompress_features,
    dequantize_uint8,
    quantize_uint8,
)
from pyodlog.ops.nms import batched_nms
from pyodlog.ops.postprocess import (
    NearMisses,
    PostprocessedDetections,
    PostprocessedWithNearMisses,
    activated_rows,
    postprocess_detections,
    postprocess_detections_near_miss,
)
from pyodlog.ops.uncertainty import Uncertainty, detection_uncertainty

__all__ = [
    "CompressedFeature",
    "NearMisses",
    "PostprocessedDetections",
    "PostprocessedWithNearMisses",
    "Uncertainty",
    "activated_rows",
    "batched_nms",
    "compress_features",
    "decompress_features",
    "dequantize_uint8",
    "detection_uncertainty",
    "postprocess_detections",
    "postprocess_detections_near_miss",
    "quantize_uint8",
    "scale_boxes",
]
