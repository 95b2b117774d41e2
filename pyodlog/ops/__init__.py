"""Typed wrappers over pyodlog's compiled operators (``torch.ops.pyodlog.*``).

Each operator has a CPU and a CUDA kernel and a fake (meta) implementation so
that it traces under ``torch.compile`` and ``torch.library.opcheck``.
"""

from pyodlog.ops.boxes import scale_boxes
from pyodlog.ops.nms import batched_nms

__all__ = ["batched_nms", "scale_boxes"]
