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

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from pyodlog_protocol import (
    HEADER_IDEMPOTENCY_KEY,
    is_loopback_host,
    results_path,
    segment_path,
    segments_path,
)

if TYPE_CHECKING:
    from pyodlog.sync.secret import Secret

__all__ = ["CollectorClient", "SyncConfig", "SyncError", "check_endpoint"]

RETRY_STATUSES = (429, 500, 502, 503, 504, 507)


class SyncError(RuntimeError):
    """An upload failed; the message names the endpoint and the reason (never the key)."""


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
        chunk_bytes: a segment is sent in pieces of this size (each resumable).
        max_retry_interval: the background syncer waits at most this long between failed passes.
        close_timeout: ``close()`` waits this long for the last segments to be sent
            (whatever is left is sent by the next logger on the same result).
        progress: show a progress bar in ``upload()``; None: only in an interactive terminal.
    """

    ca_bundle: str | None = None
    allow_insecure_http: bool = False
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    retries: int = 3
    backoff: float = 0.5
    chunk_bytes: int = 8 << 20
    max_retry_interval: float = 60.0
    close_timeout: float = 10.0
    progress: bool | None = None

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "read_timeout", "chunk_bytes", "max_retry_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"SyncConfig.{name} must be a positive number, got {value!r}")
        for name in ("retries", "backoff", "close_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"SyncConfig.{name} must be a number >= 0, got {value!r}")
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


def _reason(response: requests.Response) -> str:
    try:
        body = response.json()
        return f"{body.get('error', '')}: {body.get('detail', '')}".strip(": ")
    except ValueError:
        return (response.text or response.reason or "")[:200]


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
        self._session = session

    def close(self) -> None:
        self._session.close()

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
            raise SyncError(
                f"TLS verification of the collector failed ({where}): {_ssl_reason(error)}; pass "
                "SyncConfig(ca_bundle=...) for a private CA"
            ) from None
        except requests.RequestException as error:
            raise SyncError(
                f"cannot reach the collector ({where}) after {self.config.retries} retries: "
                f"{error.__class__.__name__}"
            ) from None
        if 300 <= response.status_code < 400:
            raise SyncError(
                f"the collector redirected {where} to {response.headers.get('Location')!r}: pyodlog does "
                "not follow redirects (the API key must not travel elsewhere); set api_endpoint to the "
                "final URL"
            )
        if response.status_code == 401:
            hint = (
                "no API key was given: pass api_key=... or set PYODLOG_API_KEY"
                if not self._has_key
                else f"the API key was not accepted ({_reason(response)})"
            )
            raise SyncError(f"the collector refused {where} (HTTP 401): {hint}")
        if response.status_code == 403:
            raise SyncError(
                f"the collector refused {where} (HTTP 403): the API key is not accepted by this "
                "collector; check api_key / PYODLOG_API_KEY"
            )
        return response

    def _json(
        self, method: str, path: str, expect: tuple[int, ...] = (200,), **kwargs
    ) -> tuple[int, dict[str, Any]]:
        response = self._request(method, path, **kwargs)
        if response.status_code not in expect:
            raise SyncError(
                f"the collector answered {method} {self.endpoint}{path.split('?')[0]} with HTTP "
                f"{response.status_code}: {_reason(response)}"
            )
        try:
            return response.status_code, response.json()
        except ValueError:
            raise SyncError(
                f"the collector's answer to {method} {self.endpoint}{path.split('?')[0]} is not JSON; is "
                "api_endpoint a pyodlog collector?"
            ) from None

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/v1/health")[1]

    def results(self) -> list[dict[str, Any]]:
        return self._json("GET", results_path())[1]["results"]

    def list_segments(self, model: str, version: str, result: str) -> list[dict[str, Any]]:
        """The segments the collector holds for a result: ``segment_id``, ``rank``, ``sha256``, ``bytes``."""
        return self._json("GET", segments_path(model, version, result))[1]["segments"]

    def status(
        self, model: str, version: str, result: str, rank: int, segment_id: str, sha256: str
    ) -> dict[str, Any]:
        """``{"status": "stored"|"partial"|"absent", "received": bytes, ["sha256": ...]}``."""
        return self._json(
            "GET", segment_path(model, version, result, rank, segment_id), params={"sha256": sha256}
        )[1]

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
        data: bytes | BinaryIO,
    ) -> tuple[int, dict[str, Any]]:
        """Sends bytes ``[offset, offset + len(data))`` of a segment; returns the status and JSON answer.

        201: stored (verified); 200: the collector had it; 202: partial
        (``received``); 409: ``offset_mismatch`` (resume at ``received``) or
        ``checksum_conflict``; 422: ``checksum_mismatch``.
        """
        return self._json(
            "PUT",
            segment_path(model, version, result, rank, segment_id),
            expect=(200, 201, 202, 409, 422),
            params={"sha256": sha256, "offset": offset, "total": total},
            data=data,
            headers={HEADER_IDEMPOTENCY_KEY: sha256, "Content-Type": "application/octet-stream"},
        )

    def download(self, model: str, version: str, result: str, rank: int, segment_id: str) -> bytes:
        """The stored bytes of a segment."""
        response = self._request(
            "GET", segment_path(model, version, result, rank, segment_id) + "/content"
        )
        if response.status_code != 200:
            raise SyncError(
                f"the collector has no segment {segment_id} of {model}/{version}/{result} "
                f"(HTTP {response.status_code})"
            )
        return response.content
