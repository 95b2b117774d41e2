"""Results in an S3-compatible object store: the boto3 client pyodlog uses, and reading a result back.

``open_result("s3://bucket/prefix/<model>/<version>/<result>")`` lands here: the
result's segments (layout: :mod:`pyodlog_protocol.layout`) are downloaded into a
local cache folder, each one's SHA-256 checked against the one stored with it
(object metadata ``sha256``, written by pyodlog's sync and by the collector),
and the folder is then read like any result folder. A segment cached earlier
with the same ETag is not downloaded again. The cache is bounded
(``PYODLOG_CACHE_BYTES``, default 20 GiB): the results opened least recently are
removed first.

Credentials come from boto3's standard chain (environment, config files,
instance roles); they are never logged and never part of an error message.
The store's URL: ``AWS_ENDPOINT_URL`` (or the argument) for a store that is not AWS.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from pyodlog_protocol import is_loopback_host
from pyodlog_protocol.layout import object_result_prefix, parse_object_key, parse_s3_url

__all__ = ["RemoteChecksumError", "S3Access", "cache_root", "fetch_s3_result", "is_s3_url"]

#: Any run of this many characters of a credential in a message is redacted.
REDACT_RUN = 8
DEFAULT_CACHE_BYTES = 20 << 30
_CACHE_INFO = ".pyodlog-cache"


class RemoteChecksumError(ValueError):
    """A stored segment whose bytes do not match its SHA-256 (``open_result`` raises it as a
    ``CorruptResultError``)."""


def is_s3_url(path: object) -> bool:
    """Whether ``path`` is an ``s3://`` URL (a str; a Path never is)."""
    return isinstance(path, str) and path.startswith("s3://")


