"""Running the viewer: a loopback socket, uvicorn, the URL printed once it listens."""

from __future__ import annotations

import ipaddress
import socket
import sys
import webbrowser
from pathlib import Path

__all__ = ["serve"]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(
    path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8765,
    open_browser: bool = False,
    images_root: str | Path | None = None,
) -> None:
    """Serves the viewer for ``path`` until interrupted; prints ``pyodlog view: http://HOST:PORT/``.

    Args:
        path: a result folder, an exported ZIP, or a PYODLOG_HOME (its results are listed).
        host: the address to listen on (loopback by default: the viewer has no authentication).
        port: the port; 0 picks a free one (the printed URL says which).
        open_browser: open the URL in the default browser once listening.
        images_root: a folder where ``input_id`` names image files (used when no thumbnail was logged).

    Raises:
        FileNotFoundError, ValueError: ``path`` holds no result.
        OSError: the address cannot be bound (e.g. the port is taken).
    """
    import uvicorn

    from pyodlog.viewer.app import create_app

    app = create_app(path, images_root)
    viewer = app.state.viewer
    if len(viewer.paths) == 1:
        viewer.result(0)  # read before the first request: the first page comes back at once
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port} ({error.strerror or error}): pass another --port "
            f"(0 picks a free one)"
        ) from error
    sock.listen(128)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/"
    if not _is_loopback(host):
        print(
            f"pyodlog view: listening on {host}, which is not a loopback address: anyone who can "
            "reach it can read the result (the viewer has no authentication)",
            file=sys.stderr,
        )
    print(f"pyodlog view: {url}", flush=True)
    if open_browser:
        webbrowser.open(url)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
