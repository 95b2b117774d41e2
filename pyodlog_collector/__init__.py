"""pyodlog's reference collector: receives the segments that pyodlog loggers upload.

The standard library, plus h5py to check each uploaded segment (in worker
processes, imported there on first use); never torch or pyodlog: it starts in
well under a second and runs on any machine with Python and h5py. Start it with
``pyodlog serve --root DIR --api-key-file FILE``; the protocol is
``docs/protocol.md`` and :mod:`pyodlog_protocol`.
"""

from pyodlog_collector.http import CollectorServer, make_server
from pyodlog_collector.keys import ApiKeys, KeyFileError
from pyodlog_collector.storage import CollectorStorage

__all__ = ["ApiKeys", "CollectorServer", "CollectorStorage", "KeyFileError", "make_server"]
