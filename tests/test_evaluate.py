"""pyodlog.analysis.evaluate: COCO metrics by pycocotools on logged detections and targets, a
confusion matrix and the worst errors, on sets with known answers (issue 15)."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import pyodlog
from pyodlog.analysis import evaluate
from tests.helpers.replay_detector import detections, log_calls, targets

NAMES = ["background", "cat", "dog", "bird"]


def _random_scene(rng, n_images=12):
    """Ground truth and imperfect predictions: jittered boxes, misses, false positives, confusions."""
    calls = []
    for i in range(n_images):
        k = int(rng.integers(0, 5))
        xy = rng.uniform(0, 400, (k, 2))
        wh = rng.uniform(20, 200, (k, 2))
        gt = np.concatenate([xy, xy + wh], 1)
        gt_labels = rng.integers(1, 4, k)
        keep = rng.random(k) > 0.2  # some objects are missed
        pred = gt[keep] + rng.normal(0, 8, (int(keep.sum()), 4))
        pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2] + 1)
        labels = gt_labels[keep].copy()
        flip = rng.random(len(labels)) < 0.15  # some label confusions
        labels[flip] = labels[flip] % 3 + 1
        n_fp = int(rng.integers(0, 3))
        fp_xy = rng.uniform(0, 500, (n_fp, 2))
        pred = np.concatenate([pred, np.concatenate([fp_xy, fp_xy + 30], 1)])
        labels = np.concatenate([labels, rng.integers(1, 4, n_fp)])
        scores = rng.uniform(0.05, 1.0, len(labels))
        calls.append(
            {
                "outputs": [detections(pred, scores, labels)],
                "targets": [targets(gt, gt_labels)],
                "input_ids": [f"img-{i:03d}"],
            }
        )
    return calls


def _cocoeval_directly(calls):
    """pycocotools on the same boxes, built here independently of pyodlog's conversion."""
    images, anns, results = [], [], []
    for i, call in enumerate(calls):
        images.append({"id": i + 1, "height": 480, "width": 640})
        gt = call["targets"][0]
        for box, label in zip(gt["boxes"].tolist(), gt["labels"].tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": label,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        det = call["outputs"][0]
        for box, score, label in zip(
            det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()
        ):
            results.append(
                {
                    "image_id": i + 1,
                    "category_id": label,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": score,
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": c} for c in (1, 2, 3)],
        }
        gt.createIndex()
        coco_eval = COCOeval(gt, gt.loadRes(results), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def test_perfect_predictions_give_map_1(tmp_path):
    rng = np.random.default_rng(0)
    calls = []
    for i in range(5):
        xy = rng.uniform(0, 300, (3, 2))
        gt = np.concatenate([xy, xy + rng.uniform(30, 150, (3, 2))], 1)
        labels = rng.integers(1, 4, 3)
        calls.append(
            {
                "outputs": [detections(gt, [0.9, 0.8, 0.7], labels)],
                "targets": [targets(gt, labels)],
                "input_ids": [f"p{i}"],
            }
        )
    data = pyodlog.open_result(log_calls(tmp_path, calls, class_names=NAMES))
    result = evaluate(data).to_dict()
    # COCO's precision is tp / (tp + fp + eps): 1 to within 1e-12.
    for metric in ("map", "map_50", "map_75", "recall"):
        assert result[metric] == pytest.approx(1.0, abs=1e-12)
    assert all(row["ap"] == pytest.approx(1.0, abs=1e-12) for row in result["per_class"].values())
    assert set(result["per_class"]) <= {"cat", "dog", "bird"}
    matrix = np.asarray(result["confusion_matrix"]["matrix"])
    assert result["confusion_matrix"]["labels"] == [*NAMES, "background"]
    assert matrix.sum() == 15 and np.trace(matrix) == 15
    assert result["errors"] == {"false_positives": [], "missed": [], "confusions": []}


def test_one_shifted_box_gives_the_expected_ap(tmp_path):
    # IoU of the shifted box with its object: 80 * 100 / (120 * 100) = 2/3, so it matches at
    # the thresholds 0.50, 0.55, 0.60, 0.65 (AP 1) and not at 0.70 .. 0.95 (AP 0): mAP 4/10.
    calls = [
        {
            "outputs": [detections([[20, 0, 120, 100]], [0.9], [1])],
            "targets": [targets([[0, 0, 100, 100]], [1])],
            "input_ids": ["shifted"],
        },
        {
            "outputs": [detections([[200, 200, 300, 260]], [0.8], [1])],
            "targets": [targets([[200, 200, 300, 260]], [1])],
            "input_ids": ["exact"],
        },
    ]
    data = pyodlog.open_result(log_calls(tmp_path, calls, class_names=NAMES))
    only_shifted = evaluate(data.where(input_id_prefix="shifted"))
    assert only_shifted.map == pytest.approx(0.4, abs=1e-12)
    assert only_shifted.map_50 == pytest.approx(1.0, abs=1e-12)
    assert only_shifted.map_75 == 0.0
    both = evaluate(data)
    # At 0.50 both boxes match: AP 1. At 0.70+ the shifted box (0.9, ranked first) is a false
    # positive and the exact one (0.8) recalls half the objects at precision 1/2: COCO's
    # 101-point interpolation gives 51 points of precision 0.5 (recall 0 .. 0.5) over 101.
    assert both.map_50 == pytest.approx(1.0, abs=1e-12)
    assert both.map_75 == pytest.approx(51 * 0.5 / 101, abs=1e-12)
    assert evaluate(data, iou_thresholds=[0.5, 0.6]).map == pytest.approx(1.0, abs=1e-12)
    assert evaluate(data, iou_thresholds=[0.7]).map_50 is None


def test_equal_to_pycocotools_called_directly(tmp_path):
    calls = _random_scene(np.random.default_rng(1))
    data = pyodlog.open_result(log_calls(tmp_path, calls, class_names=NAMES))
    ours = evaluate(data)
    direct = _cocoeval_directly(calls)
    stats = direct.stats
    assert ours.map == pytest.approx(stats[0], abs=1e-9)
    assert ours.map_50 == pytest.approx(stats[1], abs=1e-9)
    assert ours.map_75 == pytest.approx(stats[2], abs=1e-9)
    assert ours.recall == pytest.approx(stats[8], abs=1e-9)
    for metric, stat in (("map_small", 3), ("map_medium", 4), ("map_large", 5)):
        value, want = getattr(ours, metric), stats[stat]
        assert (math.isnan(value) and want == -1) or value == pytest.approx(want, abs=1e-9)
    precision = direct.eval["precision"]
    for k, cat in enumerate(direct.params.catIds):
        p = precision[:, :, k, 0, -1]
        want = float(np.mean(p[p > -1])) if (p > -1).any() else float("nan")
        got = ours.per_class[NAMES[cat]]["ap"]
        assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, abs=1e-9)
    assert 0 < ours.map < 1


def test_confusion_matrix_and_worst_errors_name_the_images(tmp_path):
    calls = [
        {  # a cat seen as a dog, at IoU 1
            "outputs": [detections([[10, 10, 60, 60]], [0.95], [2])],
            "targets": [targets([[10, 10, 60, 60]], [1])],
            "input_ids": ["confused"],
        },
        {  # a bird where nothing is, and a missed cat
            "outputs": [detections([[300, 300, 340, 340]], [0.99], [3])],
            "targets": [targets([[0, 0, 200, 100]], [1])],
            "input_ids": ["fp-and-miss"],
        },
        {  # a low-score false positive: below the threshold of the matrix
            "outputs": [detections([[5, 5, 20, 20]], [0.1], [3])],
            "targets": [targets(np.zeros((0, 4)), [])],
            "input_ids": ["quiet"],
        },
    ]
    data = pyodlog.open_result(log_calls(tmp_path, calls, class_names=NAMES))
    result = evaluate(data, score_threshold=0.5).to_dict()
    matrix = np.asarray(result["confusion_matrix"]["matrix"])
    cat, dog, bird, background = 1, 2, 3, 4
    assert matrix[cat, dog] == 1  # the confusion
    assert matrix[background, bird] == 1  # the false positive
    assert matrix[cat, background] == 1  # the missed cat
    assert matrix.sum() == 3
    errors = result["errors"]
    assert [e["input_id"] for e in errors["confusions"]] == ["confused"]
    assert (
        errors["confusions"][0]["gt_class"] == "cat" and errors["confusions"][0]["class"] == "dog"
    )
    assert [e["input_id"] for e in errors["false_positives"]] == ["fp-and-miss"]
    assert errors["false_positives"][0]["score"] == pytest.approx(0.99)
    assert [e["input_id"] for e in errors["missed"]] == ["fp-and-miss"]
    assert errors["missed"][0]["gt_class"] == "cat"
    assert result["n_images"] == 3 and result["n_ground_truth"] == 2
    assert "cat" in str(evaluate(data))


def test_images_logged_without_targets_are_left_out(tmp_path):
    calls = [
        {
            "outputs": [detections([[0, 0, 50, 50]], [0.9], [1])],
            "targets": [targets([[0, 0, 50, 50]], [1])],
            "input_ids": ["with"],
        },
        {  # no targets: its detection must not count as a false positive
            "outputs": [detections([[0, 0, 50, 50]], [0.9], [2])],
            "targets": None,
            "input_ids": ["without"],
        },
    ]
    data = pyodlog.open_result(log_calls(tmp_path, calls))
    result = evaluate(data)
    assert result.n_images == 1 and result.map == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="no image of this slice was logged with ground truth"):
        evaluate(data.where(input_id_prefix="without"))


def test_lazy_and_chunked_evaluation_agree(tmp_path):
    calls = _random_scene(np.random.default_rng(2), n_images=9)
    folder = log_calls(tmp_path, calls, class_names=NAMES, rotate_every=3)
    assert len(list(folder.glob("*.h5"))) == 3
    whole = json.dumps(evaluate(pyodlog.open_result(folder)).to_dict(), sort_keys=True)
    chunked = evaluate(pyodlog.open_result(folder), chunk_rows=2).to_dict()
    assert json.dumps(chunked, sort_keys=True) == whole
    lazy = evaluate(pyodlog.open_results([folder], lazy=True), chunk_rows=4).to_dict()
    assert json.dumps(lazy, sort_keys=True) == whole


def test_bad_thresholds_are_refused(tmp_path):
    calls = _random_scene(np.random.default_rng(3), n_images=2)
    data = pyodlog.open_result(log_calls(tmp_path, calls))
    with pytest.raises(ValueError, match="iou_thresholds"):
        evaluate(data, iou_thresholds=[0.5, 1.5])
