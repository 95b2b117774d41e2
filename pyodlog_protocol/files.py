"""Small file helpers shared by the library and the collector (standard library only)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["fsync_path", "sha256_file"]

READ_BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as lower-case hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder by path (a folder's fsync makes renames in it durable)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
