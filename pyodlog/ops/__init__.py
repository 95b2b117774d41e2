"""Typed wrappers over pyodlog's compiled operators (``torch.ops.pyodlog.*``).

Each operator has a CPU and a CUDA kernel and a fake (meta) implementation so
that it traces under ``torch.compile`` and ``torch.library.opcheck``.
"""

from pyodlog.ops.boxes import scale_boxes
from pyodlog.ops.nms import batched_nms
from pyodlog.ops.postprocess import PostprocessedDetections, postprocess_detections

__all__ = ["PostprocessedDetections", "batched_nms", "postprocess_detections", "scale_boxes"]
