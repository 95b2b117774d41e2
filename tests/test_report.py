"""pyodlog report / pyodlog.analysis.report: the HTML report and its numbers, on logged results."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import pyodlog
from pyodlog.analysis import compare
from pyodlog.analysis.report import analyse, html_page, render_html, report_numbers
from pyodlog.analysis.slices import parse_where
from tests.helpers import child_env
from tests.helpers.synthetic_results import write_synthetic_result
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

SECTIONS = [
    "overview",
    "drift",
    "evaluation",
    "scores",
    "uncertainty",
    "classes",
    "worst-errors",
    "most-uncertain",
]


def pyodlog_command(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyodlog", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env(),
        check=False,
        cwd=cwd,
    )


class Page(HTMLParser):
    """What the report's HTML holds: section ids, image sources, text, and whether tags balance."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self.open: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.ids.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("link", "script") or "href" in attrs:
            self.links.append(tag)
        if tag not in ("img", "meta", "br"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, (tag, self.open[-5:])
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)


def check_page(text: str) -> Page:
    page = Page(text)
    assert page.open == []  # every tag closed, in order
    assert page.ids == SECTIONS
    assert page.images and all(s.startswith("data:image/png;base64,") for s in page.images)
    assert page.links == []  # nothing to fetch: no scripts, stylesheets or links
    return page


@pytest.fixture
def logged(tmp_path):
    """A real logger's result folder and its exported ZIP."""
    with TinyDetectorLogger(
        TinyDetector().eval(), "tiny", "v1", sink=pyodlog.HDF5Store(tmp_path / "home")
    ) as logger:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for call in range(3):
                logger(
                    [torch.rand(3, 64, 80, generator=g) for _ in range(4)],
                    input_ids=[f"cam{call}/{i}.jpg" for i in range(4)],
                )
        zip_path = logger.export(tmp_path / "out.zip")
        folder = logger.sink.directory
    return folder, zip_path


