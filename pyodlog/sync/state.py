"""What the collector acknowledged, kept on disk next to the segments.

One small marker file per acknowledged segment and endpoint,
``<result>/.sync/<endpoint id>/<segment>.ack`` (JSON: SHA-256, bytes, time).
Markers are written atomically (temporary name, fsync, rename) and read by
listing the folder (the JSON is for people), so several
processes writing into one result never race on a shared file, and a restarted
process does not send what was acknowledged. A lost marker costs one status
request: the collector still answers "stored".
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

__all__ = ["SyncState"]


class SyncState:
    """Acknowledgements of one endpoint for one result folder."""

    def __init__(self, result_dir: Path, endpoint: str) -> None:
        endpoint_id = hashlib.sha256(endpoint.encode()).hexdigest()[:16]
        self.folder = Path(result_dir) / ".sync" / endpoint_id

    def _marker(self, segment_name: str) -> Path:
        return self.folder / f"{segment_name}.ack"

    def acknowledged_names(self) -> set[str]:
        """The names of the acknowledged segments (a folder listing: no file is read)."""
        if not self.folder.is_dir():
            return set()
        return {
            entry.name[: -len(".ack")]
            for entry in os.scandir(self.folder)
            if entry.name.endswith(".ack")
        }

    def acknowledge(
        self, segment_name: str, sha256: str, nbytes: int, endpoint: str | None = None
    ) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self._marker(segment_name)
        tmp = marker.with_name(f"{marker.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w") as f:
            json.dump(
                {
                    "sha256": sha256,
                    "bytes": nbytes,
                    "acknowledged_at": time.time(),
                    "endpoint": endpoint,
                },
                f,
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)
