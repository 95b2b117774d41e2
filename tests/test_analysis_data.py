"""Slices (``where``), several results as one (``open_results``), chunked streaming
(``iter_chunks``, ``LazyResults``) and interop (Arrow, Parquet read by DuckDB, pandas, COCO JSON)
on results logged through the real store (issue 15)."""

from __future__ import annotations

import contextlib
import io
import json

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import pyodlog
from pyodlog import HDF5Store
from pyodlog.analysis import evaluate
from pyodlog.io.export import export_zip
from tests.helpers.replay_detector import detections, log_calls, targets
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger

NAMES = ["background", "cat", "dog", "bird"]


def _calls(n=9, seed=0, prefix="img"):
    rng = np.random.default_rng(seed)
    calls = []
    for i in range(n):
        k = int(rng.integers(0, 4))
        xy = rng.uniform(0, 300, (k, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 100, (k, 2))], 1)
        labels = rng.integers(1, 4, k)
        calls.append(
            {
                "outputs": [detections(boxes, rng.uniform(0.1, 1, k), labels)],
                "targets": [targets(boxes + 2, labels)],
                "input_ids": [f"{prefix}-{i}"],
                "dataset_type": "val" if i % 3 else "train",
                "fields": {"camera": f"cam{i % 2}"},
            }
        )
    return calls


@pytest.fixture
def logged(tmp_path):
    return pyodlog.open_result(log_calls(tmp_path / "a", _calls(), class_names=NAMES))


# -- slices ------------------------------------------------------------------------------------


def test_where_selects_images_and_their_rows(logged):
    view = logged.where(dataset_type="val", camera="cam1")
    rows = [
        i
        for i in range(len(logged))
        if logged.images["dataset_type"][i] == "val" and logged.images["camera"][i] == "cam1"
    ]
    assert rows and len(view) == len(rows)
    assert isinstance(view, pyodlog.ResultData)
    assert view.images["input_id"] == [logged.images["input_id"][i] for i in rows]
    det_rows = np.concatenate(
        [
            np.arange(o, o + c)
            for o, c in zip(logged.images["det_offset"][rows], logged.images["det_count"][rows])
        ]
    )
    for name in logged.detections:
        np.testing.assert_array_equal(view.detections[name], logged.detections[name][det_rows])
    for j, i in enumerate(rows):
        mine, base = view.image_detections(j), logged.image_detections(i)
        assert torch.equal(mine.boxes, base.boxes) and torch.equal(mine.logits, base.logits)
        assert torch.equal(view.image_targets(j)["boxes"], logged.image_targets(i)["boxes"])
        # the view's own offsets point into its own columns
        o, c = int(view.images["det_offset"][j]), int(view.images["det_count"][j])
        np.testing.assert_array_equal(view.detections["scores"][o : o + c], base.scores.numpy())
        o, c = int(view.images["gt_offset"][j]), int(view.images["gt_count"][j])
        np.testing.assert_array_equal(view.targets["labels"][o : o + c], base_labels(logged, i))
    assert view.class_names == NAMES


def base_labels(data, i):
    return data.image_targets(i)["labels"].numpy()


def test_where_takes_lists_callables_prefixes_and_chains(logged):
    assert len(logged.where(dataset_type=["val", "train"])) == len(logged)
    assert logged.where(input_id_prefix="img-1").images["input_id"] == ["img-1"]
    assert len(logged.where(n_epoch=0)) == len(logged)
    assert len(logged.where(n_epoch=[5, 6])) == 0
    early = logged.where(timestamp=lambda t: t <= np.sort(t)[2])
    assert len(early) == 3
    chained = logged.where(dataset_type="val").where(camera="cam0")
    direct = logged.where(dataset_type="val", camera="cam0")
    assert chained.images["input_id"] == direct.images["input_id"]
    with pytest.raises(KeyError, match="no such image column"):
        logged.where(colour="red")


