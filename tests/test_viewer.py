"""`pyodlog view` over real HTTP (a real subprocess on loopback): filters, pixels, read-only, errors."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pyodlog
from pyodlog.viewer.app import Viewer, render_gallery, render_image
from pyodlog.viewer.data import Query, ViewerResult
from tests.helpers.viewer_server import REPO, ViewerProcess, log_small_result, scene


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("Content-Type", "")


def rows(url: str) -> list[int]:
    status, body, _ = get(url)
    assert status == 200, body
    return json.loads(body)["rows"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Path:
    return log_small_result(tmp_path_factory.mktemp("viewer") / "home")


@pytest.fixture(scope="module")
def server(logged):
    with ViewerProcess(logged) as process:
        yield process


def test_gallery_filters_and_sorts_are_the_columns(logged, server):
    data = pyodlog.open_result(logged)
    n = len(data)
    owner = np.repeat(np.arange(n), data.images["det_count"])
    scores, labels = data.detections["scores"], data.detections["labels"]
    api = server.url + "r/0/api/images?per_page=500"
    assert rows(api) == list(range(n))  # time order = row order here
    types = np.asarray(data.images["dataset_type"])
    assert rows(api + "&dataset_type=val") == np.flatnonzero(types == "val").tolist()
    label = int(np.bincount(labels).argmax())
    assert rows(api + f"&label={label}") == np.unique(owner[labels == label]).tolist()
    threshold = float(np.median(scores))
    expected = np.unique(owner[(scores >= threshold) & (labels == label)]).tolist()
    assert rows(api + f"&label={label}&score_min={threshold}") == expected
    cameras = np.asarray(data.images["camera"])
    assert rows(api + "&f.camera=cam-b") == np.flatnonzero(cameras == "cam-b").tolist()
    best = np.full(n, 0.0)
    np.maximum.at(best, owner, scores)
    assert rows(api + "&sort=score") == np.argsort(-best, kind="stable").tolist()
    assert rows(server.url + "r/0/api/images?per_page=3&page=1") == [3, 4, 5]
    status, body, _ = get(api + "&sort=nonsense")
    assert status == 400 and b"sort must be one of" in body


def test_gallery_tiles_draw_each_detection_above_the_draw_score(logged, server):
    data = pyodlog.open_result(logged)
    status, body, _ = get(server.url + "r/0/?draw=0.5")
    page = body.decode()
    assert status == 200
    tiles = re.findall(r"<a class='tile' href='/r/0/image/(\d+)'.*?</a>", page, re.S)
    assert len(tiles) == len(data)
    for tile in re.findall(r"<a class='tile'.*?</a>", page, re.S):
        row = int(re.search(r"data-row='(\d+)'", tile).group(1))
        drawn = tile.count("<rect class='box'")
        assert drawn == int((data.image_detections(row).scores >= 0.5).sum())
        assert f"href='/r/0/pixels/{row}'" in tile  # the logged thumbnail behind the boxes


def test_pixels_are_the_logged_thumbnail(logged, server):
    data = pyodlog.open_result(logged)
    status, body, kind = get(server.url + "r/0/pixels/1")
    assert (status, kind) == (200, "image/jpeg") and body == data.thumbnail(1)
    assert get(server.url + "r/0/pixels/999")[0] == 404


def test_without_thumbnails_images_come_from_images_root_else_a_blank_canvas(tmp_path):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)

    def ids(k: int) -> str:
        return "../outside.png" if k == 3 else f"scenes/{k:03d}.png"

    folder = log_small_result(tmp_path / "home", n_images=4, thumbnails=False, ids=ids)
    images_root = tmp_path / "images"
    (images_root / "scenes").mkdir(parents=True)
    for k in range(3):
        array = (scene(k).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(array).save(images_root / "scenes" / f"{k:03d}.png")
    with ViewerProcess(folder) as plain:
        page = get(plain.url + "r/0/")[1].decode()
        assert page.count("<rect class='blank'") == 4 and "<image" not in page
        assert get(plain.url + "r/0/pixels/0")[0] == 404
    with ViewerProcess(folder, "--images-root", str(images_root)) as rooted:
        page = get(rooted.url + "r/0/")[1].decode()
        assert page.count("<image class='pixels'") == 3 and page.count("<rect class='blank'") == 1
        status, body, kind = get(rooted.url + "r/0/pixels/2")
        assert status == 200 and kind == "image/png"
        assert body == (images_root / "scenes" / "002.png").read_bytes()
        # An input_id that leads out of --images-root is never served, even if the file exists.
        assert get(rooted.url + "r/0/pixels/3")[0] == 404


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_viewing_never_writes_into_the_result(tmp_path):
    folder = log_small_result(tmp_path / "home", n_images=4)
    before = _snapshot(folder)
    with ViewerProcess(folder) as server:
        for path in ("r/0/", "r/0/?sort=score", "r/0/image/1", "r/0/result", "r/0/pixels/0"):
            assert get(server.url + path)[0] == 200
    assert _snapshot(folder) == before


def test_a_pyodlog_home_lists_its_results_and_a_zip_opens(tmp_path):
    home = tmp_path / "home"
    log_small_result(home, n_images=2, result_name="first")
    log_small_result(home, n_images=4, result_name="second")
    with ViewerProcess(home) as server:
        status, body, _ = get(server.url)
        links = re.findall(r"<a class='result-link' href='(/r/\d+/)'>([^<]+)</a>", body.decode())
        assert status == 200
        assert [name for _, name in links] == ["viewer-test/v1/first", "viewer-test/v1/second"]
        second = get(server.url.rstrip("/") + links[1][0])[1].decode()
        assert second.count("<a class='tile'") == 4
    zip_path = log_small_result(tmp_path / "zipped", n_images=2, export_to=tmp_path / "out")
    assert zip_path.suffix == ".zip"
    with ViewerProcess(zip_path) as server:
        page = get(server.url + "r/0/")[1].decode()
        assert page.count("<a class='tile'") == 2 and page.count("<image class='pixels'") == 2


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pyodlog", "view", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )

    missing = run(str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run(str(tmp_path / "empty"))
    assert empty.returncode == 2 and "holds no pyodlog result" in empty.stderr
    folder = log_small_result(tmp_path / "home", n_images=2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = run(str(folder), "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 2 and "pass another --port" in busy.stderr


def test_near_misses_and_targets_of_the_contract_are_shown_and_filtered(logged):
    """Issue 14/15 columns (near_misses, targets) as their contract names them, on a real result."""
    data = pyodlog.open_result(logged)
    n = len(data)
    counts = np.asarray(data.images["det_count"])
    first = int(np.flatnonzero(counts > 0)[0])
    o = int(data.images["det_offset"][first])
    # One near-miss on image `first`, suppressed by its detection 0.
    data.near_misses = {  # type: ignore[attr-defined]
        "boxes": data.detections["boxes"][o : o + 1] + 1,
        "scores": data.detections["scores"][o : o + 1] * 0.5,
        "labels": data.detections["labels"][o : o + 1],
        "logits": data.detections["logits"][o : o + 1],
        "reason": np.array([2], np.uint8),
        "suppressed_by": np.array([0], np.int64),
        "suppressor_iou": np.array([0.8], np.float32),
    }
    nm_count = np.zeros(n, np.int64)
    nm_count[first] = 1
    data.images["nm_count"], data.images["nm_offset"] = nm_count, np.cumsum(nm_count) - nm_count
    # Ground truth: every image's first detection (score >= 0.5 ones match), image 0 also a miss.
    gt_count = np.minimum(counts, 1)
    gt_count[0] += 1
    offsets = np.asarray(data.images["det_offset"])
    boxes = [
        data.detections["boxes"][offsets[i] : offsets[i] + min(counts[i], 1)] for i in range(n)
    ]
    boxes[0] = np.concatenate([boxes[0], np.array([[0, 0, 3, 3]], np.float32)])
    labels = [
        data.detections["labels"][offsets[i] : offsets[i] + min(counts[i], 1)] for i in range(n)
    ]
    labels[0] = np.concatenate([labels[0], np.array([1])])
    data.targets = {"boxes": np.concatenate(boxes), "labels": np.concatenate(labels)}  # type: ignore[attr-defined]
    data.images["gt_count"], data.images["gt_offset"] = gt_count, np.cumsum(gt_count) - gt_count
    result = ViewerResult(data)
    assert result.select(Query(near_miss=True, per_page=100))[0].tolist() == [first]
    errors = result.select(Query(gt_error=True, per_page=100))[0].tolist()
    assert 0 in errors
    viewer = Viewer(logged)
    viewer._loaded[0] = result
    page = render_image(viewer, 0, first).body.decode()
    assert "<rect class='nm' id='box-nm-0'" in page
    assert "class='suppressor' href='#row-det-0' data-det='0'" in page and "suppressed" in page
    gallery = render_gallery(viewer, 0, {"near_miss": "1"}).body.decode()
    assert gallery.count("<a class='tile'") == 1 and "id='f-nm' checked" in gallery


def test_uncertainty_columns_filter_and_sort_the_gallery(logged):
    """Issue 14's `entropy` column (as its contract names it), on a real result."""
    data = pyodlog.open_result(logged)
    n_det = len(data.detections["scores"])
    entropy = np.linspace(0.0, 2.0, n_det, dtype=np.float32)[::-1].copy()
    data.detections["entropy"] = entropy
    result = ViewerResult(data)
    owner = np.repeat(np.arange(len(data)), data.images["det_count"])
    rows, total = result.select(Query(unc_min=1.5, per_page=100))
    assert rows.tolist() == np.unique(owner[entropy >= 1.5]).tolist() and total == len(rows)
    best = np.zeros(len(data))
    np.maximum.at(best, owner, entropy)
    ordered, _ = result.select(Query(sort="uncertainty", per_page=100))
    assert ordered.tolist() == np.argsort(-best, kind="stable").tolist()
    viewer = Viewer(logged)
    viewer._loaded[0] = result
    page = render_gallery(viewer, 0, {"sort": "uncertainty"}).body.decode()
    assert "id='f-unc-min'" in page and "<option value='uncertainty' selected>" in page
    image = render_image(viewer, 0, int(ordered[0])).body.decode()
    assert "<th>entropy</th>" in image


