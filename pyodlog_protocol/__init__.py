"""The pyodlog collector protocol, version 1: what client and server agree on.

The one package that the library (:mod:`pyodlog`) and the reference collector
(:mod:`pyodlog_collector`) share; neither imports the other. Standard library
only: the collector starts without torch. Names, paths and limits are here,
file helpers in :mod:`pyodlog_protocol.files`. The prose specification is
``docs/protocol.md``.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import quote

__all__ = [
    "API_PREFIX",
    "HEADER_FOLLOWS_PIECE",
    "HEADER_IDEMPOTENCY_KEY",
    "HEADER_MAX_REQUEST_BYTES",
    "HEADER_PIECES_AHEAD",
    "NAME_PATTERN",
    "NAME_RULE",
    "PROTOCOL_VERSION",
    "SHA256_PATTERN",
    "is_loopback_host",
    "is_valid_name",
    "is_valid_sha256",
    "parse_rank",
    "parse_uint",
    "results_path",
    "segment_path",
    "segments_path",
]

PROTOCOL_VERSION = 1
API_PREFIX = f"/v{PROTOCOL_VERSION}"
HEADER_IDEMPOTENCY_KEY = "Idempotency-Key"
#: On a segment's status answer: how far beyond ``received`` a piece may start (pieces in flight).
HEADER_PIECES_AHEAD = "X-Pieces-Ahead"
#: On a piece sent ahead: the offset of the piece before it, which the client has on its way on another
#: connection (the collector holds this piece a moment for that one to begin arriving).
HEADER_FOLLOWS_PIECE = "X-Follows-Piece"
#: On a segment's status answer: the largest request body (piece) the collector takes.
HEADER_MAX_REQUEST_BYTES = "X-Max-Request-Bytes"

#: Model, version, result, segment and tenant names: they become folder and file
#: names on both sides, so only these characters, and never a leading '.' (no
#: '.' or '..', and names starting with '.' are the collector's own files).
#: Always matched whole (``fullmatch``): a trailing newline is not a name.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
#: A non-negative decimal integer in a URL, a query or a header: ASCII digits only
#: (``str.isdigit`` also accepts '²', Arabic-Indic and full-width digits).
UINT_PATTERN = re.compile(r"[0-9]{1,19}")
MAX_RANK = 1 << 20
NAME_RULE = "1-128 letters, digits, '-', '_' or '.', not starting with '.'"


def is_valid_name(value: object) -> bool:
    """Whether ``value`` may be a model, version, result, segment or tenant name."""
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback: where plain HTTP stays local."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_valid_sha256(value: object) -> bool:
    """Whether ``value`` is a lower-case hex SHA-256 digest."""
    return isinstance(value, str) and SHA256_PATTERN.fullmatch(value) is not None


def parse_uint(value: object) -> int | None:
    """A non-negative integer written in ASCII decimal digits (at most 19), or None."""
    if not isinstance(value, str) or UINT_PATTERN.fullmatch(value) is None:
        return None
    return int(value)


def parse_rank(value: str) -> int | None:
    """A rank from a URL segment (a decimal int in [0, MAX_RANK)), or None."""
    rank = parse_uint(value)
    return rank if rank is not None and rank < MAX_RANK else None


def results_path() -> str:
    """``GET``: the results this key has uploaded to."""
    return f"{API_PREFIX}/results"


def segments_path(model: str, version: str, result: str) -> str:
    """``GET``: the segments the server holds for one result."""
    return f"{API_PREFIX}/segments/{quote(model)}/{quote(version)}/{quote(result)}"


def segment_path(model: str, version: str, result: str, rank: int, segment_id: str) -> str:
    """``GET``: upload status; ``PUT``: upload a piece; ``GET …/content``: the stored bytes."""
    return f"{segments_path(model, version, result)}/{int(rank)}/{quote(segment_id)}"
