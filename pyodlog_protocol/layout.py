"""Where the reference collector keeps what it received: the one definition both sides read.

    <root>/<tenant>/<model>/<version>/<result>/<segment_id>               a verified segment
    <root>/<tenant>/<model>/<version>/<result>/.meta/<segment_id>.json    its rank, SHA-256, size, arrival
    <root>/<tenant>/.staging/<model>/<version>/<result>/…                 uploads in progress

The collector writes this layout; ``pyodlog export`` (the library's command) reads it without
importing the collector. Every name is checked with :func:`pyodlog_protocol.is_valid_name`, so no
path leaves the root and no name collides with the collector's own dot-folders.
"""

from __future__ import annotations

from pathlib import Path

from pyodlog_protocol import is_valid_name

__all__ = ["META", "STAGING", "meta_path", "result_dir", "stored_segments", "stored_segments_in"]

STAGING = ".staging"
META = ".meta"


def result_dir(root: str | Path, tenant: str, model: str, version: str, result: str) -> Path:
    """The folder of one result of one tenant.

    Raises:
        ValueError: a name that is not a valid pyodlog name (it would leave the root).
    """
    for what, name in (
        ("tenant", tenant),
        ("model", model),
        ("version", version),
        ("result", result),
    ):
        if not is_valid_name(name):
            raise ValueError(f"{what} {name!r} is not a valid name")
    return Path(root) / tenant / model / version / result


def stored_segments(
    root: str | Path, tenant: str, model: str, version: str, result: str
) -> list[Path]:
    """The verified segments of one result (those with their metadata written), in name order."""
    return stored_segments_in(result_dir(root, tenant, model, version, result))


def stored_segments_in(folder: Path) -> list[Path]:
    """The verified segments in one result folder (``folder``: its names were checked already)."""
    segments = []
    for meta in sorted((folder / META).glob("*.json")):
        segment_id = meta.name[: -len(".json")]
        if is_valid_name(segment_id) and (folder / segment_id).is_file():
            segments.append(folder / segment_id)
    return segments


def meta_path(segment: Path) -> Path:
    """Where the collector keeps a stored segment's metadata (rank, SHA-256, size, arrival)."""
    return segment.parent / META / f"{segment.name}.json"
