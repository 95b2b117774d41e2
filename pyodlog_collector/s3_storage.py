"""The collector's object-store backend: ``pyodlog serve --storage s3://bucket/prefix``.

The same protocol operations as :class:`pyodlog_collector.storage.CollectorStorage`,
but every byte and every answer lives in the bucket, so any number of collector
processes (on any machines, behind one load balancer) serve one fleet: no
local state, no in-process lock decides anything.

Layout (:mod:`pyodlog_protocol.layout`, below ``prefix``)::

    <tenant>/<model>/<version>/<result>/r<rank>/<segment id>              a verified segment
    <tenant>/<model>/<version>/<result>/r<rank>/.meta/<segment id>.json   rank, SHA-256, bytes, arrival
    <tenant>/.staging/<model>/<version>/<result>/r<rank>/<segment id>/<sha256>/<offset>-<length>
                                                                          one received piece

- A piece is one object of its own (a piece repeated, or sent to two collectors,
  overwrites the same bytes). How much of an upload is staged is the contiguous
  run of pieces from byte 0, read from a listing: any collector answers
  ``status`` and resumes any upload. (Not a multipart upload: S3 parts must be
  at least 5 MiB and a listing of multipart uploads cannot tell two uploads of
  one key apart without local state.)
- When the last piece is in, the collector that received it assembles the
  pieces into a temporary file, checks the SHA-256 and the segment's layout
  (the worker processes of :mod:`pyodlog_collector.segment_check`), and creates
  the segment with ``If-None-Match: *`` (and ``ChecksumSHA256``, verified by the
  store): of two collectors that complete the same segment at once, exactly one
  creates it, the other finds it stored (same SHA-256: "exists"; another one:
  ``checksum_conflict``). Then its JSON is written and the pieces removed.
- A segment is visible (listed) once its JSON exists; ``status`` answers
  ``stored`` from the segment object's metadata as soon as it exists.

Credentials: the standard AWS chain; the store's URL: ``AWS_ENDPOINT_URL`` for a
store that is not AWS. boto3 only: no torch, no pyodlog.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from typing import Any, BinaryIO

from pyodlog_collector.storage import BodyReadError, PieceResult, SegmentKey, SegmentStorageBase
from pyodlog_protocol import is_valid_name, parse_uint
from pyodlog_protocol.files import READ_BLOCK
from pyodlog_protocol.layout import (
    STAGING,
    object_meta_key,
    object_result_prefix,
    object_segment_key,
    parse_s3_url,
)

__all__ = ["S3CollectorStorage"]

log = logging.getLogger("pyodlog.collector")
_PIECE = re.compile(r"(?P<offset>[0-9]{20})-(?P<length>[0-9]{20})")
#: The largest object one PUT creates (S3's limit for a single upload).
MAX_SINGLE_PUT = 5 << 30


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _code(error: BaseException) -> tuple[str | None, int | None]:
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return None, None
    return response.get("Error", {}).get("Code"), response.get("ResponseMetadata", {}).get(
        "HTTPStatusCode"
    )


class S3CollectorStorage(SegmentStorageBase):
    """Stores uploaded segments in ``s3://bucket/prefix``, one key tree per tenant.

    Args:
        url: ``s3://bucket/prefix``.
        max_segment_bytes: the largest segment accepted (at most 5 GiB: one PUT creates it).
        check_segments: check each complete upload's layout before it becomes visible.
        endpoint_url: the store's S3 URL; default ``AWS_ENDPOINT_URL`` / AWS.
    """

    def __init__(
        self,
        url: str,
        max_segment_bytes: int = MAX_SINGLE_PUT,
        check_segments: bool = True,
        endpoint_url: str | None = None,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = parse_s3_url(url)
        self.root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.max_segment_bytes = min(int(max_segment_bytes), MAX_SINGLE_PUT)
        self.check_segments = check_segments
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.s3 = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(
                retries={"mode": "standard", "max_attempts": 4},
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=32,
                s3={"addressing_style": "path" if endpoint_url else "auto"},
                user_agent_extra="pyodlog-collector/1",
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self._init_checker()

    def check_access(self) -> None:
        """Raises OSError (a message without any secret) when the bucket cannot be reached."""
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except Exception as error:
            code, status = _code(error)
            raise OSError(
                f"cannot use s3://{self.bucket}: "
                + (f"HTTP {status} {code}" if code else error.__class__.__name__)
                + " (check the bucket, AWS_ENDPOINT_URL and the AWS credentials)"
            ) from None

    # -- keys --------------------------------------------------------------------------------------

    def _result_prefix(self, tenant: str, model: str, version: str, result: str) -> str:
        return object_result_prefix(self.prefix, tenant, model, version, result)

    def _final(self, key: SegmentKey) -> str:
        rp = self._result_prefix(key.tenant, key.model, key.version, key.result)
        return object_segment_key(rp, key.rank, key.segment_id)

    def _meta(self, key: SegmentKey) -> str:
        rp = self._result_prefix(key.tenant, key.model, key.version, key.result)
        return object_meta_key(rp, key.rank, key.segment_id)

    def _staging(self, key: SegmentKey, sha256: str | None = None) -> str:
        base = (
            object_result_prefix(self.prefix, key.tenant)
            + f"{STAGING}/"
            + object_result_prefix("", key.model, key.version, key.result)
        )
        folder = f"{base}r{key.rank}/{key.segment_id}/"
        return folder if sha256 is None else f"{folder}{sha256}/"

    def _list(self, prefix: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            out += page.get("Contents", [])
        return out

    def _pieces(self, key: SegmentKey, sha256: str) -> list[tuple[int, int, str]]:
        folder = self._staging(key, sha256)
        pieces = []
        for entry in self._list(folder):
            match = _PIECE.fullmatch(entry["Key"][len(folder) :])
            if match:
                pieces.append((int(match["offset"]), int(match["length"]), entry["Key"]))
        return sorted(pieces)

    def _received(self, key: SegmentKey, sha256: str) -> int:
        return self._covered(self._pieces(key, sha256))

    @staticmethod
    def _covered(pieces: list[tuple[int, int, str]]) -> int:
        """The contiguous run of bytes from 0 that the pieces cover."""
        covered = 0
        for offset, length, _ in pieces:
            if offset > covered:
                break
            covered = max(covered, offset + length)
        return covered

    def _stored_meta(self, key: SegmentKey) -> dict[str, Any] | None:
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=self._final(key))
        except Exception as error:
            if _code(error)[1] == 404:
                return None
            raise OSError(f"cannot read the store ({_code(error)[0]})") from None
        meta = head.get("Metadata", {})
        return {"sha256": meta.get("sha256"), "bytes": int(head["ContentLength"])}

    # -- the protocol's operations -----------------------------------------------------------------

    def write_piece(
        self,
        key: SegmentKey,
        sha256: str,
        offset: int,
        total: int,
        body: BinaryIO,
        length: int,
        follows: int | None = None,
    ) -> PieceResult:
        """Stores the piece as an object of its own; when the upload is complete, commits it.

        ``follows`` (``X-Follows-Piece``) is not used: this storage holds no piece ahead of what
        is staged (it announces no ``X-Pieces-Ahead``), such a piece is refused at once.

        Raises:
            BodyReadError: the body could not be read (nothing was staged).
            OSError: the store cannot be written.
        """
        early = self.check_piece(key, sha256, offset, total, length)
        if early is not None:
            return early
        with tempfile.TemporaryFile() as spool:
            digest = hashlib.sha256()
            left = length
            while left:
                try:
                    block = body.read(min(READ_BLOCK, left))
                except OSError as error:
                    raise BodyReadError(
                        f"reading the body failed after {length - left} of {length} bytes "
                        f"({error.__class__.__name__})"
                    ) from None
                if not block:
                    raise BodyReadError(f"the client sent {length - left} of {length} bytes")
                spool.write(block)
                digest.update(block)
                left -= len(block)
            spool.seek(0)
            piece_key = f"{self._staging(key, sha256)}{offset:020d}-{length:020d}"
            self._put(piece_key, spool, length, _b64(digest.digest()))
        pieces = self._pieces(key, sha256)
        received = self._covered(pieces)
        if received < total:
            return PieceResult(202, {"status": "partial", "received": received})
        return self._commit(key, sha256, total, pieces)

    def _put(self, object_key: str, body, length: int, checksum: str, **extra) -> None:
        try:
            self.s3.put_object(
                Bucket=self.bucket,
                Key=object_key,
                Body=body,
                ContentLength=length,
                ChecksumSHA256=checksum,
                **extra,
            )
        except Exception as error:
            if _code(error)[0] in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
            raise OSError(
                f"cannot write s3://{self.bucket}/{object_key} ({_code(error)[0] or error.__class__.__name__})"
            ) from None

    def _commit(
        self, key: SegmentKey, sha256: str, total: int, pieces: list[tuple[int, int, str]]
    ) -> PieceResult:
        with tempfile.NamedTemporaryFile(prefix="pyodlog-commit-", suffix=".h5") as assembled:
            digest = hashlib.sha256()
            written = 0
            for offset, length, piece_key in pieces:
                if offset + length <= written:
                    continue  # covered by earlier pieces
                try:
                    stream = self.s3.get_object(Bucket=self.bucket, Key=piece_key)["Body"]
                except Exception as error:
                    if _code(error)[1] == 404:  # another collector committed and cleaned up
                        meta = self._stored_meta(key)
                        if meta is not None:
                            return self.stored_answer(meta, sha256)
                    raise OSError(f"cannot read a staged piece ({_code(error)[0]})") from None
                skip = written - offset
                for block in stream.iter_chunks(READ_BLOCK):
                    if skip >= len(block):
                        skip -= len(block)
                        continue
                    block = block[skip:]
                    skip = 0
                    assembled.write(block)
                    digest.update(block)
                    written += len(block)
                if written >= total:
                    break
            assembled.flush()
            if written != total or digest.hexdigest() != sha256:
                self._drop(self._staging(key, sha256))
                return PieceResult(
                    422,
                    {
                        "error": "checksum_mismatch",
                        "detail": "the bytes received do not have the "
                        "announced SHA-256; upload the segment again",
                        "received_sha256": digest.hexdigest(),
                    },
                )
            if self.check_segments:
                refusal = self._segment_checker().check(assembled.name)
                if refusal is not None:
                    self._drop(self._staging(key, sha256))
                    log.warning(
                        "refused segment %s/%s/%s/%s/%s: %s",
                        key.tenant,
                        key.model,
                        key.version,
                        key.result,
                        key.segment_id,
                        refusal,
                    )
                    return PieceResult(
                        422,
                        {"error": "invalid_segment", "detail": f"not a pyodlog segment: {refusal}"},
                    )
            assembled.seek(0)
            try:
                self._put(
                    self._final(key),
                    assembled,
                    total,
                    _b64(bytes.fromhex(sha256)),
                    IfNoneMatch="*",  # of collectors completing it at once, one creates it
                    Metadata={"sha256": sha256, "bytes": str(total), "rank": str(key.rank)},
                    ContentType="application/x-hdf5",
                )
                status = 201
            except Exception:  # PreconditionFailed: it exists (another collector, or earlier)
                meta = self._stored_meta(key)
                if meta is None:
                    raise OSError(
                        "the store refused a conditional write of a missing key"
                    ) from None
                if meta["sha256"] != sha256:
                    return self.stored_answer(meta, sha256)
                status = 200
        meta_body = json.dumps(
            {
                "segment_id": key.segment_id,
                "rank": key.rank,
                "sha256": sha256,
                "bytes": total,
                "received_at": time.time(),
            }
        ).encode()
        self._put(
            self._meta(key),
            meta_body,
            len(meta_body),
            _b64(hashlib.sha256(meta_body).digest()),
            ContentType="application/json",
        )
        # Uploads of this id (any SHA-256) can never be stored now: drop what they staged.
        self._drop(self._staging(key))
        if status == 200:
            return PieceResult(200, {"status": "exists", "sha256": sha256, "received": total})
        return PieceResult(201, {"status": "stored", "sha256": sha256, "received": total})

    def _drop(self, prefix: str) -> int:
        """Deletes every object under ``prefix`` (staged pieces); returns how many."""
        keys = [e["Key"] for e in self._list(prefix)]
        for start in range(0, len(keys), 1000):
            with contextlib.suppress(Exception):  # what is left expires with --staging-ttl
                self.s3.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]]},
                )
        return len(keys)

    def expire_staged(
        self, ttl: float, now: float | None = None, piece_ttl: float | None = None
    ) -> int:
        """Removes staged pieces not written for ``ttl`` seconds (by their LastModified)."""
        now = time.time() if now is None else now
        removed = 0
        for tenant in self.tenants():
            staging = object_result_prefix(self.prefix, tenant) + f"{STAGING}/"
            old = [
                e["Key"] for e in self._list(staging) if e["LastModified"].timestamp() < now - ttl
            ]
            for start in range(0, len(old), 1000):
                self.s3.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in old[start : start + 1000]]},
                )
            removed += len(old)
        return removed

    def open_content(self, key: SegmentKey) -> tuple[Any, int, str] | None:
        """The stored segment as ``(stream, bytes, sha256)``, or None."""
        try:
            answer = self.s3.get_object(Bucket=self.bucket, Key=self._final(key))
        except Exception as error:
            if _code(error)[1] == 404:
                return None
            raise OSError(f"cannot read the store ({_code(error)[0]})") from None
        return answer["Body"], int(answer["ContentLength"]), answer["Metadata"].get("sha256", "")

    def content_path(self, key: SegmentKey) -> None:
        """Segments are not local files here: see :meth:`open_content`."""
        return None

    def list_segments(
        self, tenant: str, model: str, version: str, result: str
    ) -> list[dict[str, object]]:
        """The verified segments of one result (those whose JSON is written)."""
        rp = self._result_prefix(tenant, model, version, result)
        out = []
        for entry in self._list(rp):
            rest = entry["Key"][len(rp) :].split("/")
            if len(rest) == 3 and rest[1] == ".meta" and rest[2].endswith(".json"):
                try:
                    body = self.s3.get_object(Bucket=self.bucket, Key=entry["Key"])["Body"]
                    out.append(json.loads(body.read(1 << 16)))
                except (ValueError, OSError):
                    continue
        return sorted(out, key=lambda m: str(m.get("segment_id")))

    def list_results(self, tenant: str) -> list[dict[str, object]]:
        """Every result of a tenant with its segment count and bytes (one listing)."""
        base = object_result_prefix(self.prefix, tenant)
        sizes: dict[str, int] = {}
        visible: set[str] = set()
        for entry in self._list(base):
            parts = entry["Key"][len(base) :].split("/")
            if not parts or not is_valid_name(parts[0]):
                continue  # .staging
            if len(parts) == 5 and parts[3].startswith("r"):
                sizes["/".join(parts[:3] + [parts[3], parts[4]])] = int(entry["Size"])
            elif len(parts) == 6 and parts[4] == ".meta" and parts[5].endswith(".json"):
                visible.add("/".join(parts[:4] + [parts[5][: -len(".json")]]))
        results: dict[tuple[str, ...], list[int]] = {}
        for name, size in sizes.items():
            if name in visible:
                model, version, result, rank, _ = name.split("/")
                if parse_uint(rank[1:]) is None:
                    continue
                total = results.setdefault((model, version, result), [0, 0])
                total[0] += 1
                total[1] += size
        return [
            {"model": m, "version": v, "result": r, "segments": c, "bytes": b}
            for (m, v, r), (c, b) in sorted(results.items())
        ]

    def tenants(self) -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        names = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base, Delimiter="/"
        ):
            for common in page.get("CommonPrefixes", []):
                name = common["Prefix"][len(base) :].rstrip("/")
                if is_valid_name(name):
                    names.append(name)
        return sorted(names)