class S3Access:
    """A boto3 S3 client with pyodlog's settings, and the redaction of its credentials.

    Args:
        endpoint_url: the store's S3 URL; None: ``AWS_ENDPOINT_URL`` / the AWS configuration.
        retries: retries of one request (botocore's standard mode: exponential backoff with
            jitter, on throttling, 5xx and connection errors).
        connect_timeout, read_timeout: seconds.
        max_pool: connections kept open.
        allow_insecure_http: allow an ``http://`` endpoint that is not loopback.
    """

    def __init__(
        self,
        endpoint_url: str | None = None,
        retries: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_pool: int = 10,
        allow_insecure_http: bool = False,
    ) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ImportError(
                "s3:// needs boto3, which is not installed: pip install 'pyodlog[s3]' (or boto3)"
            ) from None

        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or None
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        if endpoint_url is not None:
            from urllib.parse import urlsplit

            parts = urlsplit(endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"the S3 endpoint URL must be http:// or https:// with a host, got "
                    f"{endpoint_url!r}"
                )
            if parts.username or parts.password:
                raise ValueError(
                    "the S3 endpoint URL must not hold credentials: use the AWS credential chain "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role)"
                )
            if (
                parts.scheme == "http"
                and not is_loopback_host(parts.hostname)
                and not allow_insecure_http
            ):
                raise ValueError(
                    f"the S3 endpoint {endpoint_url!r} is plain http:// to a host that is not "
                    "loopback: the segments would cross the network unencrypted. Use https://, or "
                    "pass SyncConfig(allow_insecure_http=True) if the network is trusted"
                )
        self.endpoint_url = endpoint_url
        session = boto3.session.Session()
        config = Config(
            retries={"mode": "standard", "max_attempts": int(retries) + 1},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_pool,
            # Stores other than AWS (MinIO, SeaweedFS, Ceph) serve path-style URLs.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            user_agent_extra="pyodlog-sync/1",
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = session.client("s3", endpoint_url=endpoint_url, config=config)
        runs: set[str] = set()
        credentials = session.get_credentials()
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            for secret in (frozen.secret_key, frozen.token):
                if secret:
                    n = min(REDACT_RUN, len(secret))
                    runs.update(secret[i : i + n] for i in range(len(secret) - n + 1))
        self._secret_runs = frozenset(runs)

    def redact(self, text: str) -> str:
        """``text`` with every part of the secret key or session token (any run of 8 characters) hidden."""
        if not self._secret_runs or not text:
            return text
        hidden = [False] * len(text)
        for run in self._secret_runs:
            at = text.find(run)
            while at >= 0:
                for i in range(at, at + len(run)):
                    hidden[i] = True
                at = text.find(run, at + 1)
        out, i = [], 0
        while i < len(text):
            if hidden[i]:
                while i < len(text) and hidden[i]:
                    i += 1
                out.append("<redacted>")
            else:
                out.append(text[i])
                i += 1
        return "".join(out)

    def describe(self, error: BaseException, what: str) -> str:
        """A message for a failed request: what was done, the store's error code, a hint."""
        code, status = error_code(error)
        if code is None:
            name = error.__class__.__name__
            if name in ("NoCredentialsError", "PartialCredentialsError"):
                return (
                    f"{what}: no AWS credentials were found; set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run where an instance role is available"
                )
            return self.redact(f"{what}: {name}: {error}")[:500]
        hint = ""
        if code in CREDENTIAL_ERRORS or status == 403:
            hint = (
                "; the store refused the credentials: check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY / AWS_PROFILE (the secret is not shown)"
            )
        elif code == "NoSuchBucket":
            hint = "; create the bucket first (pyodlog never creates buckets)"
        message = ""
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            message = str(response.get("Error", {}).get("Message", ""))
        return self.redact(f"{what}: HTTP {status} {code}: {message}{hint}")[:500]

    def close(self) -> None:
        self.client.close()


CREDENTIAL_ERRORS = frozenset(
    {
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
    }
)


def error_code(error: BaseException) -> tuple[str | None, int | None]:
    """The store's error code and HTTP status of a botocore ClientError (None, None otherwise)."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return None, None
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return (str(code) if code is not None else None), status


def cache_root() -> Path:
    """Where results read from object stores are cached: ``PYODLOG_CACHE_DIR``, else ``~/.cache/pyodlog``."""
    configured = os.environ.get("PYODLOG_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pyodlog"


def _cache_limit() -> int:
    text = os.environ.get("PYODLOG_CACHE_BYTES")
    if not text:
        return DEFAULT_CACHE_BYTES
    try:
        value = int(text)
    except ValueError:
        raise ValueError(
            f"PYODLOG_CACHE_BYTES={text!r} is not a number of bytes (e.g. 21474836480)"
        ) from None
    if value <= 0:
        raise ValueError(f"PYODLOG_CACHE_BYTES must be positive, got {value}")
    return value


def _folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _evict(root: Path, keep: Path, limit: int) -> None:
    """Removes the results used least recently until the cache holds at most ``limit`` bytes."""
    entries = []
    for info in root.rglob(f"{_CACHE_INFO}/used"):
        folder = info.parent.parent
        entries.append((info.stat().st_mtime, folder, _folder_bytes(folder)))
    total = sum(e[2] for e in entries)
    for _, folder, size in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if folder == keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= size


def fetch_s3_result(url: str, access: S3Access | None = None) -> Path:
    """Downloads a result from ``s3://bucket/prefix/<model>/<version>/<result>`` into the cache.

    Returns the local folder (a result folder :func:`pyodlog.io.reader.open_result` reads).

    Raises:
        FileNotFoundError: no segment under the URL.
        RemoteChecksumError: a segment whose bytes do not have the SHA-256 stored with it.
        RuntimeError: the store refused or failed (the message never holds a secret).
    """
    bucket, prefix = parse_s3_url(url)
    names = prefix.split("/") if prefix else []
    if len(names) < 3:
        raise ValueError(
            f"{url!r} names no result: pass s3://bucket/[prefix/]<model>/<version>/<result>"
        )
    result_prefix = object_result_prefix("/".join(names[:-3]), *names[-3:])
    access = access or S3Access()
    client = access.client
    local = cache_root() / "s3" / bucket / result_prefix.rstrip("/")
    info_dir = local / _CACHE_INFO
    info_dir.mkdir(parents=True, exist_ok=True)
    segments: dict[str, dict[str, Any]] = {}
    manifest_key = None
    try:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=result_prefix):
            for entry in page.get("Contents", []):
                key = entry["Key"]
                if key == result_prefix + "result.json":
                    manifest_key = key
                    continue
                parsed = parse_object_key(result_prefix, key)
                if parsed is not None:
                    local_name = parsed[1] if parsed[1].endswith(".h5") else parsed[1] + ".h5"
                    segments[local_name] = {"key": key, "etag": entry.get("ETag", "")}
    except Exception as error:
        raise RuntimeError(access.describe(error, f"cannot list {url}")) from None
    if not segments:
        raise FileNotFoundError(f"{url} holds no pyodlog segment (nothing under {result_prefix})")
    for name in os.listdir(local):  # segments gone from the store
        if name.endswith(".h5") and name not in segments:
            (local / name).unlink()
            (local / f"{name}.sha256").unlink(missing_ok=True)
            (info_dir / f"{name}.json").unlink(missing_ok=True)
    for name, entry in sorted(segments.items()):
        target, info = local / name, info_dir / f"{name}.json"
        try:
            cached = json.loads(info.read_text())
            if cached.get("etag") == entry["etag"] and target.is_file():
                continue
        except (OSError, ValueError):
            pass
        tmp = local / f".{name}.{os.getpid()}.{threading.get_ident()}.download"
        try:
            answer = client.get_object(Bucket=bucket, Key=entry["key"])
            expected = answer.get("Metadata", {}).get("sha256")
            digest = hashlib.sha256()
            with open(tmp, "wb") as f:
                for block in answer["Body"].iter_chunks(1 << 20):
                    digest.update(block)
                    f.write(block)
        except Exception as error:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(
                access.describe(error, f"cannot download s3://{bucket}/{entry['key']}")
            ) from None
        if expected is None:
            tmp.unlink()
            raise RemoteChecksumError(
                f"s3://{bucket}/{entry['key']} has no sha256 in its metadata: it was not stored by "
                "pyodlog (its sync or its collector), so its bytes cannot be verified"
            )
        if digest.hexdigest() != expected:
            tmp.unlink()
            raise RemoteChecksumError(
                f"s3://{bucket}/{entry['key']} does not match the SHA-256 stored with it "
                f"({digest.hexdigest()} != {expected}): damaged in the store or on the way"
            )
        # The reader checks each segment against this file again when it reads it.
        (local / f"{name}.sha256").write_text(f"{expected}  {name}\n")
        os.replace(tmp, target)
        info.write_text(json.dumps({"etag": entry["etag"], "sha256": expected}))
    if manifest_key is not None:
        try:
            body = client.get_object(Bucket=bucket, Key=manifest_key)["Body"].read(1 << 20)
            (local / "result.json").write_bytes(body)
        except Exception as error:
            raise RuntimeError(
                access.describe(error, f"cannot download s3://{bucket}/{manifest_key}")
            ) from None
    used = info_dir / "used"
    used.write_text(str(time.time()))
    _evict(cache_root() / "s3", local, _cache_limit())
    return local
