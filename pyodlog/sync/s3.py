"""Sync straight to an S3-compatible object store: ``api_endpoint="s3://bucket/prefix"``.

The second sync target beside the collector's HTTP client (:mod:`pyodlog.sync.client`),
chosen by the endpoint's scheme; :class:`~pyodlog.sync.syncer.Syncer` drives both,
so ``upload()``, ``auto_sync`` and the acknowledgement markers are the same.

Where a segment goes (:mod:`pyodlog_protocol.layout`)::

    <prefix>/<model>/<version>/<result>/r<rank>/<segment id>              the segment (….h5)
    <prefix>/<model>/<version>/<result>/r<rank>/.meta/<segment id>.json   sha256, bytes, rank, schema
    <prefix>/<model>/<version>/<result>/result.json                       the result's manifest

Guarantees, as with the collector:

- **Verified by the store**: every request carries ``ChecksumSHA256`` (of the
  object, or of each part of a multipart upload); the store refuses bytes that
  do not match (``BadDigest``). The whole file's SHA-256 is also stored as
  object metadata ``sha256`` (and in the JSON), which the readers check.
- **Idempotent creation**: objects are created with ``If-None-Match: *``. If
  the key exists, its ``sha256`` decides: the same is "already there", another
  one is a conflict (the segment is refused for good, like the collector's 409).
- **Multipart** above ``SyncConfig.s3_multipart_bytes``, parts of
  ``s3_part_bytes`` sent ``s3_max_concurrency`` at a time, each with its
  SHA-256; the upload id and the parts the store acknowledged are kept in
  ``<result>/.sync/<endpoint id>/<segment>.upload``, so a crash (of this
  process or of the store's gateway) resumes with the parts not yet sent. The
  composite checksum the store returns is checked against the parts' own.
- **Retries**: botocore's standard mode (exponential backoff with jitter) on
  throttling, 5xx and connection errors; what still fails stops the pass, and
  the syncer tries again later.
- **Credentials** from the standard AWS chain; never logged, never in an error
  (messages are redacted of the secret key and session token).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pyodlog.io.remote import S3Access, error_code
from pyodlog.sync.client import SyncConfig, SyncError
from pyodlog.sync.state import SyncState
from pyodlog_protocol.layout import (
    object_meta_key,
    object_result_prefix,
    object_segment_key,
    parse_s3_url,
)

__all__ = ["ObjectRefused", "S3Target", "check_s3_endpoint"]

CONTENT_TYPE = "application/x-hdf5"
_CONFLICT = ("PreconditionFailed", "ConditionalRequestConflict")


class ObjectRefused(Exception):
    """The store holds this segment id with another SHA-256 (or refuses it for good): skip it."""


def check_s3_endpoint(endpoint: str) -> str:
    """``s3://bucket[/prefix]``, normalised (no trailing '/'); ValueError when malformed."""
    bucket, prefix = parse_s3_url(endpoint)
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class S3Target:
    """Uploads segments to ``s3://bucket/prefix`` (the Syncer's target for an ``s3://`` endpoint).

    Args:
        endpoint: ``s3://bucket/prefix``.
        config: :class:`~pyodlog.sync.client.SyncConfig` (timeouts, retries, multipart sizes,
            ``s3_endpoint_url``).
    """

    def __init__(self, endpoint: str, config: SyncConfig | None = None) -> None:
        self.config = config or SyncConfig()
        self.endpoint = check_s3_endpoint(endpoint)
        self.bucket, self.prefix = parse_s3_url(self.endpoint)
        self._access = S3Access(
            self.config.s3_endpoint_url,
            retries=int(self.config.retries),
            connect_timeout=self.config.connect_timeout,
            read_timeout=self.config.read_timeout,
            max_pool=max(10, int(self.config.s3_max_concurrency) + 2),
            allow_insecure_http=self.config.allow_insecure_http,
        )
        self.s3 = self._access.client
        self._manifests_sent: set[str] = set()

    def __repr__(self) -> str:
        return f"S3Target({self.endpoint!r})"

    def redact(self, text: str) -> str:
        return self._access.redact(text)

    def close(self) -> None:
        self._access.close()

    def _fail(self, error: BaseException, what: str) -> SyncError:
        return SyncError(self._access.describe(error, f"{what} ({self.endpoint})"))

    # -- the Syncer's interface ----------------------------------------------------------------------

    def list_segments(self, model: str, version: str, result: str) -> list[dict[str, Any]]:
        """Not used for object stores: each segment's creation is conditional (one request, no listing)."""
        return []

    def send_segment(
        self,
        names: tuple[str, str, str],
        rank: int,
        path: Path,
        sha256: str,
        size: int,
        state: SyncState,
        progress=None,
    ) -> tuple[str, int]:
        """Stores one closed segment; returns ``("stored" | "exists", bytes sent)``.

        Raises:
            ObjectRefused: the key holds another file (another SHA-256).
            SyncError: anything that may pass (network, the store, the credentials).
        """
        result_prefix = object_result_prefix(self.prefix, *names)
        key = object_segment_key(result_prefix, rank, path.name)
        self._send_manifest(result_prefix, state)
        metadata = {"sha256": sha256, "bytes": str(size), "rank": str(rank)}
        if size <= self.config.s3_multipart_bytes:
            outcome, sent = self._put_whole(key, path, sha256, size, metadata)
        else:
            outcome, sent = self._put_multipart(key, path, sha256, size, metadata, state)
        if progress is not None:
            progress.update(size)
        self._put_meta(result_prefix, rank, path.name, sha256, size, state)
        return outcome, sent

    # -- one object ------------------------------------------------------------------------------------

    def _existing(self, key: str, sha256: str) -> str:
        """The key exists already: ``"exists"`` with our SHA-256, else :class:`ObjectRefused`."""
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=key)
        except Exception as error:
            raise self._fail(
                error, f"cannot read the metadata of s3://{self.bucket}/{key}"
            ) from None
        theirs = head.get("Metadata", {}).get("sha256")
        if theirs == sha256:
            return "exists"
        raise ObjectRefused(
            f"checksum_conflict: s3://{self.bucket}/{key} holds another file "
            f"(sha256 {theirs or 'not recorded'}, the local one is {sha256}): two different files "
            "share one segment id"
        )

    def _put_whole(
        self, key: str, path: Path, sha256: str, size: int, metadata: dict[str, str]
    ) -> tuple[str, int]:
        checksum = _b64(bytes.fromhex(sha256))
        for attempt in range(2):
            try:
                with open(path, "rb") as body:
                    self.s3.put_object(
                        Bucket=self.bucket,
                        Key=key,
                        Body=body,
                        ContentLength=size,
                        ChecksumSHA256=checksum,
                        IfNoneMatch="*",
                        Metadata=metadata,
                        ContentType=CONTENT_TYPE,
                    )
                return "stored", size
            except Exception as error:
                code, _ = error_code(error)
                if code in _CONFLICT:
                    return self._existing(key, sha256), 0
                if code in ("BadDigest", "XAmzContentSHA256Mismatch") and attempt == 0:
                    continue  # damaged on the way: once more
                raise self._fail(error, f"cannot store s3://{self.bucket}/{key}") from None
        raise SyncError(
            f"the store refused {path.name} twice as not matching its SHA-256 ({self.endpoint}); "
            "is the file changing on disk?"
        )

    # -- multipart ------------------------------------------------------------------------------------

    @staticmethod
    def _upload_marker(state: SyncState, name: str) -> Path:
        return state.folder / f"{name}.upload"

    @staticmethod
    def _save(marker: Path, content: dict) -> None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f"{marker.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w") as f:
            json.dump(content, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)

    def _resume(self, key: str, marker: Path, sha256: str, part_bytes: int) -> dict | None:
        """The upload recorded in ``marker``, with the parts the store still holds; None if none."""
        try:
            saved = json.loads(marker.read_text())
        except (OSError, ValueError):
            return None
        if not (
            isinstance(saved, dict)
            and saved.get("sha256") == sha256
            and saved.get("part_bytes") == part_bytes
            and saved.get("key") == key
            and isinstance(saved.get("upload_id"), str)
        ):
            return None
        held: dict[int, str] = {}
        try:
            paginator = self.s3.get_paginator("list_parts")
            for page in paginator.paginate(
                Bucket=self.bucket, Key=key, UploadId=saved["upload_id"]
            ):
                for part in page.get("Parts", []):
                    held[int(part["PartNumber"])] = part["ETag"]
        except Exception as error:
            if error_code(error)[0] == "NoSuchUpload":
                return None  # completed, aborted or expired: start again (or find it stored)
            raise self._fail(error, f"cannot list the parts of s3://{self.bucket}/{key}") from None
        parts = saved.get("parts") or {}
        saved["parts"] = {
            n: p for n, p in parts.items() if isinstance(p, dict) and held.get(int(n)) == p["etag"]
        }
        return saved

    def _put_multipart(
        self,
        key: str,
        path: Path,
        sha256: str,
        size: int,
        metadata: dict[str, str],
        state: SyncState,
    ) -> tuple[str, int]:
        marker = self._upload_marker(state, path.name)
        part_bytes = int(self.config.s3_part_bytes)
        count = -(-size // part_bytes)
        upload = self._resume(key, marker, sha256, part_bytes)
        if upload is None:
            try:  # stored already (an acknowledgement lost): no part is sent again
                head = self.s3.head_object(Bucket=self.bucket, Key=key)
                if head.get("Metadata", {}).get("sha256") == sha256:
                    marker.unlink(missing_ok=True)
                    return "exists", 0
                return self._existing(key, sha256), 0
            except ObjectRefused:
                raise
            except Exception as error:
                if error_code(error)[1] != 404:
                    raise self._fail(error, f"cannot read s3://{self.bucket}/{key}") from None
            try:
                created = self.s3.create_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    ChecksumAlgorithm="SHA256",
                    Metadata=metadata,
                    ContentType=CONTENT_TYPE,
                )
            except Exception as error:
                raise self._fail(error, f"cannot start an upload of {path.name}") from None
            upload = {
                "key": key,
                "upload_id": created["UploadId"],
                "sha256": sha256,
                "part_bytes": part_bytes,
                "parts": {},
                "started_at": time.time(),
            }
            self._save(marker, upload)
        upload_id = upload["upload_id"]
        lock = threading.Lock()
        sent = [0]

        def send(number: int) -> None:
            offset = (number - 1) * part_bytes
            length = min(part_bytes, size - offset)
            fd = os.open(path, os.O_RDONLY)
            try:
                data = os.pread(fd, length, offset)
            finally:
                os.close(fd)
            checksum = _b64(hashlib.sha256(data).digest())
            try:
                answer = self.s3.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                    ContentLength=length,
                    ChecksumSHA256=checksum,
                )
            except Exception as error:
                raise self._fail(
                    error, f"cannot send part {number} of {count} of {path.name}"
                ) from None
            with lock:
                upload["parts"][str(number)] = {"etag": answer["ETag"], "checksum": checksum}
                sent[0] += length
                self._save(marker, upload)

        missing = [n for n in range(1, count + 1) if str(n) not in upload["parts"]]
        workers = max(1, min(int(self.config.s3_max_concurrency), len(missing)))
        if missing:
            with ThreadPoolExecutor(workers, thread_name_prefix="pyodlog-s3-part") as pool:
                for future in [pool.submit(send, n) for n in missing]:
                    future.result()  # the first failure stops the pass (the rest resume later)
        parts = [
            {
                "PartNumber": n,
                "ETag": upload["parts"][str(n)]["etag"],
                "ChecksumSHA256": upload["parts"][str(n)]["checksum"],
            }
            for n in range(1, count + 1)
        ]
        try:
            done = self.s3.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        except Exception as error:
            code, _ = error_code(error)
            if code in _CONFLICT:
                self._abort(key, upload_id)
                marker.unlink(missing_ok=True)
                return self._existing(key, sha256), sent[0]
            if code == "NoSuchUpload":  # completed by an earlier try whose answer was lost
                marker.unlink(missing_ok=True)
                return self._existing(key, sha256), sent[0]
            raise self._fail(error, f"cannot complete the upload of {path.name}") from None
        composite = (
            _b64(
                hashlib.sha256(
                    b"".join(base64.b64decode(p["ChecksumSHA256"]) for p in parts)
                ).digest()
            )
            + f"-{count}"
        )
        theirs = done.get("ChecksumSHA256")
        if theirs is not None and theirs != composite:
            raise SyncError(
                f"the store's checksum of {path.name} ({theirs}) is not the one of the parts sent "
                f"({composite}) ({self.endpoint}); the object is left for inspection"
            )
        marker.unlink(missing_ok=True)
        return "stored", sent[0]

    def _abort(self, key: str, upload_id: str) -> None:
        # An upload left behind expires with the bucket's lifecycle rule.
        with contextlib.suppress(Exception):
            self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    # -- the small objects beside the segments ------------------------------------------------------

    def _put_meta(
        self, result_prefix: str, rank: int, name: str, sha256: str, size: int, state: SyncState
    ) -> None:
        schema = None
        manifest = state.folder.parent.parent / "result.json"
        with contextlib.suppress(OSError, ValueError, AttributeError):
            schema = json.loads(manifest.read_text()).get("schema")
        body = json.dumps(
            {
                "segment_id": name,
                "rank": rank,
                "sha256": sha256,
                "bytes": size,
                "received_at": time.time(),
                "schema": schema,
            }
        ).encode()
        key = object_meta_key(result_prefix, rank, name)
        try:
            self.s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ChecksumSHA256=_b64(hashlib.sha256(body).digest()),
                ContentType="application/json",
            )
        except Exception as error:
            raise self._fail(error, f"cannot store s3://{self.bucket}/{key}") from None

    def _send_manifest(self, result_prefix: str, state: SyncState) -> None:
        """The result's ``result.json`` (schema, names), once per process, so readers need no local file."""
        if result_prefix in self._manifests_sent:
            return
        manifest = state.folder.parent.parent / "result.json"
        try:
            body = manifest.read_bytes()
        except OSError:
            return
        key = result_prefix + "result.json"
        try:
            self.s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ChecksumSHA256=_b64(hashlib.sha256(body).digest()),
                ContentType="application/json",
            )
        except Exception as error:
            raise self._fail(error, f"cannot store s3://{self.bucket}/{key}") from None
        self._manifests_sent.add(result_prefix)
