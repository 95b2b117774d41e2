"""The collector's HTTP front: routing, authentication, limits, request logs.

Built on the standard library's ``ThreadingHTTPServer`` on purpose: the
collector then needs nothing beyond Python, starts in well under a second,
and its whole request path is in this file. HTTP/1.1 keep-alive lets a
client's connection pool reuse connections. It speaks HTTPS itself when given
a certificate and key (``--tls-cert``/``--tls-key``), or sits behind a
TLS-terminating proxy.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import socket
import ssl
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from pyodlog_collector.keys import ApiKeys
from pyodlog_collector.metrics import CONTENT_TYPE, CollectorMetrics
from pyodlog_collector.storage import BodyReadError, CollectorStorage, SegmentKey
from pyodlog_protocol import (
    API_PREFIX,
    HEADER_FOLLOWS_PIECE,
    HEADER_MAX_REQUEST_BYTES,
    HEADER_PIECES_AHEAD,
    NAME_RULE,
    PROTOCOL_VERSION,
    is_valid_name,
    is_valid_sha256,
    parse_rank,
    parse_uint,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start time)

if TYPE_CHECKING:
    from typing import Any

__all__ = ["CollectorServer", "make_server", "tls_context"]

log = logging.getLogger("pyodlog.collector")
# Unread bodies of authenticated requests up to this size are read and discarded before a
# refusal, so the connection stays usable; a request without a valid key gets this much only.
DRAIN_LIMIT = 256 << 20
UNAUTHENTICATED_DRAIN_LIMIT = 64 << 10
# After answering and closing with a body unread: read (and drop) at most this much for at most
# this long, so the client reads the answer instead of a reset connection (a "lingering close").
LINGER_BYTES = 4 << 20
LINGER_SECONDS = 2.0
LIMIT_LOG_INTERVAL = 10.0


class RequestDeadline(Exception):
    """A request (line, headers and body) did not arrive within the collector's request timeout."""