def test_a_view_copies_no_column_until_read(logged):
    view = logged.where(dataset_type="val")
    assert dict(view.detections._cache) == {} and dict(view.images._cache) == {}
    view.detections["scores"]
    assert set(view.detections._cache) == {"scores"}  # logits, embeddings: still not gathered


def test_a_view_reads_features(tmp_path):
    torch.manual_seed(0)
    logger = TinyDetectorLogger(
        TinyDetector().eval(),
        "tiny",
        "v1",
        sink=HDF5Store(tmp_path / "d"),
        target_layers={"b": "backbone"},
    )
    with torch.no_grad():
        logger([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], input_ids=["x", "y"])
    logger.close()
    data = pyodlog.open_result(logger.sink.directory)
    view = data.where(input_id_prefix="y")
    assert torch.equal(view.feature(0, "b"), data.feature(1, "b"))
    assert view.feature_names() == data.feature_names()


def test_iter_chunks_cover_the_rows_in_order(logged, capsys):
    chunks = list(logged.iter_chunks(rows=4))
    assert [len(c) for c in chunks] == [4, 4, 1]
    assert [i for c in chunks for i in c.images["input_id"]] == logged.images["input_id"]
    np.testing.assert_array_equal(
        np.concatenate([c.detections["logits"] for c in chunks]), logged.detections["logits"]
    )
    list(logged.iter_chunks(rows=4, progress=True))
    assert "9/9" in capsys.readouterr().err  # the tqdm bar
    with pytest.raises(ValueError, match="rows must be an int"):
        list(logged.iter_chunks(rows=0))


def test_open_results_labels_each_row_with_its_source(tmp_path):
    a = log_calls(tmp_path / "a", _calls(4, 1, "a"), class_names=NAMES, version="v1")
    b = log_calls(tmp_path / "b", _calls(3, 2, "b"), class_names=NAMES, version="v2")
    both = pyodlog.open_results([a, b])
    assert len(both) == 7
    assert both.images["version_name"] == ["v1"] * 4 + ["v2"] * 3
    assert both.images["source"] == [str(a)] * 4 + [str(b)] * 3
    v2 = both.where(version_name="v2")
    assert v2.images["input_id"] == ["b-0", "b-1", "b-2"]
    assert torch.equal(
        v2.image_detections(1).boxes, pyodlog.open_result(b).image_detections(1).boxes
    )
    assert evaluate(v2).n_images == 3
    manifest = json.loads((a / "result.json").read_text())
    zip_path = export_zip(sorted(a.glob("*.h5")), tmp_path / "a.zip", None, manifest)
    mixed = pyodlog.open_results([zip_path, b])
    assert mixed.images["source"] == [str(zip_path)] * 4 + [str(b)] * 3
    assert mixed.images["version_name"] == ["v1"] * 4 + ["v2"] * 3
    assert mixed.class_names == NAMES


def test_lazy_results_read_one_segment_at_a_time(tmp_path):
    folder = log_calls(tmp_path / "a", _calls(9), class_names=NAMES, rotate_every=3)
    lazy = pyodlog.open_results(folder, lazy=True)
    chunks = list(lazy.iter_chunks(rows=100))
    # One segment file (3 images) read per step, never the whole result.
    assert [len(c) for c in chunks] == [3, 3, 3]
    assert all(len(c._parts[0][0]) == 3 for c in chunks)
    whole = pyodlog.open_result(folder)
    assert [i for c in chunks for i in c.images["input_id"]] == whole.images["input_id"]
    assert lazy.class_names == NAMES
    val = lazy.where(dataset_type="val")
    assert [i for c in val.iter_chunks() for i in c.images["input_id"]] == whole.where(
        dataset_type="val"
    ).images["input_id"]
    assert val.load().images["input_id"] == whole.where(dataset_type="val").images["input_id"]


# -- interop -----------------------------------------------------------------------------------