def test_top5_probabilities_follow_the_family_class_head(logged):
    data = pyodlog.open_result(logged)
    row = int(np.argmax(data.images["det_count"]))
    logits = data.image_detections(row).logits[0].double().numpy()
    top = np.argsort(-logits, kind="stable")[:5]
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    detail = ViewerResult(data).detail(row)  # the README's TinyDetector: softmax by default
    assert [k for k, _, _, _ in detail.detections[0]["top5"]] == top.tolist()
    assert [p for *_, p in detail.detections[0]["top5"]] == pytest.approx(softmax[top].tolist())
    data.manifest["schema"]["family"] = "RetinaNetLogger"  # per-class sigmoid heads
    detail = ViewerResult(data).detail(row)
    sigmoid = 1 / (1 + np.exp(-logits[top]))
    assert [p for *_, p in detail.detections[0]["top5"]] == pytest.approx(sigmoid.tolist())


def test_result_page_reports_a_slice_and_its_drift_against_another(logged, server):
    """The result page embeds the analysis report; `where=` / `against=` pick the slices (issue 16)."""
    data = pyodlog.open_result(logged)
    types = sorted(set(data.images["dataset_type"]))
    assert len(types) >= 2, types
    status, body, _ = get(server.url + "r/0/result")
    page = body.decode()
    assert status == 200 and "id='analysis-report'" in page and "id='drift-form'" in page
    query = f"r/0/result?where=dataset_type={types[1]}&against=dataset_type={types[0]}"
    status, body, _ = get(server.url + query)
    page = body.decode()
    assert status == 200 and "id='analysis-report'" in page and "report-error" not in page
    report = page[page.index("id='analysis-report'") :]
    # With a reference slice the report's drift section holds verdicts, not the "no reference" note.
    assert "no reference slice" not in report and "drift-form" not in report
    status, body, _ = get(server.url + "r/0/result")
    assert "no reference slice" in body.decode()
    assert f"value='dataset_type={types[1]}'" in page  # the form keeps the slice shown
    status, body, _ = get(server.url + "r/0/result?where=no_such_field=1")
    assert status == 200 and "id='report-error'" in body.decode()
