"""How fast `pyodlog view` answers on a large result: the first gallery page, a filtered and a sorted one.

Writes a synthetic closed segment (N detections over N/50 images, 11 classes, 16-d embeddings,
entropy) with the store's own writer of closed files, starts `pyodlog view` on it as a subprocess
and times HTTP requests over loopback (the server reads the result before it prints its URL).

Usage: .venv/bin/python -m benchmarks.viewer_first_page [N_DETECTIONS]   (default 1,000,000)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.environment import print_header
from pyodlog.io.export import write_tables
from pyodlog.io.reader import Tables
from pyodlog.io.segment import write_checksum


def synthetic_result(folder: Path, n_det: int, per_image: int = 50, n_class: int = 11) -> Path:
    rng = np.random.default_rng(0)
    n_img = n_det // per_image
    counts = np.full(n_img, per_image, np.int64)
    xy = rng.uniform(0, 400, (n_det, 2)).astype(np.float32)
    wh = rng.uniform(10, 200, (n_det, 2)).astype(np.float32)
    numeric = {
        "images/det_offset": np.arange(n_img, dtype=np.int64) * per_image,
        "images/det_count": counts,
        "images/n_epoch": np.zeros(n_img, np.int64),
        "images/timestamp": np.arange(n_img, dtype=np.float64),
        "images/image_size": np.tile(np.array([[480, 640]], np.int32), (n_img, 1)),
        "detections/boxes": np.concatenate([xy, xy + wh], 1),
        "detections/scores": rng.uniform(0, 1, n_det).astype(np.float32),
        "detections/labels": rng.integers(1, n_class, n_det),
        "detections/candidate_index": np.arange(n_det, dtype=np.int64),
        "detections/logits": rng.normal(size=(n_det, n_class)).astype(np.float32),
        "detections/embeddings": rng.normal(size=(n_det, 16)).astype(np.float32),
    }
    strings = {
        "images/input_id": [f"cam/{i:07d}.jpg" for i in range(n_img)],
        "images/dataset_type": ["val" if i % 2 else "deploying" for i in range(n_img)],
    }
    result = folder / "bench" / "v1" / "large"
    result.mkdir(parents=True)
    path = result / "seg-00000000000000000001-r0-p0-bench-000001.h5"
    write_tables(path, Tables(numeric, strings), {"model_name": "bench"})
    write_checksum(path)
    return result


def get(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        response.read()
    return time.perf_counter() - start


def main(n_det: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="pyodlog-viewer-bench-"))
    result = synthetic_result(folder, n_det)
    start = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "pyodlog", "view", str(result), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        ready = time.perf_counter() - start
        url = line.split()[-1]
        first = get(url + "r/0/")
        print(f"{n_det:,} detections, {n_det // 50:,} images")
        print(f"  server start incl. reading the result: {ready:.2f} s")
        print(f"  first gallery page:                    {first * 1000:.0f} ms")
        for name, query in [
            ("class filter + score >= 0.9", "?label=3&score_min=0.9"),
            ("sorted by score, page 10", "?sort=score&page=10"),
            ("dataset_type=val, sorted by time", "?dataset_type=val"),
        ]:
            times = sorted(get(url + "r/0/" + query) for _ in range(3))
            print(f"  {name:<38} {times[1] * 1000:.0f} ms (median of 3)")
        print(
            f"  image page:                            {get(url + 'r/0/image/12345') * 1000:.0f} ms"
        )
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    print_header("benchmarks.viewer_first_page")
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
