"""examples/serving end to end: uvicorn with two worker processes, each sharing one logger
between its threads, hit by concurrent HTTP clients; every answer is logged as answered."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fastapi  # noqa: F401 - the example's dependencies (requirements/pins.txt) must be there
import numpy as np
import requests
import torch
import uvicorn  # noqa: F401
from PIL import Image

from pyodlog import open_result

ROOT = Path(__file__).resolve().parent.parent
WORKERS, CLIENTS, REQUESTS = 2, 8, 10
SIZES = [(64, 64), (48, 80), (96, 72), (80, 56)]


def png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    h, w = SIZES[seed % len(SIZES)]
    pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG")
    return out.getvalue()


class Server:
    """uvicorn serving examples/serving/app.py on a loopback socket this test bound."""

    def __init__(self, home: Path) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))  # a free port, held by us: no race with other tests
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        env = dict(
            os.environ,
            PYODLOG_HOME=str(home),
            PYODLOG_SERVING_MODEL="tests.test_concurrency:small_faster_rcnn",
            PYODLOG_SERVING_SCORE_THRESH="0.002",
            PYODLOG_SERVING_THREADS="4",
            PYTHONPATH=str(ROOT),
            OMP_NUM_THREADS="1",
        )
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app:app",
                "--app-dir",
                str(ROOT / "examples" / "serving"),
                "--fd",
                str(self.sock.fileno()),
                "--workers",
                str(WORKERS),
                "--no-access-log",
            ],
            env=env,
            pass_fds=[self.sock.fileno()],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        started = 0
        for line in self.process.stderr:
            self.log.append(line)
            if "Application startup complete" in line:
                started += 1
                if started == WORKERS:  # every worker process has its logger
                    self.ready.set()
        self.ready.set()  # the server exited: stop waiting

    def stop(self) -> int:
        """SIGINT: uvicorn shuts down gracefully, each worker closes its logger."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(120)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.sock.close()
        self._reader.join(10)
        return code


def test_the_serving_example_answers_concurrent_clients_and_logs_every_answer(tmp_path):
    server = Server(tmp_path / "home")
    try:
        assert server.ready.wait(180) and server.process.poll() is None, "".join(server.log)

        def client(c: int) -> list[dict]:
            answers = []
            with requests.Session() as session:
                for k in range(REQUESTS):
                    seed = c * REQUESTS + k
                    response = session.post(
                        f"{server.url}/predict",
                        params={"input_id": f"req-{seed}"},
                        data=png(seed),
                        headers={"Content-Type": "image/png"},
                        timeout=120,
                    )
                    assert response.status_code == 200, response.text
                    answers.append(response.json())
            return answers

        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = [a for per_client in pool.map(client, range(CLIENTS)) for a in per_client]
        bad = requests.post(
            f"{server.url}/predict", params={"input_id": "bad"}, data=b"not an image", timeout=60
        )
        assert bad.status_code == 400 and "PNG or JPEG" in bad.json()["detail"]
    finally:
        code = server.stop()
    assert code == 0, "".join(server.log)

    want = {a["input_id"]: a for a in answers}
    assert len(want) == CLIENTS * REQUESTS
    assert sum(len(a["scores"]) for a in answers) > 100  # the comparison is not vacuous
    folder = tmp_path / "home" / "detector" / "v1" / "serving"
    result = open_result(folder)
    ids = result.images["input_id"]
    # Every answered request once; the bad one not at all.
    assert Counter(ids) == Counter(list(want))
    for row, input_id in enumerate(ids):
        got, answer = result.image_detections(row), want[input_id]
        assert torch.equal(got.boxes, torch.tensor(answer["boxes"]).reshape(-1, 4)), input_id
        assert torch.equal(got.scores, torch.tensor(answer["scores"])), input_id
        assert torch.equal(got.labels, torch.tensor(answer["labels"], dtype=torch.long)), input_id