@pytest.mark.parametrize("which", ["folder", "zip"])
def test_the_command_writes_a_self_contained_report_of_a_logged_result(logged, tmp_path, which):
    path = logged[0] if which == "folder" else logged[1]
    out = tmp_path / "report.html"
    done = pyodlog_command("report", str(path), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    page = check_page(out.read_text())
    data = pyodlog.open_result(path)
    numbers = report_numbers(data)
    text = " ".join(page.text)
    n_det = int(data.images["det_count"].sum())
    assert numbers["overview"]["images"] == 12 and numbers["overview"]["detections"] == n_det > 0
    assert f"{n_det:,}" in text and "12" in text
    assert "tiny / v1" in text
    assert numbers["most_uncertain"]["by"] == "entropy"
    top = numbers["most_uncertain"]["detections"][0]
    assert top["input_id"] in text and top["input_id"].startswith("cam")
    for c in numbers["classes"]:
        assert f"{c['detections']:,}" in text


def test_json_prints_the_numbers_of_the_python_api(logged):
    folder, zip_path = logged
    for path in (folder, zip_path):
        done = pyodlog_command("report", str(path), "--json")
        assert done.returncode == 0, done.stderr
        printed = json.loads(done.stdout)
        assert printed == json.loads(json.dumps(report_numbers(pyodlog.open_result(path))))
        assert printed["overview"]["images"] == 12


@pytest.fixture(scope="module")
def drifted(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_results")
    names = ["cat", "dog", "car", "bus", "person"]
    ref = write_synthetic_result(root, "week1", 200, seed=1, class_names=names)
    cur = write_synthetic_result(
        root, "week2", 200, seed=2, class_names=names, class_probs=[0.4, 0.3, 0.1, 0.1, 0.1]
    )
    return ref, cur


def test_against_adds_the_drift_verdicts_of_compare(drifted, tmp_path):
    ref, cur = drifted
    out = tmp_path / "drift.html"
    done = pyodlog_command("report", str(cur), "--against", str(ref), "--json", "--out", str(out))
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    want = compare(pyodlog.open_result(ref), pyodlog.open_result(cur)).to_dict()
    assert printed["drift"]["signals"] == json.loads(json.dumps(want))
    assert printed["drift"]["drifted"] == ["class_frequency"]
    assert printed["drift"]["reference"]["source"] == str(ref)
    page = check_page(out.read_text())
    text = " ".join(page.text)
    assert "1 of" in text and "class_frequency" in text and "score[cat]" in text
    # One plot per overall signal and per drifted per-class one, beside the report's own.
    assert sum(1 for s in want if "[" not in s) <= len(page.images)


def test_render_html_and_report_numbers_agree(drifted):
    ref, cur = (pyodlog.open_result(p) for p in drifted)
    numbers, drift = analyse(cur, ref)
    assert numbers == report_numbers(cur, ref)
    assert render_html(cur, against=ref) == html_page(numbers, drift)
    assert [c["name"] for c in numbers["classes"]] == ["cat", "dog", "car", "bus", "person"]


def test_where_slices_or_says_it_cannot(drifted):
    _, cur = drifted
    done = pyodlog_command("report", str(cur), "--json", "--where", "dataset_type=deploying")
    data = pyodlog.open_result(cur)
    if hasattr(data, "where"):
        assert done.returncode == 0, done.stderr
        want = report_numbers(data.where(dataset_type="deploying"))
        assert json.loads(done.stdout)["overview"] == json.loads(json.dumps(want))["overview"]
    else:
        assert done.returncode == 2
        assert done.stderr.startswith("pyodlog report: --where needs ResultData.where")
        assert "Traceback" not in done.stderr


def test_where_values_are_typed():
    assert parse_where(["n_epoch=3", "dataset_type=deploying", "gain=1.5", "ok=true"]) == {
        "n_epoch": 3,
        "dataset_type": "deploying",
        "gain": 1.5,
        "ok": True,
    }
    assert parse_where(["camera='7'", "n_epoch=1", "n_epoch=2", "x=none"]) == {
        "camera": "7",
        "n_epoch": [1, 2],
        "x": None,
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_where(["dataset_type"])


def test_bad_input_is_refused_with_a_clear_message(tmp_path):
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    for args in (
        ("report", str(tmp_path / "missing")),
        ("report", str(tmp_path / "junk.zip")),
        ("report", str(tmp_path), "--where", "nokey"),
    ):
        done = pyodlog_command(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("pyodlog report: ") and "Traceback" not in done.stderr


def test_an_evaluation_is_rendered_with_its_tables_matrix_and_worst_errors(drifted):
    # The evaluation section shows whatever evaluate(data).to_dict() returns: metrics, per-class
    # table, confusion matrix (background row/column) and the error lists by input_id.
    numbers, _ = analyse(pyodlog.open_result(drifted[1]))
    numbers["evaluation"] = {
        "map": 0.5,
        "map_50": 0.75,
        "map_75": 0.25,
        "per_class": {"cat": {"ap": 0.6, "recall": 0.7}, "dog": {"ap": 0.4, "recall": 0.5}},
        "confusion_matrix": {
            "labels": ["cat", "dog", "background"],
            "matrix": [[5, 1, 2], [0, 4, 1], [3, 2, 0]],
        },
        "worst_errors": {
            "false_positives": [{"input_id": "week2/s2/0000007.jpg", "score": 0.93}],
            "missed": [{"input_id": "week2/s2/0000011.jpg", "label": "dog"}],
        },
    }
    page = check_page(html_page(numbers))
    text = " ".join(page.text)
    assert "map_50" in text and "0.75" in text and "recall" in text
    assert "week2/s2/0000007.jpg" in text and "week2/s2/0000011.jpg" in text
    assert "false_positives" in text and "Confusion matrix" in text


def test_the_readme_analysis_example_runs(isolated_data_root, tmp_path, monkeypatch):
    from tests.helpers.readme_blocks import block_starting_with

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block_starting_with("# analyse"), "README.md:analyse", "exec"), namespace)
    drift, signals = namespace["drift"], namespace["signals"]
    assert signals == drift.to_dict() and "embedding" in signals  # Faster R-CNN logs embeddings
    assert {"class_frequency", "score", "box_size", "detections_per_image"} <= set(signals)
    assert all(s["drift"] == (name in drift.drifted) for name, s in signals.items())
    page = check_page((tmp_path / "report.html").read_text())
    assert "shelf-detector / 2024.06 / week-2" in " ".join(page.text)
    assert len(list((tmp_path / "exports").glob("*.zip"))) == 2


def test_sampled_images_are_counted_with_their_weight(drifted):
    data = pyodlog.open_result(drifted[0])
    plain = report_numbers(data)
    assert "weighted" not in plain["overview"]
    data.images["sample_weight"] = np.full(len(data), 4.0, np.float32)  # each logged image: 4 seen
    numbers = report_numbers(data)
    assert numbers["overview"]["weighted"] == {
        "images": 4.0 * len(data),
        "detections": 4.0 * numbers["overview"]["detections"],
    }
    for c in numbers["classes"]:
        assert c["weighted_detections"] == 4.0 * c["detections"]
    assert "weighted by sample_weight" in " ".join(check_page(html_page(numbers)).text)
