"""Makes the README's screenshots of `pyodlog view`: the gallery and an image page.

    .venv/bin/python docs/viewer_screenshots.py [RESULT] [--out docs/images]

RESULT: a result folder or ZIP to show (e.g. the demo's, after `make demo`). Without it, a small
result of generated scenes is written first (shapes on textured backgrounds, with detections
placed on the shapes and their JPEG thumbnails made by pyodlog's own thumbnail encoder), so the
pictures show boxes on objects without needing a trained model. Needs Debian's `chromium` and
`chromium-driver` (`make test` installs them); the browser tests run this too (into a temporary
folder) so that the script keeps working.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["background", "square", "disc", "bar"]


def find_chromium() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths, or None when either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def headless_chromium(width: int = 1360, height: int = 900):
    """A Selenium driver on Debian's headless chromium, logging the browser console."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise RuntimeError(
            "chromium and chromedriver are needed: apt-get install chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(found[1]))


def scenes_result(root: Path, n_images: int = 24) -> Path:
    """A result of generated scenes with boxes on the shapes (see the module docstring)."""
    import torch

    from pyodlog.io.export import write_tables
    from pyodlog.io.reader import Tables
    from pyodlog.io.segment import write_checksum
    from pyodlog.io.thumbnails import ThumbnailSource, ThumbnailSpec, encode_thumbnails

    rng = np.random.default_rng(7)
    h, w = 360, 480
    images, boxes, scores, labels, counts, logits, embeddings = [], [], [], [], [], [], []
    centres = rng.normal(size=(len(CLASSES), 32)) * 3
    for _ in range(n_images):
        ys, xs = np.mgrid[0:h, 0:w]
        texture = 0.35 + 0.1 * np.sin(xs / rng.uniform(5, 15)) * np.cos(ys / rng.uniform(5, 15))
        image = np.stack([texture * rng.uniform(0.6, 1.2) for _ in range(3)])
        n = int(rng.integers(1, 5))
        for _ in range(n):
            label = int(rng.integers(1, len(CLASSES)))
            size = int(rng.integers(40, 110))
            x0, y0 = int(rng.integers(0, w - size)), int(rng.integers(0, h - size))
            colour = rng.uniform(0.2, 1.0, 3)
            if label == 1:
                mask = (xs >= x0) & (xs < x0 + size) & (ys >= y0) & (ys < y0 + size)
                box = [x0, y0, x0 + size, y0 + size]
            elif label == 2:
                r = size / 2
                mask = (xs - x0 - r) ** 2 + (ys - y0 - r) ** 2 <= r * r
                box = [x0, y0, x0 + size, y0 + size]
            else:
                mask = (xs >= x0) & (xs < x0 + size) & (ys >= y0) & (ys < y0 + size // 3)
                box = [x0, y0, x0 + size, y0 + size // 3]
            image[:, mask] = colour[:, None]
            score = float(rng.uniform(0.55, 0.99))
            z = rng.normal(size=len(CLASSES)) * 0.5
            z[label] += 2 + 4 * score
            boxes.append(np.array(box, np.float32) + rng.normal(0, 2, 4).astype(np.float32))
            scores.append(score)
            labels.append(label)
            logits.append(z.astype(np.float32))
            embeddings.append((centres[label] + rng.normal(size=32)).astype(np.float32))
        counts.append(n)
        images.append(torch.from_numpy(image.astype(np.float32)).clamp(0, 1))
    spec = ThumbnailSpec(256, 85)
    jpegs = encode_thumbnails(ThumbnailSource(list(images), [None] * n_images, spec), n_images)
    count = np.asarray(counts, np.int64)
    n_det = int(count.sum())
    numeric = {
        "images/det_offset": np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64),
        "images/det_count": count,
        "images/n_epoch": np.zeros(n_images, np.int64),
        "images/timestamp": 1.8e9 + np.arange(n_images, dtype=np.float64),
        "images/image_size": np.tile(np.array([[h, w]], np.int32), (n_images, 1)),
        "detections/boxes": np.stack(boxes),
        "detections/scores": np.asarray(scores, np.float32),
        "detections/labels": np.asarray(labels, np.int64),
        "detections/candidate_index": np.arange(n_det, dtype=np.int64),
        "detections/logits": np.stack(logits),
        "detections/embeddings": np.stack(embeddings),
    }
    strings = {
        "images/input_id": [f"scenes/{k:04d}.png" for k in range(n_images)],
        "images/dataset_type": ["val" if k % 3 else "deploying" for k in range(n_images)],
        "images/thumbnail": jpegs,
    }
    result = root / "shapes" / "v1" / "scenes"
    result.mkdir(parents=True)
    path = result / "seg-00000000000000000001-r0-p0-docs-000001.h5"
    write_tables(path, Tables(numeric, strings), {"model_name": "shapes"})  # type: ignore[arg-type]
    write_checksum(path)
    schema = {"n_class": len(CLASSES), "class_names": CLASSES, "additional_fields": []}
    manifest = {
        "schema": schema,
        "model_name": "shapes",
        "version_name": "v1",
        "result_name": "scenes",
    }
    (result / "result.json").write_text(json.dumps(manifest, indent=2))
    return result


def take_screenshots(result: Path, out: Path) -> list[Path]:
    """Starts `pyodlog view RESULT`, saves viewer-gallery.png and viewer-image.png under ``out``."""
    from selenium.webdriver.common.by import By

    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    server = subprocess.Popen(
        [sys.executable, "-m", "pyodlog", "view", str(result), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    driver = None
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split()[-1]
        driver = headless_chromium()
        driver.get(url + "r/0/?per_page=12")
        gallery = out / "viewer-gallery.png"
        driver.save_screenshot(str(gallery))
        busiest = max(
            driver.find_elements(By.CSS_SELECTOR, "a.tile"),
            key=lambda tile: len(tile.find_elements(By.CSS_SELECTOR, "rect.box")),
        )
        driver.get(busiest.get_attribute("href"))
        driver.find_element(By.CSS_SELECTOR, "rect.det").click()
        driver.execute_script("window.scrollTo(0, 0)")
        image = out / "viewer-image.png"
        driver.save_screenshot(str(image))
        return [gallery, image]
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "result", nargs="?", type=Path, help="a result folder or ZIP (default: generated scenes)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = args.result or scenes_result(Path(tmp))
        for path in take_screenshots(result, args.out):
            print(path)


if __name__ == "__main__":
    main()
