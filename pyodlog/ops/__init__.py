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
from pyodlog.ops.postprocess import PostprocessedDetections, postprocess_detections

__all__ = [
    "CompressedFeature",
    "PostprocessedDetections",
    "batched_nms",
    "compress_features",
    "decompress_features",
    "dequantize_uint8",
    "postprocess_detections",
    "quantize_uint8",
    "scale_boxes",
]