def test_to_arrow_gives_images_and_detections_joined_by_image_row(logged):
    tables = logged.to_arrow()
    images, dets = tables["images"], tables["detections"]
    assert images.num_rows == len(logged) and dets.num_rows == len(logged.detections["scores"])
    assert dets.schema.field("logits").type == pa.list_(pa.float32(), 4)
    assert pa.types.is_fixed_size_list(dets.schema.field("embedding").type)
    np.testing.assert_array_equal(
        np.stack(dets.column("logits").to_numpy(zero_copy_only=False)), logged.detections["logits"]
    )
    assert dets.column("class_name").to_pylist() == [NAMES[v] for v in logged.detections["labels"]]
    assert json.loads(dets.schema.metadata[b"pyodlog"])["class_names"] == NAMES
    assert tables["targets"].num_rows == len(logged.targets["labels"])
    frames = logged.to_pandas()
    assert list(frames["detections"]["score"]) == pytest.approx(
        logged.detections["scores"].tolist()
    )
    assert list(frames["images"]["input_id"]) == logged.images["input_id"]


def test_duckdb_reads_the_parquet_and_counts_as_pyodlog(logged, tmp_path):
    paths = logged.to_parquet(tmp_path / "pq", rows=4)  # written in three chunks
    con = duckdb.connect()
    per_class = dict(
        con.execute(
            f"select class_name, count(*) from read_parquet('{paths['detections']}') group by 1"
        ).fetchall()
    )
    labels, counts = np.unique(logged.detections["labels"], return_counts=True)
    assert per_class == {NAMES[k]: int(n) for k, n in zip(labels, counts)}
    joined = con.execute(
        f"select i.input_id, count(d.score) from read_parquet('{paths['images']}') i "
        f"left join read_parquet('{paths['detections']}') d using (image_row) group by 1"
    ).fetchall()
    assert dict(joined) == dict(zip(logged.images["input_id"], logged.images["det_count"].tolist()))
    width = con.execute(
        f"select len(logits) from read_parquet('{paths['detections']}') limit 1"
    ).fetchone()
    assert width == (4,)


def test_to_coco_writes_results_and_ground_truth_pycocotools_reads(logged, tmp_path):
    paths = logged.to_coco(tmp_path / "coco")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(paths["ground_truth"]))
        dt = gt.loadRes(str(paths["results"]))
        coco_eval = COCOeval(gt, dt, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    assert len(gt.dataset["images"]) == len(logged)
    assert gt.dataset["images"][0]["file_name"] == logged.images["input_id"][0]
    assert {c["name"] for c in gt.dataset["categories"]} <= set(NAMES[1:])
    assert evaluate(logged).map == pytest.approx(coco_eval.stats[0], abs=1e-9)


def test_the_readme_analysis_block_runs(tmp_path, monkeypatch):
    from tests.helpers.readme_blocks import block_starting_with

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(
        compile(block_starting_with("# analysis-data"), "README.md:analysis-data", "exec"),
        namespace,
    )
    both, val, report = namespace["both"], namespace["val"], namespace["report"]
    assert len(both) == 8 and val.images["input_id"] == ["val/0.jpg", "val/1.jpg"]
    assert set(both.images["version_name"]) == {"2024.06", "2024.07"}
    assert val.class_names[1] == "person" and len(val.class_names) == 91
    assert {"map", "map_50", "map_75", "per_class", "confusion_matrix", "errors"} <= set(report)
    assert report["n_images"] == 2 and report["n_ground_truth"] == 1
    assert set(namespace["tables"]) == {"images", "detections", "targets"}
    assert namespace["files"]["detections"].exists() and namespace["coco"]["ground_truth"].exists()


def test_a_result_without_detections_converts(tmp_path):
    calls = [
        {
            "outputs": [detections(np.zeros((0, 4)), [], [])],
            "targets": None,
            "input_ids": ["empty"],
        }
    ]
    data = pyodlog.open_result(log_calls(tmp_path, calls))
    tables = data.to_arrow()
    assert tables["images"].num_rows == 1 and tables["detections"].num_rows == 0
    assert tables["detections"].schema.field("logits").type == pa.list_(pa.float32(), 4)
    assert "targets" not in tables
    assert set(data.to_coco(tmp_path / "coco")) == {"results"}
