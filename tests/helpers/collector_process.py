"""The reference collector as a real process on loopback, and a flaky proxy in front of it, for the sync tests."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

_SEGMENTS: dict[tuple[int, int], bytes] = {}


def real_segment(seed: int = 0, images: int = 2) -> bytes:
    """The bytes of a small real segment: TinyDetector's records, written by pyodlog itself.

    Logged by ``TinyDetectorLogger`` into a local store, then rewritten compact by
    pyodlog's ``write_tables`` (the layout of a recovered segment): a few
    kilobytes instead of the writer's preallocated chunks. Cached per process.
    """
    if (seed, images) not in _SEGMENTS:
        import tempfile

        import torch

        from pyodlog.io import HDF5Store, WriterConfig
        from pyodlog.io.export import write_tables
        from pyodlog.io.reader import read_segment
        from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(seed)
            store = HDF5Store(Path(tmp), config=WriterConfig(flush_interval=0.05))
            logger = TinyDetectorLogger(
                TinyDetector().eval(),
                "tiny",
                "v1",
                result_name="run",
                target_layers={"b": {"path": "backbone.0", "compression": "uint8"}},
                sink=store,
                auto_sync=False,
            )
            g = torch.Generator().manual_seed(seed)
            with torch.inference_mode():
                logger(
                    [torch.rand(3, 8, 12, generator=g) for _ in range(images)],
                    input_ids=[f"{seed}-{i}" for i in range(images)],
                )
            logger.close()
            (segment,) = store.segments()
            tables = read_segment(segment)
            small = Path(tmp) / "small.h5"
            write_tables(small, tables, dict(tables.attrs, seed=seed))
            _SEGMENTS[seed, images] = small.read_bytes()
    return _SEGMENTS[seed, images]


def write_segment_of_size(path: Path, payload_bytes: int, seed: int = 0) -> Path:
    """A valid segment (pyodlog's layout) holding one image and one feature of ``payload_bytes`` random bytes.

    For benchmarks that need a segment of a given size without a model (h5py and numpy only).
    """
    import h5py
    import numpy as np

    rng = np.random.default_rng(seed)

    def text(f, name: str, values: list[str]) -> None:
        data = [v.encode() for v in values]
        lengths = np.array([len(d) for d in data], np.int64)
        f[name + ".bytes"] = np.frombuffer(b"".join(data), np.uint8)
        f[name + ".spans"] = np.stack([np.cumsum(lengths) - lengths, lengths], 1)

    with h5py.File(path, "w") as f:
        f.attrs["model_name"] = "bench"
        f["images/det_offset"] = np.zeros(1, np.int64)
        f["images/det_count"] = np.zeros(1, np.int64)
        f["images/n_epoch"] = np.full(1, -1, np.int64)
        f["images/timestamp"] = np.zeros(1, np.float64)
        f["images/image_size"] = np.array([[8, 8]], np.int32)
        text(f, "images/input_id", [f"image-{seed}"])
        text(f, "images/dataset_type", ["production"])
        f["detections/boxes"] = np.zeros((0, 4), np.float32)
        f["detections/scores"] = np.zeros(0, np.float32)
        f["detections/labels"] = np.zeros(0, np.int64)
        f["detections/candidate_index"] = np.zeros(0, np.int64)
        f["detections/logits"] = np.zeros((0, 2), np.float32)
        f["features/image_row"] = np.zeros(1, np.int64)
        f["features/method"] = np.zeros(1, np.int8)
        f["features/per_image"] = np.ones(1, np.int8)
        f["features/shape"] = np.array([[payload_bytes] + [-1] * 7], np.int64)
        f["features/original_shape"] = np.array([[payload_bytes] + [-1] * 7], np.int64)
        f["features/pooled_to"] = np.full((1, 2), -1, np.int64)
        f["features/payload_offset"] = np.zeros(1, np.int64)
        f["features/payload_nbytes"] = np.full(1, payload_bytes, np.int64)
        f["features/qrow_offset"] = np.zeros(1, np.int64)
        f["features/qrow_count"] = np.zeros(1, np.int64)
        text(f, "features/name", ["payload"])
        text(f, "features/dtype", ["uint8"])
        text(f, "features/payload_dtype", ["uint8"])
        f["features_payload"] = rng.integers(0, 256, payload_bytes, dtype=np.uint8)
        f["features_scale"] = np.zeros(0, np.float32)
        f["features_offset"] = np.zeros(0, np.float32)
    return path


KEY_A = "key-of-tenant-a-0123456789abcdef"
KEY_B = "key-of-tenant-b-fedcba9876543210"


def write_keys(path: Path) -> Path:
    path.write_text(f"# two tenants\ntenant-a:{KEY_A}\ntenant-b:{KEY_B}\n")
    path.chmod(0o600)
    return path


class CollectorProcess:
    """``python -m pyodlog_collector serve`` on 127.0.0.1; restartable on the same port and root."""

    def __init__(self, root: Path, key_file: Path, extra_args: list[str] | None = None) -> None:
        self.root, self.key_file, self.extra_args = root, key_file, extra_args or []
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = root.parent / f"{root.name}-server.log"

    def start(self) -> CollectorProcess:
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyodlog_collector",
                "serve",
                "--root",
                str(self.root),
                "--api-key-file",
                str(self.key_file),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *self.extra_args,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.wait(10)
            raise RuntimeError(
                f"the collector did not start: {line!r}\n{self.log_path.read_text()}"
            )
        self.url = line.split("listening on ")[1].split()[0]
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def kill(self) -> None:
        """SIGKILL: no clean shutdown."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text()

    def segments(self, tenant: str, model: str, version: str, result: str) -> list[Path]:
        folder = self.root / tenant / model / version / result
        return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


class LoopbackServer:
    """A threaded HTTP/1.1 server on a free loopback port; each GET or PUT is answered by
    ``self.respond(handler, body) -> (status, [(header, value), ...], data)``."""

    def __init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                status, headers, data = server.respond(self, body)
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def respond(
        self, handler: BaseHTTPRequestHandler, body: bytes | None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        raise NotImplementedError

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FlakyProxy(LoopbackServer):
    """Forwards to the collector, but answers the first ``failures`` requests with ``status`` itself."""

    def __init__(
        self, upstream_port: int, failures: int, status: int = 503, retry_after: str | None = "0"
    ) -> None:
        self.failures_left = failures
        self.refused: list[str] = []
        self.upstream_port, self.status, self.retry_after = upstream_port, status, retry_after
        self.lock = threading.Lock()
        super().__init__()

    def respond(self, handler, body):
        with self.lock:
            fail = self.failures_left > 0
            self.failures_left -= fail
        if fail:
            self.refused.append(f"{handler.command} {handler.path}")
            retry = [] if self.retry_after is None else [("Retry-After", self.retry_after)]
            return self.status, retry, b'{"error": "unavailable"}'
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        headers = {
            k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")
        }
        upstream.request(handler.command, handler.path, body=body, headers=headers)
        answer = upstream.getresponse()
        data = answer.read()
        upstream.close()
        hop = ("content-length", "connection", "transfer-encoding", "server", "date")
        return answer.status, [(k, v) for k, v in answer.getheaders() if k.lower() not in hop], data


class FakeCollector(LoopbackServer):
    """Answers each request with ``answers(method, path, headers) -> (status, headers, body)``
    (``body``: bytes, or an object sent as JSON)."""

    def __init__(self, answers) -> None:
        self.answers = answers
        self.requests: list[str] = []
        super().__init__()

    def respond(self, handler, body):
        self.requests.append(f"{handler.command} {handler.path}")
        status, headers, answer = self.answers(handler.command, handler.path, dict(handler.headers))
        data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        return status, list(headers.items()), data


def put(
    url: str, key: str | None, data: bytes = b"", timeout: float = 30, **params
) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.put(url, data=data, params=params, headers=headers, timeout=timeout)


def get(url: str, key: str | None, **params) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.get(url, params=params, headers=headers, timeout=30)


def make_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1, made with the openssl command."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (
        folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    ext = folder / "server.ext"
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n"
    )
    run = lambda *args: subprocess.run(
        ["openssl", *map(str, args)], check=True, capture_output=True
    )
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        ca_key,
        "-out",
        ca,
        "-days",
        "2",
        "-subj",
        "/CN=pyodlog test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        key,
        "-out",
        csr,
        "-subj",
        "/CN=localhost",
    )
    run(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-out",
        cert,
        "-days",
        "2",
        "-extfile",
        ext,
    )
    return ca, cert, key


def start_tls_collector(folder: Path) -> tuple[CollectorProcess, Path]:
    """A collector serving HTTPS with a throwaway certificate (files under ``folder``), started;
    returns it and the CA that verifies it."""
    ca, cert, key = make_tls_files(folder / "tls")
    server = CollectorProcess(
        folder / "collector",
        write_keys(folder / "keys.txt"),
        ["--tls-cert", str(cert), "--tls-key", str(key)],
    ).start()
    return server, ca
