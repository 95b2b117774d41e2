"""Where the reference collector keeps what it received: the one definition both sides read.

    <root>/<tenant>/<model>/<version>/<result>/<segment_id>               a verified segment
    <root>/<tenant>/<model>/<version>/<result>/.meta/<segment_id>.json    its rank, SHA-256, size, arrival
    <root>/<tenant>/.staging/<model>/<version>/<result>/…                 uploads in progress

The collector writes this layout; ``pyodlog export`` (the library's command) reads it without
importing the collector. Every name is checked with :func:`pyodlog_protocol.is_valid_name`, so no
path leaves the root and no name collides with the collector's own dot-folders.
"""

from __future__ import annotations

import re
from pathlib import Path

from pyodlog_protocol import is_valid_name, parse_rank

__all__ = [
    "META",
    "S3_SCHEME",
    "STAGING",
    "meta_path",
    "object_meta_key",
    "object_result_prefix",
    "object_segment_key",
    "parse_object_key",
    "parse_s3_url",
    "result_dir",
    "stored_segments",
    "stored_segments_in",
]

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


# -- object stores (S3-compatible): one definition for the library's direct sync, the collector's
# s3 backend and the readers ---------------------------------------------------------------------
#
#     <prefix>/[<tenant>/]<model>/<version>/<result>/result.json                    the result's manifest
#     <prefix>/[<tenant>/]<model>/<version>/<result>/r<rank>/<segment_id>           a verified segment
#     <prefix>/[<tenant>/]<model>/<version>/<result>/r<rank>/.meta/<segment_id>.json  its SHA-256, bytes, rank
#
# pyodlog's segment ids end in ``.h5`` (``seg-…-r000-….h5``), so segments are ``….h5`` objects. A
# segment id never starts with '.', so ``.meta`` (and the collector's ``.staging``) never collide
# with one. The collector puts its tenant below the prefix; direct sync has no tenant.

S3_SCHEME = "s3://"


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")`` (the prefix without '/' at the ends).

    Raises:
        ValueError: not an ``s3://`` URL with a valid bucket name, or a prefix with an empty,
            ``.`` or ``..`` part.
    """
    if not isinstance(url, str) or not url.startswith(S3_SCHEME):
        raise ValueError(f"expected an s3://bucket/prefix URL, got {url!r}")
    bucket, _, prefix = url[len(S3_SCHEME) :].partition("/")
    if re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket) is None:
        raise ValueError(
            f"{url!r}: {bucket!r} is not an S3 bucket name (3-63 lower-case letters, digits, '.' "
            "or '-')"
        )
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ValueError(f"{url!r}: the prefix has an empty, '.' or '..' part")
    if "?" in prefix or "#" in prefix:
        raise ValueError(f"{url!r}: an s3:// URL has no query or fragment")
    return bucket, prefix


def object_result_prefix(prefix: str, *names: str) -> str:
    """``<prefix>/<name>/…/`` (each name checked) for a result's objects; names: [tenant,] model,
    version, result."""
    for name in names:
        if not is_valid_name(name):
            raise ValueError(f"{name!r} is not a valid name")
    return "/".join(p for p in (prefix, *names) if p) + "/"


def object_segment_key(result_prefix: str, rank: int, segment_id: str) -> str:
    """The key of a stored segment under a result's prefix."""
    if not is_valid_name(segment_id):
        raise ValueError(f"segment id {segment_id!r} is not a valid name")
    return f"{result_prefix}r{int(rank)}/{segment_id}"


def object_meta_key(result_prefix: str, rank: int, segment_id: str) -> str:
    """The key of a stored segment's small JSON (segment_id, rank, sha256, bytes, …)."""
    if not is_valid_name(segment_id):
        raise ValueError(f"segment id {segment_id!r} is not a valid name")
    return f"{result_prefix}r{int(rank)}/{META}/{segment_id}.json"


def parse_object_key(result_prefix: str, key: str) -> tuple[int, str] | None:
    """``(rank, segment_id)`` of a segment object's key under ``result_prefix``; None for any other key."""
    if not key.startswith(result_prefix):
        return None
    parts = key[len(result_prefix) :].split("/")
    if len(parts) != 2 or not parts[0].startswith("r") or not is_valid_name(parts[1]):
        return None
    rank = parse_rank(parts[0][1:])
    return None if rank is None else (rank, parts[1])
