"""pyodlog: a drop-in monitoring logger for PyTorch object-detection models.

Importing pyodlog loads its compiled operators (``torch.ops.pyodlog.*``);
:func:`build_info` says how they were built.
"""

from pyodlog._extension import ExtensionNotBuiltError, build_info
from pyodlog import ops

__version__ = "0.1.0"

__all__ = ["__version__", "build_info", "ExtensionNotBuiltError", "ops"]