class _DeadlineReader(io.RawIOBase):
    """The connection's reading side with two limits.

    Each read waits at most ``idle_timeout`` seconds, and once the first byte of a
    request arrived, the whole request must be in within ``request_timeout``: a
    client trickling one byte now and then cannot hold a thread for longer.
    """

    def __init__(self, sock: socket.socket, idle_timeout: float, request_timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def start_request(self) -> None:
        self.deadline = None  # armed by the request's first byte

    def readinto(self, buffer) -> int:
        timeout = self.idle_timeout
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise RequestDeadline(
                    f"the request was not complete within {self.request_timeout:g}s"
                )
            timeout = min(timeout, left)
        self._sock.settimeout(timeout)
        try:
            n = self._sock.recv_into(buffer)
        except TimeoutError:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise RequestDeadline(
                    f"the request was not complete within {self.request_timeout:g}s"
                ) from None
            raise
        if n and self.deadline is None:
            self.deadline = time.monotonic() + self.request_timeout
        return n


class CollectorServer(ThreadingHTTPServer):
    """A threading HTTP server that holds the collector's storage, keys and limits.

    Args:
        address: ``(host, port)``.
        storage: where segments go.
        keys: the accepted API keys.
        max_request_bytes: the largest request body (413 above).
        socket_timeout: seconds a connection may stay silent (idle keep-alive, a stalled read).
        tls: serve HTTPS with this context.
        request_timeout: seconds from a request's first byte until its whole body is in (408 after).
        max_connections: open connections served at once; more are answered 503 and closed.
        staging_ttl: seconds after which an untouched staged upload is removed.
    """

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
        request_timeout: float = 300.0,
        max_connections: int = 1024,
        staging_ttl: float = 86400.0,
    ) -> None:
        self.storage = storage
        self.keys = keys
        self.metrics = CollectorMetrics(storage.root)  # GET /metrics
        self.max_request_bytes = int(max_request_bytes)
        self.socket_timeout = socket_timeout
        self.request_timeout = float(request_timeout)
        self.max_connections = int(max_connections)
        self.staging_ttl = float(staging_ttl)
        self.tls = tls
        self._active = 0
        self._active_lock = threading.Lock()
        self._refused_since_log = 0
        self._last_limit_log = -LIMIT_LOG_INTERVAL
        self._stop = threading.Event()
        super().__init__(address, CollectorHandler)
        if tls is not None:
            # The handshake happens on the handler's thread (first read), never in the accept loop.
            self.socket = tls.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )
        self._sweeper = threading.Thread(
            target=self._sweep, name="pyodlog-collector-expiry", daemon=True
        )
        self._sweeper.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    @property
    def active_connections(self) -> int:
        return self._active

    # -- connections -----------------------------------------------------------------------------

    def process_request(self, request, client_address) -> None:
        with self._active_lock:
            admitted = self._active < self.max_connections
            self._active += admitted
        if not admitted:
            self._refuse_connection(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._active_lock:
                self._active -= 1
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active -= 1

    def _refuse_connection(self, request, client_address) -> None:
        now = time.monotonic()
        self._refused_since_log += 1
        if now - self._last_limit_log >= LIMIT_LOG_INTERVAL:
            log.warning(
                "connection limit reached: %d connections open (--max-connections %d); refused %d "
                "connection(s), the latest from %s",
                self._active,
                self.max_connections,
                self._refused_since_log,
                client_address[0],
            )
            self._last_limit_log, self._refused_since_log = now, 0
        if self.tls is None:  # a TLS client would need a handshake first: it just sees the close
            body = json.dumps(
                {
                    "error": "too_many_connections",
                    "detail": f"the collector serves at most {self.max_connections} connections "
                    "at once; retry later",
                }
            ).encode()
            head = (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
            )
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(head.encode() + body)
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        log.exception("internal error serving %s", client_address[0])

    # -- expiry of staged uploads ----------------------------------------------------------------

    def _sweep(self) -> None:
        interval = min(max(self.staging_ttl / 2, 0.05), 60.0)
        # The first sweep waits a moment: it walks the whole root, and the first answers come first.
        if self._stop.wait(min(interval, 1.0)):
            return
        while True:
            try:
                self.storage.expire_staged(
                    self.staging_ttl, piece_ttl=self.request_timeout + self.socket_timeout
                )
            except Exception:
                log.exception("expiring staged uploads failed")
            if self._stop.wait(interval):
                return

    def server_close(self) -> None:
        self._stop.set()
        super().server_close()
        self.storage.close()


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
    request_timeout: float = 300.0,
    max_connections: int = 1024,
    staging_ttl: float = 86400.0,
) -> CollectorServer:
    """A collector bound to ``host:port`` (0: any free port), not yet serving (call ``serve_forever``).

    With ``tls`` (see :func:`tls_context`) it speaks HTTPS. See :class:`CollectorServer` for the limits.
    """
    if isinstance(root, str) and root.startswith("s3://"):  # an object store (--storage s3://...)
        from pyodlog_collector.s3_storage import S3CollectorStorage

        s3_storage = S3CollectorStorage(root, max_segment_bytes)
        s3_storage.check_access()
        storage: Any = s3_storage
    else:
        storage = CollectorStorage(root, max_segment_bytes)
    return CollectorServer(
        (host, port),
        storage,
        keys,
        max_request_bytes,
        tls=tls,
        request_timeout=request_timeout,
        max_connections=max_connections,
        staging_ttl=staging_ttl,
    )


class _Reject(Exception):
    def __init__(
        self,
        status: int,
        error: str,
        detail: str = "",
        headers: dict[str, str] | None = None,
        close: bool = False,
    ):
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}
        self.close = close


def _printable(text: str, limit: int = 120) -> str:
    """Client-supplied text for a log line or an answer: escaped, and cut to ``limit`` characters."""
    return ascii(text[:limit])[1:-1] + ("..." if len(text) > limit else "")


class CollectorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body leave in separate writes; with Nagle's algorithm on, the
    # second waits for the client's delayed ACK (40 ms a request on Linux).
    disable_nagle_algorithm = True
    server_version = f"pyodlog-collector/{PROTOCOL_VERSION}"
    server: CollectorServer

    def setup(self) -> None:
        self._linger = False
        super().setup()
        # A stalled client cannot hold a thread forever.
        self.connection.settimeout(self.server.socket_timeout)
        self.rfile.close()
        self._reader = _DeadlineReader(
            self.connection, self.server.socket_timeout, self.server.request_timeout
        )
        self.rfile = io.BufferedReader(self._reader, 64 << 10)
        self._reset()

    def _reset(self) -> None:
        """Per-request state: nothing of the previous request on this connection carries over."""
        self._started = time.monotonic()
        self._tenant = "-"
        self._body_read = True
        self._responded = False
        self._expect_continue = False
        self.command = ""
        self.path = ""
        self.requestline = ""
        self.request_version = "HTTP/1.0"  # until a request line says otherwise

    def handle(self) -> None:
        try:
            super().handle()
        except (ssl.SSLError, ConnectionError) as error:
            # a client that failed the handshake or went away
            log.warning(
                "%s connection closed: %s", self.client_address[0], error.__class__.__name__
            )

    def handle_one_request(self) -> None:
        self._reset()
        self._reader.start_request()
        try:
            super().handle_one_request()
        except RequestDeadline as error:
            self.close_connection = True
            self._linger = False
            log.warning(
                "%s %s closed: %s (--request-timeout)",
                self.client_address[0],
                self.command or "request",
                error,
            )
            if not self._responded:
                with contextlib.suppress(OSError):
                    self._send_json(408, {"error": "request_timeout", "detail": str(error)})
                    self.wfile.flush()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._linger:
                self._lingering_close()

    def _lingering_close(self) -> None:
        """Half-closes, then drops what the client still sends for a moment, so it reads our answer.

        Closing a socket with unread data sends a reset, and a client still
        sending its body would see the reset instead of the answer.
        """
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            deadline, dropped = time.monotonic() + LINGER_SECONDS, 0
            while dropped < LINGER_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.connection.settimeout(left)
                block = self.connection.recv(1 << 16)
                if not block:
                    break
                dropped += len(block)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # 'GET /path' without a version
            self.send_error(400, "the request line needs a version: 'METHOD /path HTTP/1.1'")
            return False
        return True

    def handle_expect_100(self) -> bool:
        # '100 Continue' only once the request passed every check (see do_PUT), never before the key.
        self._expect_continue = True
        return True

    # -- plumbing ------------------------------------------------------------------------------------

    def send_response(self, code, message=None) -> None:
        if code >= 200:
            self._responded = True
        super().send_response(code, message)

    def log_request(self, code="-", size="-") -> None:  # the method and path only: never a header
        elapsed = (time.monotonic() - self._started) * 1000
        with contextlib.suppress(Exception):  # metrics never fail a request
            first_byte = self._reader.deadline
            since = (
                first_byte - self.server.request_timeout
                if first_byte is not None
                else self._started
            )
            self.server.metrics.request(
                self.command or "", int(getattr(code, "value", code)), time.monotonic() - since
            )
        path = (self.path or "").split("?")[0]
        log.info(
            "%s %s %s %s %.1fms tenant=%s",
            self.client_address[0],
            _printable(self.command or "-", 20),
            _printable(path or "-", 300),
            getattr(code, "value", code),
            elapsed,
            self._tenant,
        )

    def log_message(self, format, *args) -> None:
        log.warning("%s %s", self.client_address[0], _printable(format % args, 300))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Every refusal the standard library makes (bad request line, HTTP/2, long headers) as JSON."""
        try:
            status = HTTPStatus(code)
            error, default = (
                status.phrase.lower().replace(" ", "_").replace("-", "_"),
                status.description,
            )
        except ValueError:
            error, default = "error", ""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = self._linger = True
        detail = message or default
        if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
            detail = "this collector speaks HTTP/1.0 and HTTP/1.1 only"
        if self.request_version == "HTTP/0.9":  # a garbage request line: answer with a status line
            self.request_version = "HTTP/1.0"
        self._send_json(code, {"error": error, "detail": detail[:300]})

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
        if self.command != "HEAD":
            self.wfile.write(data)

    def _discard_body(self) -> None:
        """Reads an unread request body, so the client gets our answer and the connection stays usable.

        Only a body of known length and moderate size is read (small for a
        request without a valid key); otherwise the connection is closed after
        the answer, with a short lingering close.
        """
        if self._body_read:
            return
        self._body_read = True
        length = parse_uint((self.headers.get("Content-Length") or "").strip(" \t"))
        limit = (
            min(DRAIN_LIMIT, self.server.max_request_bytes)
            if self._tenant != "-"
            else UNAUTHENTICATED_DRAIN_LIMIT
        )
        if self.close_connection or length is None or length > limit:
            self.close_connection = self._linger = True
            return
        left = length
        while left:
            block = self.rfile.read(min(left, 1 << 20))
            if not block:
                self.close_connection = True
                return
            left -= len(block)

    def _reject(self, reject: _Reject) -> None:
        if reject.close:
            self.close_connection = self._linger = True
        self._discard_body()
        self._send_json(
            reject.status, {"error": reject.error, "detail": reject.detail}, reject.headers
        )

    def _check_framing(self, body_allowed: bool) -> int:
        """The body length from the headers; refuses what could be read two ways (request smuggling).

        Two ``Content-Length`` headers, ``Content-Length`` with ``Transfer-Encoding``,
        any ``Transfer-Encoding`` (chunked bodies are not accepted) and a body on a
        request that takes none are refused, and the connection is closed: the
        bytes after the headers are never read as another request.
        """
        lengths = self.headers.get_all("Content-Length") or []
        encodings = self.headers.get_all("Transfer-Encoding") or []
        if len(lengths) > 1:
            raise _Reject(
                400, "duplicate_content_length", "send one Content-Length header", close=True
            )
        if lengths and encodings:
            raise _Reject(
                400,
                "conflicting_framing",
                "Content-Length and Transfer-Encoding together are refused",
                close=True,
            )
        if encodings:
            if body_allowed:
                raise _Reject(
                    411,
                    "length_required",
                    "send Content-Length (chunked bodies are not accepted)",
                    close=True,
                )
            raise _Reject(400, "body_not_allowed", f"{self.command} takes no body", close=True)
        if not lengths:
            return -1
        length = parse_uint(lengths[0].strip(" \t"))
        if length is None:
            raise _Reject(
                400,
                "invalid_content_length",
                "Content-Length must be a non-negative integer in ASCII digits",
                close=True,
            )
        if length and not body_allowed:
            raise _Reject(400, "body_not_allowed", f"{self.command} takes no body", close=True)
        return length

    def _authenticate(self) -> str:
        header = self.headers.get_all("Authorization") or []
        if not header:
            raise _Reject(
                401,
                "missing_api_key",
                "send 'Authorization: Bearer <api key>'",
                {"WWW-Authenticate": 'Bearer realm="pyodlog"'},
            )
        scheme, _, token = header[0].partition(" ")
        token = token.strip(" \t")
        if (
            len(header) > 1
            or scheme.lower() != "bearer"
            or not token
            or any(c.isspace() or not c.isprintable() for c in token)
        ):
            raise _Reject(
                401,
                "malformed_authorization",
                "send one header 'Authorization: Bearer <api key>'",
                {"WWW-Authenticate": 'Bearer realm="pyodlog", error="invalid_request"'},
            )
        tenant = self.server.keys.tenant_for(token)
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
        try:
            names = [unquote(p, errors="strict") for p in raw[2:]]
            query = parse_qs(
                parts.query, keep_blank_values=True, errors="strict", max_num_fields=16
            )
        except (UnicodeDecodeError, ValueError):
            raise _Reject(
                400,
                "invalid_url",
                "the path or query is not valid percent-encoded UTF-8 (or has too many fields)",
            ) from None
        return names, query

    @staticmethod
    def _names(values: list[str], what: tuple[str, ...]) -> list[str]:
        for value, name in zip(values, what):
            if not is_valid_name(value):
                raise _Reject(
                    400, "invalid_name", f"{name} '{_printable(value)}' must be {NAME_RULE}"
                )
        return values

    def _segment_key(self, tenant: str, parts: list[str]) -> SegmentKey:
        model, version, result = self._names(parts[:3], ("model", "version", "result"))
        rank = parse_rank(parts[3])
        if rank is None:
            raise _Reject(
                400,
                "invalid_rank",
                f"rank '{_printable(parts[3], 20)}' must be an integer in [0, 2^20) in ASCII digits",
            )
        (segment_id,) = self._names(parts[4:5], ("segment id",))
        return SegmentKey(tenant, model, version, result, rank, segment_id)

    @staticmethod
    def _query_int(query: dict[str, list[str]], name: str) -> int:
        values = query.get(name) or []
        value = parse_uint(values[0]) if len(values) == 1 else None
        if value is None:
            raise _Reject(
                400,
                "invalid_query",
                f"query parameter {name} must be given once, as a non-negative integer in ASCII digits",
            )
        return value

    @staticmethod
    def _query_sha(query: dict[str, list[str]], required: bool) -> str | None:
        values = query.get("sha256") or []
        if not values and not required:
            return None
        if len(values) != 1 or not is_valid_sha256(values[0]):
            raise _Reject(
                400, "invalid_sha256", "query parameter sha256 must be 64 lower-case hex digits"
            )
        return values[0]

    def _follows(self, offset: int) -> int | None:
        """``X-Follows-Piece``: the offset of the piece before this one, on its way on another connection."""
        values = self.headers.get_all(HEADER_FOLLOWS_PIECE) or []
        if not values:
            return None
        value = parse_uint(values[0].strip(" \t")) if len(values) == 1 else None
        if value is None or value >= offset:
            raise _Reject(
                400,
                "invalid_header",
                f"{HEADER_FOLLOWS_PIECE} must be given once, as the offset (ASCII digits) of the "
                "piece before this one, below this piece's offset",
            )
        return value

    # -- methods ---------------------------------------------------------------------------------------

    def _dispatch(self, method) -> None:
        try:
            method()
        except _Reject as reject:
            self._reject(reject)
        except (RequestDeadline, ConnectionError, TimeoutError, ssl.SSLError):
            raise  # the client's side (gone, stalled, too slow): handled and logged as such
        except Exception:
            # A bug, not the client's fault: answer 500 with a reason (and log it), never a silent drop.
            log.exception("internal error on %s %s", self.command, (self.path or "").split("?")[0])
            self.close_connection = True
            if not self._responded:
                self._send_json(
                    500, {"error": "internal_error", "detail": "the collector failed; see its log"}
                )

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_PUT(self) -> None:
        self._dispatch(self._put)

    def _send_metrics(self) -> None:
        """``GET /metrics``: the collector's Prometheus metrics (no tenant, key or path in them)."""
        data = self.server.metrics.render(self.server.active_connections).encode()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _get(self) -> None:
        self._check_framing(body_allowed=False)
        if urlsplit(self.path).path == "/metrics":
            return self._send_metrics()
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
            ahead = getattr(storage, "ahead_bytes", 0)
            headers = {HEADER_MAX_REQUEST_BYTES: str(self.server.max_request_bytes)}
            if ahead:
                headers[HEADER_PIECES_AHEAD] = str(ahead)
            return self._send_json(
                200, storage.status(key, self._query_sha(query, required=False)), headers
            )
        if len(parts) == 6 and parts[5] == "content":
            return self._send_content(self._segment_key(tenant, parts[:5]))
        raise _Reject(404, "not_found", "no such endpoint")

    def _send_content(self, key: SegmentKey) -> None:
        opener = getattr(self.server.storage, "open_content", None)
        if opener is not None:  # an object store (s3_storage): stream the object
            found = opener(key)
            if found is None:
                raise _Reject(404, "not_found", "no such segment")
            stream, size, sha = found
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("X-Content-SHA256", sha)
            self.end_headers()
            for block in stream.iter_chunks(1 << 20):
                self.wfile.write(block)
            return
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

    def _put(self) -> None:
        length = self._check_framing(body_allowed=True)
        if length < 0:
            raise _Reject(
                411,
                "length_required",
                "send Content-Length (chunked bodies are not accepted)",
                close=True,
            )
        self._body_read = length == 0
        parts, query = self._route()
        tenant = self._authenticate()  # before anything is read of the body
        if parts[:1] != ["segments"] or len(parts) != 6:
            raise _Reject(
                404,
                "not_found",
                "PUT goes to /v1/segments/<model>/<version>/<result>/<rank>/<segment id>",
            )
        key = self._segment_key(tenant, parts[1:])
        sha = self._query_sha(query, required=True)
        assert sha is not None  # required: a missing one was refused
        offset, total = self._query_int(query, "offset"), self._query_int(query, "total")
        if length > self.server.max_request_bytes:
            raise _Reject(
                413,
                "request_too_large",
                f"a request body may hold at most "
                f"{self.server.max_request_bytes} bytes: upload the segment in smaller pieces",
            )
        follows = self._follows(offset)
        storage = self.server.storage
        early = storage.check_piece(key, sha, offset, total, length, ahead=True)
        if early is not None:
            self._discard_body()
            return self._send_json(early.status, early.body)
        if self._expect_continue:
            self.send_response_only(HTTPStatus.CONTINUE)
            self.end_headers()
        try:
            self._body_read = True  # write_piece reads it, or the connection closes
            outcome = storage.write_piece(
                key, sha, offset, total, self.rfile, length, follows=follows
            )
        except BodyReadError as error:
            self.close_connection = True
            log.warning(
                "%s PUT %s/%s/%s/%s: %s",
                self.client_address[0],
                key.model,
                key.version,
                key.result,
                key.segment_id,
                error,
            )
            return
        except OSError as error:
            log.error("cannot store %s/%s: %s", key.result, key.segment_id, error)
            self.close_connection = True  # how much of the body was read is unknown
            raise _Reject(
                507,
                "storage_error",
                "the collector cannot write right now; retry later",
                {"Retry-After": "5"},
            ) from error
        self.server.metrics.piece(outcome.status, length, total)
        self._send_json(outcome.status, outcome.body)

    def _not_allowed(self) -> None:
        self.close_connection = self._linger = True
        self._send_json(
            HTTPStatus.METHOD_NOT_ALLOWED,
            {"error": "method_not_allowed", "detail": "this collector answers GET and PUT"},
            {"Allow": "GET, PUT"},
        )

    do_POST = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed
