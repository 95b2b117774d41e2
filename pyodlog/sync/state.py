"""What the collector acknowledged, kept on disk next to the segments.

One small marker file per acknowledged segment and endpoint,
``<result>/.sync/<endpoint id>/<segment>.ack`` (JSON: SHA-256, bytes, time),
and one per segment the collector refused for good,
``<result>/.sync/<endpoint id>/<segment>.refused`` (JSON: the HTTP status, the
collector's error and detail): later passes skip it (delete the marker to try
again).
Markers are written atomically (temporary name, fsync, rename) and read by
listing the folder (the JSON is for people), so several
processes writing into one result never race on a shared file, and a restarted
process does not send what was acknowledged. A lost marker costs one status
request: the collector still answers "stored".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["SyncState"]


class SyncState:
    """Acknowledgements of one endpoint for one result folder."""

    def __init__(self, result_dir: Path, endpoint: str) -> None:
        endpoint_id = hashlib.sha256(endpoint.encode()).hexdigest()[:16]
        self.folder = Path(result_dir) / ".sync" / endpoint_id
        # Called with the segment's name after each acknowledgement is on disk (e.g. the local
        # disk budget, which may then delete it); a listener's failure is ignored.
        self.ack_listeners: list[Callable[[str], None]] = []

    def _marker(self, segment_name: str, kind: str = "ack") -> Path:
        return self.folder / f"{segment_name}.{kind}"

    def _names(self, suffix: str) -> set[str]:
        if not self.folder.is_dir():
            return set()
        return {
            entry.name[: -len(suffix)]
            for entry in os.scandir(self.folder)
            if entry.name.endswith(suffix)
        }

    def acknowledged_names(self) -> set[str]:
        """The names of the acknowledged segments (a folder listing: no file is read)."""
        return self._names(".ack")

    def refused_names(self) -> set[str]:
        """The names of the segments the collector refused for good (a folder listing)."""
        return self._names(".refused")

    def refusal(self, segment_name: str) -> str:
        """Why the collector refused a segment (from its marker)."""
        try:
            data = json.loads(self._marker(segment_name, "refused").read_text())
            return str(data["reason"])
        except (OSError, ValueError, KeyError, TypeError):
            return "refused (the marker is unreadable)"

    def refusal_marker(self, segment_name: str) -> Path:
        return self._marker(segment_name, "refused")

    def _write(self, marker: Path, content: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f"{marker.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w") as f:
            json.dump(content, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)

    def acknowledge(
        self, segment_name: str, sha256: str, nbytes: int, endpoint: str | None = None
    ) -> None:
        self._write(
            self._marker(segment_name),
            {
                "sha256": sha256,
                "bytes": nbytes,
                "acknowledged_at": time.time(),
                "endpoint": endpoint,
            },
        )
        for listener in list(self.ack_listeners):
            with contextlib.suppress(Exception):
                listener(segment_name)

    def refuse(
        self, segment_name: str, sha256: str, reason: str, endpoint: str | None = None
    ) -> None:
        """Records that the collector refused a segment for good; later passes skip it."""
        self._write(
            self._marker(segment_name, "refused"),
            {"sha256": sha256, "reason": reason, "refused_at": time.time(), "endpoint": endpoint},
        )
