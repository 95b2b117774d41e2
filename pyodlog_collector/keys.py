"""API keys of the collector: loaded from a file, compared in constant time.

The key file holds one key per line: ``TENANT:KEY`` (the uploads of that key
live under ``TENANT``) or a bare ``KEY`` (tenant ``default``; at most one). A
line with a ':' is always ``TENANT:KEY``, so a key never contains ':'.
Blank lines and lines starting with ``#`` are ignored. Only SHA-256 digests of
the keys are kept in memory, and no key, nor any part of one, is ever logged or
printed (nor a tenant name, which could be the start of a mistyped key).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from pathlib import Path

from pyodlog_protocol import NAME_RULE, is_valid_name

__all__ = ["MIN_KEY_LENGTH", "ApiKeys", "KeyFileError"]

log = logging.getLogger("pyodlog.collector")
MIN_KEY_LENGTH = 16


class KeyFileError(ValueError):
    """The API key file is missing or malformed (the message never shows a key)."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The accepted keys and the tenant each one writes to.

    Args:
        entries: ``(tenant, key)`` pairs.
    """

    def __init__(self, entries: list[tuple[str, str]]) -> None:
        if not entries:
            raise KeyFileError(
                "no API key configured: the key file needs at least one line 'TENANT:KEY' or 'KEY'"
            )
        self._entries: list[tuple[str, bytes]] = []
        # No message names a tenant: in a line meant as a bare key that holds a ':', the "tenant"
        # is the start of the key.
        for number, (tenant, key) in enumerate(entries, 1):
            if not is_valid_name(tenant):
                raise KeyFileError(
                    f"key #{number}: the part before ':' is not a valid tenant name ({NAME_RULE}); "
                    "write 'TENANT:KEY', and use keys without ':' (pyodlog keygen makes such keys)"
                )
            if len(key) < MIN_KEY_LENGTH or any(c.isspace() or not c.isprintable() for c in key):
                raise KeyFileError(
                    f"key #{number} is shorter than {MIN_KEY_LENGTH} characters or "
                    "contains whitespace: use a long random key, e.g. `python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))'`"
                )
            self._entries.append((tenant, _digest(key)))
        digests = [d for _, d in self._entries]
        if len(set(digests)) != len(digests):
            raise KeyFileError(
                "the same key appears twice in the key file: give every tenant its own key"
            )

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        """Reads a key file (see the module docstring)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            mode = path.stat().st_mode
        except OSError as error:
            raise KeyFileError(
                f"cannot read the API key file {path}: {error.strerror or error}"
            ) from None
        except UnicodeDecodeError:
            raise KeyFileError(f"the API key file {path} is not UTF-8 text") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("the API key file %s is readable by other users: chmod 600 %s", path, path)
        entries: list[tuple[str, str]] = []
        bare = 0
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            tenant, sep, key = line.partition(":")
            if not sep:
                tenant, key = "default", line
                bare += 1
                if bare > 1:
                    raise KeyFileError(
                        f"{path} line {number}: more than one bare key; write 'TENANT:KEY' lines to "
                        "give each key its own tenant"
                    )
            entries.append((tenant.strip(), key.strip()))
        return cls(entries)

    @property
    def tenants(self) -> list[str]:
        return sorted({t for t, _ in self._entries})

    def __len__(self) -> int:
        return len(self._entries)

    def tenant_for(self, key: str | None) -> str | None:
        """The tenant of ``key``, or None. Every entry is compared, in constant time each."""
        if key is None:
            return None
        given = _digest(key)
        found = None
        for tenant, digest in self._entries:
            if hmac.compare_digest(given, digest) and found is None:
                found = tenant
        return found

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self._entries)} keys hidden>, {len(self.tenants)} tenant(s))"


def generate_key() -> str:
    """A new random key (for ``pyodlog keygen``)."""
    import secrets

    return secrets.token_urlsafe(32)


def write_key_file(path: str | Path, lines: list[str]) -> None:
    """Writes a key file readable by its owner only."""
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
