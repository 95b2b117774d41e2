"""The collector's own Prometheus metrics, served at ``GET /metrics``.

Written by hand in Prometheus' text exposition format (version 0.0.4): the collector stays
standard library + h5py, with no dependency on ``prometheus_client``. No label holds a tenant,
a key or a path: requests are counted by method (``GET``, ``PUT``, ``other``) and status code
only, and the stored totals are summed over every tenant.

Metrics (all prefixed ``pyodlog_collector_``):

- ``requests_total{method,code}``: answered requests.
- ``upload_seconds`` (histogram): time from a PUT's first byte to its answer.
- ``upload_bytes_total``: bytes of PUT bodies accepted (stored or staged).
- ``segments_stored_total``, ``bytes_stored_total``: segments (and their bytes) that became
  visible since the collector started.
- ``stored_segments``, ``stored_bytes``: what the root holds now, every tenant (measured at most
  every ``STORED_REFRESH`` seconds).
- ``active_connections``; ``start_time_seconds``.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from pathlib import Path

from pyodlog_protocol.layout import META, STAGING

__all__ = ["CONTENT_TYPE", "UPLOAD_BUCKETS", "CollectorMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UPLOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
STORED_REFRESH = 30.0
_METHODS = ("GET", "PUT")


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class CollectorMetrics:
    """Counters of one collector process, and their text exposition."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[tuple[str, int], int] = {}
        self.upload_counts = [0] * (len(UPLOAD_BUCKETS) + 1)
        self.upload_sum = 0.0
        self.upload_bytes = 0
        self.segments_stored = 0
        self.bytes_stored = 0
        self._stored: tuple[int, int] = (0, 0)
        self._stored_at = -STORED_REFRESH

    def request(self, method: str, code: int, seconds: float) -> None:
        """One answered request (PUTs also go into the upload latency histogram)."""
        method = method if method in _METHODS else "other"
        with self._lock:
            key = (method, int(code))
            self.requests[key] = self.requests.get(key, 0) + 1
            if method == "PUT":
                self.upload_counts[bisect.bisect_left(UPLOAD_BUCKETS, seconds)] += 1
                self.upload_sum += seconds

    def piece(self, status: int, nbytes: int, total: int) -> None:
        """A PUT's outcome: ``nbytes`` accepted; a 201 makes a segment of ``total`` bytes visible."""
        with self._lock:
            if status in (201, 202):
                self.upload_bytes += nbytes
            if status == 201:
                self.segments_stored += 1
                self.bytes_stored += total

    def _stored_now(self) -> tuple[int, int]:
        """(segments, bytes) under the root, every tenant: a walk of the ``.meta`` folders, cached."""
        now = time.monotonic()
        if now - self._stored_at < STORED_REFRESH:
            return self._stored
        segments = size = 0
        for dirpath, dirnames, _ in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d != STAGING]
            if os.path.basename(dirpath) != META:
                continue
            dirnames[:] = []
            folder = Path(dirpath).parent
            for entry in os.scandir(dirpath):
                if not entry.name.endswith(".json"):
                    continue
                try:
                    size += (folder / entry.name[: -len(".json")]).stat().st_size
                except FileNotFoundError:
                    continue
                segments += 1
        self._stored, self._stored_at = (segments, size), now
        return self._stored

    def render(self, active_connections: int) -> str:
        """The metrics in Prometheus' text format."""
        stored_segments, stored_bytes = self._stored_now()
        with self._lock:
            requests = sorted(self.requests.items())
            counts = list(self.upload_counts)
            upload_sum, upload_bytes = self.upload_sum, self.upload_bytes
            segments_stored, bytes_stored = self.segments_stored, self.bytes_stored
        lines: list[str] = []

        def family(name: str, kind: str, doc: str) -> None:
            lines.append(f"# HELP pyodlog_collector_{name} {doc}")
            lines.append(f"# TYPE pyodlog_collector_{name} {kind}")

        family("requests_total", "counter", "Answered requests by method and status code.")
        for (method, code), n in requests:
            lines.append(f'pyodlog_collector_requests_total{{method="{method}",code="{code}"}} {n}')
        family("upload_seconds", "histogram", "Time from a PUT's first byte to its answer.")
        cumulative = 0
        for bound, n in zip(UPLOAD_BUCKETS, counts):
            cumulative += n
            lines.append(f'pyodlog_collector_upload_seconds_bucket{{le="{bound}"}} {cumulative}')
        cumulative += counts[-1]
        lines.append(f'pyodlog_collector_upload_seconds_bucket{{le="+Inf"}} {cumulative}')
        lines.append(f"pyodlog_collector_upload_seconds_sum {_number(upload_sum)}")
        lines.append(f"pyodlog_collector_upload_seconds_count {cumulative}")
        for name, kind, doc, value in (
            ("upload_bytes_total", "counter", "Bytes of PUT bodies accepted.", upload_bytes),
            (
                "segments_stored_total",
                "counter",
                "Segments stored (verified, visible) since the collector started.",
                segments_stored,
            ),
            (
                "bytes_stored_total",
                "counter",
                "Bytes of the segments stored since the collector started.",
                bytes_stored,
            ),
            (
                "stored_segments",
                "gauge",
                "Segments the root holds (every tenant).",
                stored_segments,
            ),
            ("stored_bytes", "gauge", "Bytes of the segments the root holds.", stored_bytes),
            ("active_connections", "gauge", "Connections being served.", active_connections),
            (
                "start_time_seconds",
                "gauge",
                "When the collector started (Unix time).",
                self.started,
            ),
        ):
            family(name, kind, doc)
            lines.append(f"pyodlog_collector_{name} {_number(value)}")
        return "\n".join(lines) + "\n"
