"""A small logged result with thumbnails, and `pyodlog view` on it as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from pyodlog.io.store import HDF5Store

REPO = Path(__file__).resolve().parents[2]


def scene(k: int, h: int = 120, w: int = 160) -> torch.Tensor:
    """A smooth background with a bright square somewhere (different per k)."""
    g = torch.Generator().manual_seed(k)
    image = torch.linspace(0, 0.6, w).expand(3, h, w).clone() * torch.rand(3, 1, 1, generator=g)
    y, x = 10 + (k * 17) % (h - 50), 10 + (k * 29) % (w - 50)
    image[:, y : y + 40, x : x + 40] = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.5
    return image


def log_small_result(
    root: Path,
    n_images: int = 8,
    thumbnails: bool = True,
    ids=None,
    result_name: str = "small",
    export_to: Path | None = None,
) -> Path:
    """Logs ``n_images`` scenes (half 'val', half 'deploying'; field ``camera``) with the README's TinyDetector.

    ``ids``: a function of the image number giving its input_id (default ``scenes/NNN.png``).
    Returns the result folder, or with ``export_to`` the ZIP exported into that folder.
    """
    ids_of = ids
    from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

    torch.manual_seed(0)
    model = TinyDetector().eval()
    with TinyDetectorLogger(
        model,
        "viewer-test",
        "v1",
        result_name=result_name,
        additional_fields=[{"name": "camera", "dtype": "str"}],
        sink=HDF5Store(root),
        log_images={"max_side": 128} if thumbnails else None,
    ) as logger:
        for start in range(0, n_images, 2):
            ids = [(ids_of or default_id)(k) for k in (start, start + 1)]
            logger(
                [scene(start), scene(start + 1)],
                input_ids=ids,
                dataset_type="val" if start < n_images // 2 else "deploying",
                camera=["cam-a", "cam-b"],
            )
        logger.wait_for_save()
        directory = logger.sink.directory  # type: ignore[attr-defined]
        if export_to is not None:
            return Path(logger.export(export_to))
    return Path(directory)


def default_id(k: int) -> str:
    return f"scenes/{k:03d}.png"


class ViewerProcess:
    """``pyodlog view PATH --port 0 ...`` as a subprocess; ``url`` once it listens (it prints it then)."""

    def __init__(self, path: Path, *extra: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pyodlog", "view", str(path), "--port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # printed once the socket listens
        if not line.startswith("pyodlog view: http://"):
            self.stop()
            raise RuntimeError(f"pyodlog view did not start: {line!r} {self.stderr()}")
        self.url = line.split()[-1]

    def stderr(self) -> str:
        if self.process.poll() is None:
            return ""
        assert self.process.stderr is not None
        return self.process.stderr.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> ViewerProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
