"""`pyodlog view` in a real browser: headless Debian chromium driven by Selenium.

A small result is logged with thumbnails, `pyodlog view` runs as a subprocess on a free loopback
port, and the browser opens the gallery, applies a filter, opens an image page and the result page.
Every page must leave no error in the browser's console. `make test` installs chromium and
chromedriver (apt-get) when it can; where they are missing these tests are skipped with one line.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pyodlog
from tests.helpers.viewer_server import REPO, ViewerProcess, log_small_result

_spec = importlib.util.spec_from_file_location(
    "viewer_screenshots", REPO / "docs" / "viewer_screenshots.py"
)
assert _spec is not None and _spec.loader is not None
screenshots = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(screenshots)

if screenshots.find_chromium() is None:  # one line in the summary, for the whole module
    pytest.skip(
        "browser tests skipped: chromium and chromedriver are not installed and `make test` could "
        "not install them (needs root and apt-get: apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Path:
    return log_small_result(tmp_path_factory.mktemp("browser") / "home", n_images=8)


@pytest.fixture(scope="module")
def server(logged):
    with ViewerProcess(logged) as process:
        yield process


@pytest.fixture(scope="module")
def browser():
    driver = screenshots.headless_chromium()
    yield driver
    driver.quit()


def console_errors(driver) -> list[dict]:
    """The browser console's errors since the last call (the log is drained on read)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def wait_for_url(driver, pattern: str) -> str:
    """Waits (up to 30 s) until the browser navigated to a URL matching ``pattern`` (a regex)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: re.search(pattern, d.current_url))
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )
    return driver.current_url


def by_css(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def test_gallery_shows_one_tile_per_image_with_its_boxes_drawn(logged, server, browser):
    data = pyodlog.open_result(logged)
    console_errors(browser)
    browser.get(server.url)  # redirects to the one result's gallery
    assert browser.current_url.endswith("/r/0/")
    tiles = by_css(browser, "a.tile")
    assert len(tiles) == len(data) == 8
    for tile in tiles:
        row = int(tile.get_attribute("data-row"))
        drawn = tile.find_elements("css selector", "rect.box")
        expected = int((data.image_detections(row).scores >= 0.3).sum())  # the default draw score
        assert len(drawn) == expected
        assert all(r.is_displayed() for r in drawn)
        # The thumbnail behind the boxes was fetched and decoded by the browser.
        assert len(tile.find_elements("css selector", "image.pixels")) == 1
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter(e => e.name.includes('/pixels/')).length"
    )
    assert loaded == len(data)
    assert sum(len(t.find_elements("css selector", "rect.box")) for t in tiles) > 0
    assert console_errors(browser) == []


def test_a_filter_applied_in_the_form_narrows_the_gallery(logged, server, browser):
    from selenium.webdriver.support.ui import Select

    data = pyodlog.open_result(logged)
    browser.get(server.url + "r/0/")
    Select(by_css(browser, "#f-dataset")[0]).select_by_value("deploying")
    Select(by_css(browser, "#f-field-camera")[0]).select_by_value("cam-a")
    by_css(browser, "#apply")[0].click()
    wait_for_url(browser, r"dataset_type=deploying.*f\.camera=cam-a")
    types = np.asarray(data.images["dataset_type"])
    cameras = np.asarray(data.images["camera"])
    expected = np.flatnonzero((types == "deploying") & (cameras == "cam-a")).tolist()
    rows = [int(t.get_attribute("data-row")) for t in by_css(browser, "a.tile")]
    assert rows == expected and rows
    assert by_css(browser, "#n-match")[0].text == str(len(expected))
    assert console_errors(browser) == []


def test_image_page_table_is_what_open_result_reads_and_a_click_selects_the_row(
    logged, server, browser
):
    data = pyodlog.open_result(logged)
    counts = np.asarray(data.images["det_count"])
    row = int(np.argmax(counts))
    browser.get(server.url + "r/0/")
    by_css(browser, f"a.tile[data-row='{row}']")[0].click()
    wait_for_url(browser, rf"/r/0/image/{row}$")
    assert by_css(browser, "#input-id")[0].text == data.images["input_id"][row]
    expected = data.image_detections(row)
    table = by_css(browser, "#det-table tbody tr")
    assert len(table) == len(expected) == len(by_css(browser, "#big rect.det"))
    for k, tr in enumerate(table):
        cells = tr.find_elements("css selector", "td")
        assert float(cells[2].text) == pytest.approx(float(expected.scores[k]), abs=5e-5)
        assert int(cells[3].text) == int(expected.labels[k])
        box = [float(v) for v in cells[4].text.split(",")]
        assert box == pytest.approx(expected.boxes[k].tolist(), abs=0.051)
        # Top-5 from the logged logits: the first is the class of the largest logit.
        top = int(np.argmax(expected.logits[k].numpy()))
        assert cells[5].text.splitlines()[0].startswith(f"class {top} ")
    # Clicking a box highlights its row (and only its row).
    pick = len(table) - 1
    by_css(browser, f"#box-det-{pick}")[0].click()
    selected = by_css(browser, "#det-table tr.selected")
    assert [tr.get_attribute("id") for tr in selected] == [f"row-det-{pick}"]
    assert "selected" in by_css(browser, f"#box-det-{pick}")[0].get_attribute("class")
    assert console_errors(browser) == []


def test_result_page_counts_and_embedding_map_open_image_pages(logged, server, browser):
    data = pyodlog.open_result(logged)
    browser.get(server.url + "r/0/result")
    assert by_css(browser, "#n-detections")[0].text == str(len(data.detections["scores"]))
    counted = sum(
        int(tr.find_elements("css selector", "td")[1].text)
        for tr in by_css(browser, "tr.class-row")
    )
    assert counted == len(data.detections["scores"])
    assert len(by_css(browser, "#score-hist rect.bar")) == 20
    assert "embeddings" not in data.detections  # the TinyDetector logs none: no map, said so
    assert "No detection embeddings were logged" in browser.page_source
    assert console_errors(browser) == []


def test_embedding_map_points_open_their_image_page(tmp_path, browser):
    result = screenshots.scenes_result(tmp_path / "home", n_images=6)
    data = pyodlog.open_result(result)
    with ViewerProcess(result) as server:
        browser.get(server.url + "r/0/result")
        points = by_css(browser, "#embedding-map circle.pt")
        assert len(points) == len(data.detections["scores"])  # fewer than the map's sample limit
        owner = np.repeat(np.arange(len(data)), data.images["det_count"])
        href = points[-1].find_element("xpath", "..").get_dom_attribute("href")
        row = int(href.rsplit("/", 1)[1])
        assert row in owner.tolist()
        browser.execute_script(
            "arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", points[-1]
        )
        wait_for_url(browser, rf"/r/0/image/{row}$")
        assert by_css(browser, "#input-id")[0].text == data.images["input_id"][row]
        assert console_errors(browser) == []


def test_the_screenshot_script_makes_the_readme_pictures(tmp_path):
    result = screenshots.scenes_result(tmp_path / "home", n_images=6)
    made = screenshots.take_screenshots(result, tmp_path / "shots")
    assert [p.name for p in made] == ["viewer-gallery.png", "viewer-image.png"]
    for path in made:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] >= 1000
