"""The collector's commands (``pyodlog serve|list|keygen``, or ``python -m pyodlog_collector …``).

    pyodlog serve (--root DIR | --storage DIR|s3://bucket/prefix) --api-key-file FILE [--host 127.0.0.1] [--port 8750] [--tls-cert PEM --tls-key PEM]
                  [--request-timeout 300] [--max-connections 1024] [--staging-ttl 24h]
    pyodlog list --root DIR [--tenant NAME]
    pyodlog keygen FILE [--tenant NAME]

They never import torch or pyodlog: the collector starts in well under a
second (h5py is imported on the first complete upload, to check the segment).
``pyodlog export`` (a result the collector holds, as a ZIP) belongs to the
library's command line (:mod:`pyodlog.cli`): it reads the segments with
pyodlog's own reader, which checks each one before reading any data.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from pyodlog_collector.keys import ApiKeys, KeyFileError, generate_key, write_key_file
from pyodlog_protocol import NAME_RULE, is_loopback_host, is_valid_name

__all__ = ["main"]

DEFAULT_PORT = 8750


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    factor = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size such as 1048576, 64M or 8G"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a size must be positive")
    return value


def _seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    factor = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = float(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration such as 30, 30s, 10m, 24h or 7d"
        ) from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("a duration must be positive")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _name(text: str) -> str:
    if not is_valid_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} must be {NAME_RULE}")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyodlog", description="pyodlog's reference collector and tools."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the collector (HTTP)")
    serve.add_argument(
        "--root", type=Path, help="folder where uploaded segments are stored (or --storage)"
    )
    serve.add_argument(
        "--storage",
        help="where segments are stored: a folder (like --root) or s3://bucket/prefix, an "
        "S3-compatible object store (credentials from the AWS chain, AWS_ENDPOINT_URL for a store "
        "that is not AWS); with s3:// the collector keeps no state of its own, so several can "
        "serve one fleet",
    )
    serve.add_argument(
        "--api-key-file",
        required=True,
        type=Path,
        help="file with one 'TENANT:KEY' (or a bare 'KEY') per line",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    serve.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port (default {DEFAULT_PORT}; 0: any free port)",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=_size,
        default=64 << 20,
        help="largest request body (default 64M)",
    )
    serve.add_argument(
        "--max-segment-bytes", type=_size, default=8 << 30, help="largest segment (default 8G)"
    )
    serve.add_argument(
        "--tls-cert", type=Path, help="PEM certificate chain: serve HTTPS (with --tls-key)"
    )
    serve.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    serve.add_argument(
        "--request-timeout",
        type=_seconds,
        default=300.0,
        help="seconds from a request's first byte until all of it arrived (default 300; "
        "slower requests are answered 408 and closed)",
    )
    serve.add_argument(
        "--max-connections",
        type=_positive_int,
        default=1024,
        help="connections served at once (default 1024); more are answered 503 and closed",
    )
    serve.add_argument(
        "--staging-ttl",
        type=_seconds,
        default=86400.0,
        help="remove staged (incomplete) uploads untouched for this long (default 24h)",
    )
    serve.add_argument(
        "--quiet", action="store_true", help="log warnings and errors only, not every request"
    )
    lister = sub.add_parser("list", help="list the results a collector root holds")
    lister.add_argument("--root", required=True, type=Path)
    lister.add_argument("--tenant", type=_name, help="only this tenant")
    keygen = sub.add_parser(
        "keygen", help="append a new random API key to a key file (created 0600)"
    )
    keygen.add_argument("file", type=Path)
    keygen.add_argument("--tenant", type=_name, default="default")
    return parser


def _serve(args) -> int:
    from pyodlog_collector.http import make_server

    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if (args.root is None) == (args.storage is None):
        print(
            "pyodlog serve: pass one of --root DIR or --storage DIR|s3://bucket/prefix",
            file=sys.stderr,
        )
        return 2
    storage_arg = args.storage if args.storage is not None else args.root
    if isinstance(storage_arg, str) and storage_arg.startswith("s3://"):
        from pyodlog_protocol.layout import parse_s3_url

        try:
            parse_s3_url(storage_arg)
        except ValueError as error:
            print(f"pyodlog serve: --storage {error}", file=sys.stderr)
            return 2
        if importlib.machinery.PathFinder.find_spec("boto3") is None:
            print("pyodlog serve: --storage s3:// needs boto3: pip install boto3", file=sys.stderr)
            return 2
    elif isinstance(storage_arg, str):
        storage_arg = Path(storage_arg)
    try:
        keys = ApiKeys.from_file(args.api_key_file)
    except KeyFileError as error:
        print(f"pyodlog serve: {error}", file=sys.stderr)
        return 2
    if importlib.machinery.PathFinder.find_spec("h5py") is None:
        print(
            "pyodlog serve: h5py is not installed; the collector needs it to check uploaded "
            "segments: pip install h5py",
            file=sys.stderr,
        )
        return 2
    tls = None
    if (args.tls_cert is None) != (args.tls_key is None):
        print("pyodlog serve: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.tls_cert is not None:
        from pyodlog_collector.http import tls_context

        try:
            tls = tls_context(str(args.tls_cert), str(args.tls_key))
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            print(
                f"pyodlog serve: cannot load the TLS certificate or key: {error}", file=sys.stderr
            )
            return 2
    try:
        server = make_server(
            storage_arg,
            keys,
            args.host,
            args.port,
            args.max_request_bytes,
            args.max_segment_bytes,
            tls,
            request_timeout=args.request_timeout,
            max_connections=args.max_connections,
            staging_ttl=args.staging_ttl,
        )
    except OSError as error:
        if str(error).startswith("cannot use s3://"):  # the object store's check (no secret in it)
            print(f"pyodlog serve: {error}", file=sys.stderr)
            return 2
        print(
            f"pyodlog serve: cannot listen on {args.host}:{args.port}: {error.strerror or error}",
            file=sys.stderr,
        )
        return 2
    if tls is None and not is_loopback_host(args.host):
        logging.getLogger("pyodlog.collector").warning(
            "serving plain HTTP on %s: API keys and data cross the network unencrypted; pass --tls-cert/--tls-key "
            "or put a TLS-terminating proxy in front",
            args.host,
        )
    # SIGTERM stops the server the way Ctrl-C does; shutdown() must come from another thread.
    signal.signal(
        signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start()
    )
    # Counts only: a tenant name read from the key file could be the start of a bare key with a ':'.
    print(
        f"pyodlog collector listening on {server.url} (root {server.storage.root}, {len(keys)} key(s), "
        f"{len(keys.tenants)} tenant(s))",
        flush=True,
    )
    try:
        # The poll interval is how long a SIGTERM (shutdown()) waits for the loop to notice it.
        server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _list(args) -> int:
    from pyodlog_collector.storage import CollectorStorage

    if not args.root.is_dir():
        print(f"pyodlog list: {args.root} is not a folder", file=sys.stderr)
        return 2
    storage = CollectorStorage(args.root)
    rows = [
        dict(tenant=t, **r)
        for t in storage.tenants()
        if args.tenant in (None, t)
        for r in storage.list_results(t)
    ]
    print(json.dumps(rows, indent=2))
    return 0


def _keygen(args) -> int:
    lines = args.file.read_text().splitlines() if args.file.exists() else []
    lines.append(f"{args.tenant}:{generate_key()}")
    write_key_file(args.file, lines)
    print(
        f"added a key for tenant {args.tenant!r} to {args.file} (the key is in the file, not printed)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return {"serve": _serve, "list": _list, "keygen": _keygen}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
