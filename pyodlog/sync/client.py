"""CollectorClient: pyodlog's HTTP client for the collector protocol (``docs/protocol.md``).

One ``requests.Session`` per logger: pooled keep-alive connections, timeouts
on every request, and urllib3 retries with exponential backoff and jitter for
connection errors, 429 and 5xx, honouring ``Retry-After``. Every request of
the protocol is safe to repeat (a piece sent twice overwrites the same bytes),
so PUT is retried too, and carries the segment's SHA-256 as ``Idempotency-Key``.

The API key travels only in ``Authorization: Bearer``; it is never part of a
URL, a repr, a log line or an error message. Redirects are refused rather than
followed, so the key is never sent anywhere but the configured endpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, TypeGuard
from urllib.parse import quote, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from pyodlog._checks import check_number
from pyodlog_protocol import (
    HEADER_FOLLOWS_PIECE,
    HEADER_IDEMPOTENCY_KEY,
    HEADER_MAX_REQUEST_BYTES,
    HEADER_PIECES_AHEAD,
    is_loopback_host,
    parse_uint,
    segment_path,
    segments_path,
)

if TYPE_CHECKING:
    from pyodlog.sync.secret import Secret

__all__ = ["CollectorClient", "SyncConfig", "SyncError", "check_api_key", "check_endpoint"]

RETRY_STATUSES = (429, 500, 502, 503, 504, 507)
#: Any run of this many characters of the API key in a message is redacted.
REDACT_RUN = 8
#: Answers to a PUT that refuse that segment for good (or say where to resume: 409, 422): every 4xx
#: but 401/403 (the key), 404/405 (not a collector endpoint), 408 and 429 (try again later).
REFUSALS = frozenset(range(400, 500)) - {401, 403, 404, 405, 408, 429}


class SyncError(RuntimeError):
    """An upload failed; the message names the endpoint and the reason (never the key)."""


def check_api_key(key: Any) -> str:
    """Validates an API key: a non-empty string of visible ASCII characters (no whitespace or control).

    A key read from a file often ends in a newline, which would otherwise fail
    later, in the middle of an upload, with the key in the error. The error
    here names the position and the kind of character, never the key.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(
            f"api_key must be a non-empty string, got {type(key).__name__}"
            + (" ''" if isinstance(key, str) else "")
        )
    for position, char in enumerate(key):
        if "!" <= char <= "~":
            continue
        if char in "\r\n":
            kind = "a line break (\\r or \\n; a key read from a file keeps its newline: strip it)"
        elif char.isspace():
            kind = "whitespace"
        elif not char.isprintable():
            kind = "a control character"
        else:
            kind = "a non-ASCII character"
        raise ValueError(
            f"api_key has {kind} at position {position} of {len(key)}: an API key is visible ASCII "
            "characters only (the key itself is not shown)"
        )
    return key


@dataclass
class SyncConfig:
    """How a logger talks to the collector.

    Attributes:
        ca_bundle: a CA bundle (file or folder) to verify the collector's TLS
            certificate with; default: the system's / ``REQUESTS_CA_BUNDLE``.
        allow_insecure_http: allow ``http://`` to hosts other than loopback
            (the key would cross the network in clear text).
        connect_timeout, read_timeout: seconds, per request.
        retries: retries of one request (connection errors, 429, 5xx).
        backoff: the first retry waits about this many seconds; each next one twice as long (plus jitter).
        chunk_bytes: a segment is sent in pieces of at most this size (64 MiB; at most the
            largest request body the collector announces, and at most 8 MiB over TLS, where
            each piece is read into a buffer). An upload cut off resumes at the last byte the
            collector kept, whatever the piece size; a proxy in front of the collector that
            limits request bodies needs pieces below its limit.
        max_retry_interval: the background syncer waits at most this long between failed passes.
        close_timeout: ``close()`` waits this long for the last segments to be sent
            (whatever is left is sent by the next logger on the same result).
        progress: show a progress bar in ``upload()``; None: only in an interactive terminal.
        s3_endpoint_url: for ``api_endpoint="s3://bucket/prefix"``: the S3 API's URL of a store
            that is not AWS (MinIO, SeaweedFS, Ceph RGW, ...); default ``AWS_ENDPOINT_URL`` or AWS.
        s3_multipart_bytes: segments above this size go as multipart uploads (resumable by part).
        s3_part_bytes: the part size of a multipart upload (at least 5 MiB, S3's minimum).
        s3_max_concurrency: parts of one segment sent at once.
    """

    ca_bundle: str | None = None
    allow_insecure_http: bool = False
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    retries: int = 3
    backoff: float = 0.5
    chunk_bytes: int = 64 << 20
    max_retry_interval: float = 60.0
    close_timeout: float = 10.0
    progress: bool | None = None
    s3_endpoint_url: str | None = None
    s3_multipart_bytes: int = 16 << 20
    s3_part_bytes: int = 8 << 20
    s3_max_concurrency: int = 4

    def __post_init__(self) -> None:
        for name in ("s3_multipart_bytes", "s3_part_bytes", "s3_max_concurrency"):
            check_number(getattr(self, name), f"SyncConfig.{name}")
        if self.s3_part_bytes < 5 << 20:
            raise ValueError(
                f"SyncConfig.s3_part_bytes={self.s3_part_bytes} is below 5 MiB, the smallest part "
                "S3 accepts: pass at least 5 << 20"
            )
        for name in ("connect_timeout", "read_timeout", "chunk_bytes", "max_retry_interval"):
            value = getattr(self, name)
            check_number(value, f"SyncConfig.{name}")
        for name in ("retries", "backoff", "close_timeout"):
            value = getattr(self, name)
            check_number(value, f"SyncConfig.{name}", allow_zero=True)
        if self.ca_bundle is not None and not os.path.exists(self.ca_bundle):
            raise ValueError(
                f"SyncConfig.ca_bundle={self.ca_bundle!r} does not exist: pass a CA bundle file or folder"
            )


