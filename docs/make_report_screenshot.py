"""Regenerates docs/images/report.png, the README's screenshot of `pyodlog report`.

Writes two synthetic results through the real HDF5 store (tests/helpers/synthetic_results.py; the
second with another class mix and embeddings moved), renders the report of the second against the
first, and photographs it with headless Chromium (Debian's `chromium`):

    PYTHONPATH=$PWD python docs/make_report_screenshot.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyodlog  # noqa: E402
from pyodlog.analysis.report import render_html  # noqa: E402
from tests.helpers.synthetic_results import write_synthetic_result  # noqa: E402

NAMES = ["person", "car", "bicycle", "dog", "bus", "truck"]
OUTPUT = ROOT / "docs" / "images" / "report.png"


def main(width: int = 1280, height: int = 2000) -> Path:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("needs headless Chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(
            model_name="shelf-detector",
            version_name="2024.06",
            class_names=NAMES,
            n_class=len(NAMES),
        )
        ref = write_synthetic_result(tmp, "week-1", 400, seed=1, **common)
        cur = write_synthetic_result(
            tmp,
            "week-2",
            400,
            seed=2,
            class_probs=[0.35, 0.3, 0.05, 0.1, 0.1, 0.1],
            embed_shift=0.25,
            **common,
        )
        page = Path(tmp) / "report.html"
        page.write_text(render_html(pyodlog.open_result(cur), against=pyodlog.open_result(ref)))
        OUTPUT.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--screenshot={OUTPUT}",
                f"--window-size={width},{height}",
                page.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    return OUTPUT


if __name__ == "__main__":
    print(main())
