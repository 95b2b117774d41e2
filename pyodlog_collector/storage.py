"""The collector's files: staged uploads, verified segments, their metadata.

Layout under the collector's root::

    <tenant>/<model>/<version>/<result>/<segment_id>          a verified segment (pyodlog reads the folder)
    <tenant>/<model>/<version>/<result>/.meta/<segment_id>.json  its rank, SHA-256, size, arrival time
    <tenant>/.staging/<model>/<version>/<result>/<segment_id>.<sha256>.part   an upload in progress

A segment becomes visible only once all its bytes arrived and their SHA-256
matches what the client announced: the staged file is fsynced, its metadata
written (temporary name, fsync, rename), then the file is renamed into place
and the folder fsynced. A staged upload survives a restart of the server, so a
client resumes where the last acknowledged byte ended. Every name was
validated against :data:`pyodlog_protocol.NAME_PATTERN` before it
gets here, so no path leaves the root.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pyodlog_protocol.files import READ_BLOCK, fsync_path, sha256_file

__all__ = ["CollectorStorage", "PieceResult", "SegmentKey"]


@dataclass(frozen=True)
class SegmentKey:
    """Where a segment belongs: tenant, model, version, result, rank and segment id."""

    tenant: str
    model: str
    version: str
    result: str
    rank: int
    segment_id: str


@dataclass
class PieceResult:
    """What happened to an uploaded piece: an HTTP status and a JSON body."""

    status: int
    body: dict[str, object]


class CollectorStorage:
    """Stores uploaded segments under ``root``, one folder tree per tenant.

    Args:
        root: the collector's data folder (created if missing).
        max_segment_bytes: the largest segment accepted (announced ``total``).
    """

    def __init__(self, root: str | Path, max_segment_bytes: int = 8 << 30) -> None:
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_segment_bytes = int(max_segment_bytes)
        self._locks: dict[tuple[str, ...], threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()

    # -- paths -----------------------------------------------------------------------------------

    def result_dir(self, tenant: str, model: str, version: str, result: str) -> Path:
        return self.root / tenant / model / version / result

    def _final(self, key: SegmentKey) -> Path:
        return self.result_dir(key.tenant, key.model, key.version, key.result) / key.segment_id

    def _meta(self, key: SegmentKey) -> Path:
        return (
            self.result_dir(key.tenant, key.model, key.version, key.result)
            / ".meta"
            / f"{key.segment_id}.json"
        )

    def _staged(self, key: SegmentKey, sha256: str) -> Path:
        return (
            self.root
            / key.tenant
            / ".staging"
            / key.model
            / key.version
            / key.result
            / f"{key.segment_id}.{sha256}.part"
        )

    def _lock(self, key: SegmentKey) -> threading.Lock:
        with self._locks_guard:
            return self._locks[(key.tenant, key.model, key.version, key.result, key.segment_id)]

    def _stored_meta(self, key: SegmentKey) -> dict[str, object] | None:
        if not self._final(key).exists():
            return None
        try:
            return json.loads(self._meta(key).read_text())
        except (OSError, ValueError):
            # Written before the segment was renamed into place, so this means damage: recompute.
            return {
                "segment_id": key.segment_id,
                "rank": key.rank,
                "sha256": sha256_file(self._final(key)),
                "bytes": self._final(key).stat().st_size,
            }

    # -- the protocol's operations -----------------------------------------------------------------

    def status(self, key: SegmentKey, sha256: str | None) -> dict[str, object]:
        """Whether the segment is stored (and with which checksum), or how many bytes of it are staged."""
        with self._lock(key):
            meta = self._stored_meta(key)
            if meta is not None:
                return {
                    "status": "stored",
                    "sha256": meta["sha256"],
                    "bytes": meta["bytes"],
                    "received": meta["bytes"],
                }
            if sha256 is None:
                return {"status": "absent", "received": 0}
            staged = self._staged(key, sha256)
            received = staged.stat().st_size if staged.exists() else 0
            return {"status": "partial" if received else "absent", "received": received}

    def write_piece(
        self, key: SegmentKey, sha256: str, offset: int, total: int, body: BinaryIO, length: int
    ) -> PieceResult:
        """Writes ``length`` bytes read from ``body`` at ``offset`` of the segment's ``total`` bytes.

        Repeating a piece is harmless: a piece at an offset below what is staged
        overwrites the same bytes. A piece beyond what is staged is refused
        (409, with ``received``) so the client resumes at the right place.
        """
        if total > self.max_segment_bytes:
            return PieceResult(
                413, {"error": "segment_too_large", "max_segment_bytes": self.max_segment_bytes}
            )
        if offset + length > total:
            return PieceResult(
                400,
                {
                    "error": "bad_range",
                    "detail": f"offset {offset} + {length} bytes > total {total}",
                },
            )
        with self._lock(key):
            meta = self._stored_meta(key)
            if meta is not None:
                if meta["sha256"] == sha256:
                    return PieceResult(
                        200, {"status": "exists", "sha256": sha256, "received": meta["bytes"]}
                    )
                return PieceResult(
                    409,
                    {
                        "error": "checksum_conflict",
                        "detail": "this segment id is stored with another SHA-256",
                        "sha256": meta["sha256"],
                    },
                )
            staged = self._staged(key, sha256)
            staged.parent.mkdir(parents=True, exist_ok=True)
            received = staged.stat().st_size if staged.exists() else 0
            if offset > received:
                return PieceResult(409, {"error": "offset_mismatch", "received": received})
            with open(staged, "r+b" if staged.exists() else "w+b") as f:
                f.truncate(offset)
                f.seek(offset)
                left = length
                while left:
                    block = body.read(min(READ_BLOCK, left))
                    if not block:
                        raise ConnectionError(f"the client sent {length - left} of {length} bytes")
                    f.write(block)
                    left -= len(block)
            received = offset + length
            if received < total:
                return PieceResult(202, {"status": "partial", "received": received})
            return self._commit(key, staged, sha256, total)

    def _commit(self, key: SegmentKey, staged: Path, sha256: str, total: int) -> PieceResult:
        actual = sha256_file(staged)
        if actual != sha256:
            staged.unlink()
            return PieceResult(
                422,
                {
                    "error": "checksum_mismatch",
                    "detail": "the bytes received do not have the "
                    "announced SHA-256; upload the segment again",
                    "received_sha256": actual,
                },
            )
        fsync_path(staged)
        meta_path = self._meta(key)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = meta_path.with_name(meta_path.name + ".tmp")
        meta = {
            "segment_id": key.segment_id,
            "rank": key.rank,
            "sha256": sha256,
            "bytes": total,
            "received_at": time.time(),
        }
        with open(tmp, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, meta_path)
        final = self._final(key)
        os.replace(staged, final)  # visible only now, verified and durable
        fsync_path(meta_path.parent)
        fsync_path(final.parent)
        return PieceResult(201, {"status": "stored", "sha256": sha256, "received": total})

    def content_path(self, key: SegmentKey) -> Path | None:
        """The stored segment's file, or None."""
        final = self._final(key)
        return final if final.exists() else None

    def list_segments(
        self, tenant: str, model: str, version: str, result: str
    ) -> list[dict[str, object]]:
        """The verified segments of one result."""
        folder = self.result_dir(tenant, model, version, result)
        out = []
        for meta_path in sorted((folder / ".meta").glob("*.json")):
            segment_id = meta_path.name[: -len(".json")]
            if (folder / segment_id).exists():
                try:
                    out.append(json.loads(meta_path.read_text()))
                except ValueError:
                    continue
        return out

    def list_results(self, tenant: str) -> list[dict[str, object]]:
        """Every result of a tenant with its segment count and bytes."""
        base = self.root / tenant
        out = []
        if not base.is_dir():
            return out
        for meta_dir in sorted(base.glob("*/*/*/.meta")):
            result_dir = meta_dir.parent
            model, version, result = result_dir.relative_to(base).parts
            if model.startswith("."):
                continue
            segments = self.list_segments(tenant, model, version, result)
            out.append(
                {
                    "model": model,
                    "version": version,
                    "result": result,
                    "segments": len(segments),
                    "bytes": sum(int(s["bytes"]) for s in segments),
                }
            )
        return out

    def tenants(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