def check_endpoint(endpoint: Any, allow_insecure_http: bool = False) -> str:
    """Validates an endpoint URL: https, or http to loopback (or with the opt-in); no credentials in it."""
    if not isinstance(endpoint, str):
        raise ValueError(f"api_endpoint must be a URL string, got {type(endpoint).__name__}")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"api_endpoint must be an http:// or https:// URL with a host, got {endpoint!r}"
        )
    if parts.username or parts.password:
        raise ValueError(
            "api_endpoint must not contain credentials: pass the key as api_key (or PYODLOG_API_KEY)"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"api_endpoint must not have a query or fragment, got {endpoint!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname) and not allow_insecure_http:
        raise ValueError(
            f"api_endpoint {endpoint!r} is plain http:// to a host that is not loopback: the API key and the data "
            "would cross the network unencrypted. Use https://, or pass sync_config=pyodlog.SyncConfig("
            "allow_insecure_http=True) if the network is trusted"
        )
    return endpoint.rstrip("/")


class _BearerAuth(requests.auth.AuthBase):
    """Adds ``Authorization: Bearer``. requests drops it on redirects to other hosts; we refuse redirects anyway."""

    def __init__(self, key: Secret) -> None:
        self._key = key

    def __call__(self, request):
        request.headers["Authorization"] = "Bearer " + self._key.reveal()
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(<hidden>)"


def _ssl_reason(error: Exception) -> str:
    """The certificate problem from a requests SSLError (its text holds the URL and reason, never headers)."""
    text = str(error)
    marker = "SSLError("
    return text[text.find(marker) :][:300] if marker in text else error.__class__.__name__


def _reason(response: requests.Response, redact) -> str:
    """The collector's reason for a refusal, redacted, then cut to a readable length."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        text = f"{body.get('error', '')}: {body.get('detail', '')}".strip(": ")
    else:
        text = response.text or response.reason or ""
    return redact(str(text))[:200]


class CollectorClient:
    """Speaks the collector protocol to one endpoint.

    Args:
        endpoint: the collector's base URL (``https://collector.example:8750``).
        api_key: the key (a :class:`~pyodlog.sync.secret.Secret`), or None.
        config: timeouts, retries, TLS (:class:`SyncConfig`).
    """

    def __init__(
        self, endpoint: str, api_key: Secret | None, config: SyncConfig | None = None
    ) -> None:
        self.config = config or SyncConfig()
        self.endpoint = check_endpoint(endpoint, self.config.allow_insecure_http)
        self._has_key = api_key is not None
        if api_key is not None:
            check_api_key(api_key.reveal())
        # The forms in which a collector (or a proxy) could echo the key back, as runs of
        # REDACT_RUN characters: any such run of the key in a message is redacted, so a key
        # that was cut off (a truncated answer) or escaped (JSON, URL, repr) is caught too.
        self._key_runs: frozenset[str] = frozenset()
        if api_key is not None:
            key = api_key.reveal()
            forms = {key, json.dumps(key)[1:-1], quote(key, safe=""), quote(key), repr(key)[1:-1]}
            n = min(REDACT_RUN, len(key))
            self._key_runs = frozenset(f[i : i + n] for f in forms for i in range(len(f) - n + 1))
        retry = Retry(
            total=self.config.retries,
            connect=self.config.retries,
            read=self.config.retries,
            status=self.config.retries,
            other=0,
            backoff_factor=self.config.backoff,
            backoff_jitter=self.config.backoff / 2,
            backoff_max=30.0,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=frozenset({"GET", "PUT"}),
            respect_retry_after_header=True,
            raise_on_status=False,
            raise_on_redirect=False,
            redirect=0,
        )
        session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry, pool_connections=2, pool_maxsize=8)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        # Passed with every request: a session-level verify loses to REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE
        # in the environment (requests' merge of settings), which would silently ignore ca_bundle.
        self._verify = self.config.ca_bundle or True
        if api_key is not None:
            session.auth = _BearerAuth(api_key)
        session.headers["User-Agent"] = "pyodlog-sync/1"
        # The environment is read once, here: with trust_env, requests looks up the proxy variables
        # (and ~/.netrc) again for every request (~0.2 ms each here, a good part of a piece's
        # overhead). The CA bundle is passed with every request anyway (see self._verify).
        session.proxies = requests.utils.get_environ_proxies(self.endpoint)
        session.trust_env = False
        if self.config.ca_bundle is None:
            # Without trust_env requests no longer reads REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE itself:
            # read here, once, as it did (SyncConfig.ca_bundle's default), so a private CA given
            # in the environment still verifies the collector (a ca_bundle given still wins).
            self._verify = (
                os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
            )
        self._session = session

    def close(self) -> None:
        self._session.close()

    def redact(self, text: str) -> str:
        """``text`` with every part of the API key (any run of 8 of its characters) replaced by ``<redacted>``."""
        if not self._key_runs or not text:
            return text
        hidden = bytearray(len(text))
        n = len(next(iter(self._key_runs)))
        for run in self._key_runs:
            at = text.find(run)
            while at >= 0:
                hidden[at : at + n] = b"\x01" * n
                at = text.find(run, at + 1)
        if not any(hidden):
            return text
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

    def _error(self, message: str) -> SyncError:
        return SyncError(self.redact(message))

    def __repr__(self) -> str:
        return f"CollectorClient({self.endpoint!r}, api_key={'<set>' if self._has_key else None})"

    # -- requests --------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        where = f"{method} {self.endpoint}{path.split('?')[0]}"
        try:
            response = self._session.request(
                method,
                self.endpoint + path,
                allow_redirects=False,
                verify=self._verify,
                timeout=(self.config.connect_timeout, self.config.read_timeout),
                **kwargs,
            )
        except requests.exceptions.SSLError as error:
            raise self._error(
                f"TLS verification of the collector failed ({where}): {_ssl_reason(error)}; pass "
                "SyncConfig(ca_bundle=...) for a private CA"
            ) from None
        except requests.RequestException as error:
            raise self._error(
                f"cannot reach the collector ({where}) after {self.config.retries} retries: "
                f"{error.__class__.__name__}"
            ) from None
        except (
            Exception
        ) as error:  # e.g. a header value requests refuses: its text would hold the key
            raise self._error(
                f"cannot send {where}: {error.__class__.__name__} while preparing or sending the request"
            ) from None
        if 300 <= response.status_code < 400:
            location = self.redact(str(response.headers.get("Location")))[:200]
            raise self._error(
                f"the collector redirected {where} to {location!r}: pyodlog does "
                "not follow redirects (the API key must not travel elsewhere); set api_endpoint to the "
                "final URL"
            )
        if response.status_code == 401:
            hint = (
                "no API key was given: pass api_key=... or set PYODLOG_API_KEY"
                if not self._has_key
                else f"the API key was not accepted ({_reason(response, self.redact)})"
            )
            raise self._error(f"the collector refused {where} (HTTP 401): {hint}")
        if response.status_code == 403:
            raise self._error(
                f"the collector refused {where} (HTTP 403): the API key is not accepted by this "
                "collector; check api_key / PYODLOG_API_KEY"
            )
        return response

    def _json(
        self, method: str, path: str, expect: tuple[int, ...] = (200,), **kwargs
    ) -> tuple[int, dict[str, Any]]:
        response = self._request(method, path, **kwargs)
        return response.status_code, self._answer(response, method, path, expect)

    def _answer(
        self,
        response: requests.Response,
        method: str,
        path: str,
        expect: tuple[int, ...] = (200,),
    ) -> dict[str, Any]:
        """The JSON object of an answer with one of the ``expect``ed statuses, else a SyncError."""
        where = f"{method} {self.endpoint}{path.split('?')[0]}"
        if response.status_code not in expect:
            raise self._error(
                f"the collector answered {where} with HTTP "
                f"{response.status_code}: {_reason(response, self.redact)}"
            )
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise self._error(
                f"the collector's answer to {where} (HTTP {response.status_code}) is not a JSON "
                "object; is api_endpoint a pyodlog collector?"
            )
        return answer

    def _malformed(self, method: str, path: str, what: str) -> SyncError:
        return self._error(
            f"the collector's answer to {method} {self.endpoint}{path.split('?')[0]} is malformed: "
            f"{what}; is api_endpoint a pyodlog collector (protocol 1)?"
        )

    def list_segments(self, model: str, version: str, result: str) -> list[dict[str, Any]]:
        """The segments the collector holds for a result: ``segment_id``, ``rank``, ``sha256``, ``bytes``."""
        path = segments_path(model, version, result)
        segments = self._json("GET", path)[1].get("segments")
        if not isinstance(segments, list):
            raise self._malformed("GET", path, "'segments' is not a list")
        for entry in segments:
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("segment_id"), str)
                and isinstance(entry.get("sha256"), str)
            ):
                raise self._malformed(
                    "GET", path, "a segment entry lacks a string 'segment_id' or 'sha256'"
                )
        return segments

    def status(
        self, model: str, version: str, result: str, rank: int, segment_id: str, sha256: str
    ) -> dict[str, Any]:
        """``{"status": "stored"|"partial"|"absent", "received": bytes, ["sha256": ...]}``.

        Plus ``"ahead"``: how far beyond ``received`` a piece may start, when the
        collector holds pieces in flight (its ``X-Pieces-Ahead`` header; 0 otherwise),
        and ``"max_request"``: the largest request body it takes (``X-Max-Request-Bytes``;
        0 when not announced).
        """
        path = segment_path(model, version, result, rank, segment_id)
        response = self._request("GET", path, params={"sha256": sha256})
        answer = self._answer(response, "GET", path)
        ahead = parse_uint(response.headers.get(HEADER_PIECES_AHEAD, "0").strip())
        answer["ahead"] = ahead or 0
        largest = parse_uint(response.headers.get(HEADER_MAX_REQUEST_BYTES, "0").strip())
        answer["max_request"] = largest or 0
        state = answer.get("status")
        if state not in ("stored", "partial", "absent"):
            raise self._malformed("GET", path, f"'status' is {_short(state)}")
        if state == "stored" and not isinstance(answer.get("sha256"), str):
            raise self._malformed("GET", path, "a stored segment without a string 'sha256'")
        if state != "stored" and not _is_count(answer.get("received")):
            raise self._malformed(
                "GET", path, f"'received' is {_short(answer.get('received'))}, not a byte count"
            )
        return answer

    def put_piece(
        self,
        model: str,
        version: str,
        result: str,
        rank: int,
        segment_id: str,
        sha256: str,
        offset: int,
        total: int,
        data: bytes | memoryview | BinaryIO,
        follows: int | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Sends bytes ``[offset, offset + len(data))`` of a segment; returns the status and JSON answer.

        A ``memoryview`` (of a mapped file) is handed to the socket as it is, without a copy.
        ``follows``: the
        offset of the piece before this one, which is on its way on another connection (pieces in
        flight: ``X-Follows-Piece``, so the collector holds this one until that one arrived).

        201: stored (verified); 200: the collector had it; 202: partial
        (``received``); 409: ``offset_mismatch`` (resume at ``received``) or
        ``checksum_conflict``; 422: ``checksum_mismatch`` or ``invalid_segment``;
        other codes of :data:`REFUSALS`: refused. Any other answer raises :class:`SyncError`.
        """
        path = segment_path(model, version, result, rank, segment_id)
        headers = {HEADER_IDEMPOTENCY_KEY: sha256, "Content-Type": "application/octet-stream"}
        if follows is not None:
            headers[HEADER_FOLLOWS_PIECE] = str(follows)
        response = self._request(
            "PUT",
            path,
            params={"sha256": sha256, "offset": offset, "total": total},
            data=data,
            headers=headers,
        )
        code = response.status_code
        if code not in (200, 201, 202) and code not in REFUSALS:
            raise self._error(
                f"the collector answered PUT {self.endpoint}{path} with HTTP {code}: "
                f"{_reason(response, self.redact)}"
            )
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            if code in (200, 201, 202):
                raise self._malformed("PUT", path, f"HTTP {code} without a JSON object")
            # A refusal by something in front of the collector (a proxy's HTML 413 page).
            answer = {"error": f"http_{code}", "detail": _reason(response, self.redact)}
        return code, answer


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value: Any) -> str:
    """A value from an answer for an error message: numbers as they are, anything else by its type only
    (a collector that echoes the request must not get the key into the message)."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return f"a {type(value).__name__}"
