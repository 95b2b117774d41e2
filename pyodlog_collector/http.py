"""The collector's HTTP front: routing, authentication, limits, request logs.

Built on the standard library's ``ThreadingHTTPServer`` on purpose: the
collector then needs nothing beyond Python, starts in well under a second,
and its whole request path is in this file. HTTP/1.1 keep-alive lets a
client's connection pool reuse connections. It speaks HTTPS itself when given
a certificate and key (``--tls-cert``/``--tls-key``), or sits behind a
TLS-terminating proxy.
"""

from __future__ import annotations

import json
import logging
import shutil
import ssl
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from pyodlog_collector.keys import ApiKeys
from pyodlog_collector.storage import CollectorStorage, SegmentKey
from pyodlog_protocol import (
    API_PREFIX,
    PROTOCOL_VERSION,
    is_valid_name,
    is_valid_sha256,
    parse_rank,
)

__all__ = ["CollectorServer", "make_server", "tls_context"]

log = logging.getLogger("pyodlog.collector")
# Unread request bodies up to this size are read and discarded before a refusal.
DRAIN_LIMIT = 256 << 20


class CollectorServer(ThreadingHTTPServer):
    """A threading HTTP server that holds the collector's storage, keys and limits."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        storage: CollectorStorage,
        keys: ApiKeys,
        max_request_bytes: int = 64 << 20,
        socket_timeout: float = 60.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.storage = storage
        self.keys = keys
        self.max_request_bytes = int(max_request_bytes)
        self.socket_timeout = socket_timeout
        self.tls = tls
        super().__init__(address, CollectorHandler)
        if tls is not None:
            # The handshake happens on the handler's thread (first read), never in the accept loop.
            self.socket = tls.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or newer) from a PEM certificate chain and its key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def make_server(
    root,
    keys: ApiKeys,
    host: str = "127.0.0.1",
    port: int = 0,
    max_request_bytes: int = 64 << 20,
    max_segment_bytes: int = 8 << 30,
    tls: ssl.SSLContext | None = None,
) -> CollectorServer:
    """A collector bound to ``host:port`` (0: any free port), not yet serving (call ``serve_forever``).

    With ``tls`` (see :func:`tls_context`) it speaks HTTPS.
    """
    return CollectorServer(
        (host, port), CollectorStorage(root, max_segment_bytes), keys, max_request_bytes, tls=tls
    )


class _Reject(Exception):
    def __init__(
        self, status: int, error: str, detail: str = "", headers: dict[str, str] | None = None
    ):
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


class CollectorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body leave in separate writes; with Nagle's algorithm on, the
    # second waits for the client's delayed ACK (40 ms a request on Linux).
    disable_nagle_algorithm = True
    server_version = f"pyodlog-collector/{PROTOCOL_VERSION}"
    server: CollectorServer

    def setup(self) -> None:
        self.timeout = self.server.socket_timeout  # a stalled client cannot hold a thread forever
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        except (
            ssl.SSLError,
            ConnectionError,
        ) as error:  # a client that failed the handshake or went away
            log.warning(
                "%s connection closed: %s", self.client_address[0], error.__class__.__name__
            )

    # -- plumbing ------------------------------------------------------------------------------------

    def log_request(self, code="-", size="-") -> None:  # the method and path only: never a header
        elapsed = (time.monotonic() - getattr(self, "_started", time.monotonic())) * 1000
        log.info(
            "%s %s %s %s %.1fms tenant=%s",
            self.client_address[0],
            self.command,
            self.path.split("?")[0],
            code,
            elapsed,
            getattr(self, "_tenant", "-"),
        )

    def log_message(self, format, *args) -> None:
        log.warning("%s %s", self.client_address[0], format % args)

    def _send_json(
        self, status: int, body: dict[str, object], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _discard_body(self) -> None:
        """Reads an unread request body, so the client gets our answer and the connection stays usable.

        A client that is still sending when the server answers and closes sees
        a reset connection instead of the answer. Bodies too large to read in
        reasonable time (or of unknown length) close the connection instead.
        """
        if self.command != "PUT" or getattr(self, "_body_read", True):
            return
        self._body_read = True
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > DRAIN_LIMIT:
            self.close_connection = True
            return
        left = int(length)
        while left:
            block = self.rfile.read(min(left, 1 << 20))
            if not block:
                self.close_connection = True
                return
            left -= len(block)

    def _reject(self, reject: _Reject) -> None:
        self._discard_body()
        self._send_json(
            reject.status, {"error": reject.error, "detail": reject.detail}, reject.headers
        )

    def _authenticate(self) -> str:
        header = self.headers.get("Authorization")
        if not header:
            raise _Reject(
                401,
                "missing_api_key",
                "send 'Authorization: Bearer <api key>'",
                {"WWW-Authenticate": 'Bearer realm="pyodlog"'},
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Reject(
                401,
                "malformed_authorization",
                "the Authorization header must be 'Bearer <api key>'",
                {"WWW-Authenticate": 'Bearer realm="pyodlog", error="invalid_request"'},
            )
        tenant = self.server.keys.tenant_for(token.strip())
        if tenant is None:
            raise _Reject(403, "invalid_api_key", "the API key is not accepted by this collector")
        self._tenant = tenant
        return tenant

    def _route(self) -> tuple[list[str], dict[str, list[str]]]:
        parts = urlsplit(self.path)
        raw = parts.path.split("/")
        if raw[:2] != ["", API_PREFIX.strip("/")]:
            raise _Reject(404, "not_found", f"no such endpoint; this collector speaks {API_PREFIX}")
        # Split before unquoting: an encoded '/' (%2F) stays inside one name and fails validation.
        return [unquote(p) for p in raw[2:]], parse_qs(parts.query, keep_blank_values=True)

    @staticmethod
    def _names(values: list[str], what: tuple[str, ...]) -> list[str]:
        for value, name in zip(values, what):
            if not is_valid_name(value):
                raise _Reject(
                    400,
                    "invalid_name",
                    f"{name} {value[:140]!r} must be 1-128 letters, digits, '-', '_' "
                    "or '.', and not '.' or '..'",
                )
        return values

    def _segment_key(self, tenant: str, parts: list[str]) -> SegmentKey:
        model, version, result = self._names(parts[:3], ("model", "version", "result"))
        rank = parse_rank(parts[3])
        if rank is None:
            raise _Reject(
                400, "invalid_rank", f"rank {parts[3][:20]!r} must be a non-negative integer"
            )
        (segment_id,) = self._names(parts[4:5], ("segment id",))
        return SegmentKey(tenant, model, version, result, rank, segment_id)

    @staticmethod
    def _query_int(query: dict[str, list[str]], name: str) -> int:
        value = (query.get(name) or [""])[0]
        if not value.isdigit():
            raise _Reject(
                400, "invalid_query", f"query parameter {name} must be a non-negative integer"
            )
        return int(value)

    @staticmethod
    def _query_sha(query: dict[str, list[str]], required: bool) -> str | None:
        value = (query.get("sha256") or [None])[0]
        if value is None and not required:
            return None
        if not is_valid_sha256(value):
            raise _Reject(
                400, "invalid_sha256", "query parameter sha256 must be 64 lower-case hex digits"
            )
        return value

    # -- methods ---------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._started = time.monotonic()
        try:
            parts, query = self._route()
            if parts == ["health"]:
                return self._send_json(
                    200,
                    {"status": "ok", "protocol": PROTOCOL_VERSION, "server": self.server_version},
                )
            tenant = self._authenticate()
            storage = self.server.storage
            if parts == ["results"]:
                return self._send_json(200, {"results": storage.list_results(tenant)})
            if parts[:1] != ["segments"]:
                raise _Reject(404, "not_found", "no such endpoint")
            parts = parts[1:]
            if len(parts) == 3:
                model, version, result = self._names(parts, ("model", "version", "result"))
                return self._send_json(
                    200, {"segments": storage.list_segments(tenant, model, version, result)}
                )
            if len(parts) == 5:
                key = self._segment_key(tenant, parts)
                return self._send_json(
                    200, storage.status(key, self._query_sha(query, required=False))
                )
            if len(parts) == 6 and parts[5] == "content":
                return self._send_content(self._segment_key(tenant, parts[:5]))
            raise _Reject(404, "not_found", "no such endpoint")
        except _Reject as reject:
            self._reject(reject)

    def _send_content(self, key: SegmentKey) -> None:
        path = self.server.storage.content_path(key)
        if path is None:  # also what another tenant's reader sees: nothing of this tenant's
            raise _Reject(404, "not_found", "no such segment")
        meta = self.server.storage.status(key, None)
        with open(path, "rb") as f:
            size = path.stat().st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("X-Content-SHA256", str(meta.get("sha256", "")))
            self.end_headers()
            shutil.copyfileobj(f, self.wfile, 1 << 20)

    def do_PUT(self) -> None:
        self._started = time.monotonic()
        self._body_read = False
        try:
            parts, query = self._route()
            tenant = self._authenticate()
            if parts[:1] != ["segments"] or len(parts) != 6:
                raise _Reject(
                    404,
                    "not_found",
                    "PUT goes to /v1/segments/<model>/<version>/<result>/<rank>/<segment id>",
                )
            key = self._segment_key(tenant, parts[1:])
            sha = self._query_sha(query, required=True)
            offset, total = self._query_int(query, "offset"), self._query_int(query, "total")
            length_header = self.headers.get("Content-Length")
            if length_header is None:
                raise _Reject(
                    411, "length_required", "send Content-Length (chunked bodies are not accepted)"
                )
            if not length_header.isdigit():
                raise _Reject(
                    400, "invalid_content_length", "Content-Length must be a non-negative integer"
                )
            length = int(length_header)
            if length > self.server.max_request_bytes:
                raise _Reject(
                    413,
                    "request_too_large",
                    f"a request body may hold at most "
                    f"{self.server.max_request_bytes} bytes: upload the segment in smaller pieces",
                )
            try:
                outcome = self.server.storage.write_piece(
                    key, sha, offset, total, self.rfile, length
                )
            except ConnectionError:
                self.close_connection = True
                return
            except OSError as error:
                log.error("cannot store %s/%s: %s", key.result, key.segment_id, error)
                self.close_connection = True  # how much of the body was read is unknown
                self._body_read = True
                raise _Reject(
                    507,
                    "storage_error",
                    "the collector cannot write right now; retry later",
                    {"Retry-After": "5"},
                ) from error
            self._body_read = outcome.status in (
                201,
                202,
                422,
            )  # the others answer before reading it
            self._discard_body()
            self._send_json(outcome.status, outcome.body)
        except _Reject as reject:
            self._reject(reject)

    def _not_allowed(self) -> None:
        self._started = time.monotonic()
        self.close_connection = True
        self._send_json(
            HTTPStatus.METHOD_NOT_ALLOWED, {"error": "method_not_allowed"}, {"Allow": "GET, PUT"}
        )

    do_POST = do_DELETE = do_PATCH = _not_allowed
