"""pyodlog's reference collector: receives the segments that pyodlog loggers upload.

Dependency-free (the standard library only, no torch): it starts in well
under a second and runs on any machine with Python. Start it with
``pyodlog serve --root DIR --api-key-file FILE``; the protocol is
``docs/protocol.md`` and :mod:`pyodlog_protocol`.
"""

from pyodlog_collector.http import CollectorServer, make_server
from pyodlog_collector.keys import ApiKeys, KeyFileError
from pyodlog_collector.storage import CollectorStorage

__all__ = ["ApiKeys", "CollectorServer", "CollectorStorage", "KeyFileError", "make_server"]
