"""A sampled-out call's parse computes only what its aggregates read (issue 22: a sampled-out call
costs a few percent of a logged one), and its detections are exactly those of a logged call.

Without near-misses the parse decodes only the boxes the match reads (``PairBoxes``: the pairs
scoring at least the lowest returned score, a few hundred of the N * C), activates only the
anchors that can reach the lowest returned score, and pools each embedding on its own FPN level
only. Every test compares with the full computation: the same rows, logits, embeddings and
uncertainty, bit for bit, on real torchvision models (their own initialisation, which ties many
scores, and distinct weights), batch 2 with images of different sizes, and on crafted ties.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models import detection

import pyodlog
from pyodlog import InMemorySink
from pyodlog.models.common import (
    PairBoxes,
    level_roi_features,
    match_detections,
    returned_detections,
)
from tests.helpers.outputs import distinct_init, last_record
from tests.test_match_detections import _reference, _tied_candidates

RARE = 1e-9  # a rate no image of these tests is drawn at

_FIELDS = ("boxes", "scores", "labels", "logits", "candidate_index", "counts", "embeddings")
_FIELDS += ("entropy", "margin")


def _build(name: str, init: str) -> torch.nn.Module:
    torch.manual_seed(0)
    small = dict(min_size=224, max_size=320, weights=None, weights_backbone=None)
    if name == "fasterrcnn":
        model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(box_score_thresh=0.01, **small)
    elif name == "retinanet":
        model = detection.retinanet_resnet50_fpn(score_thresh=0.01, **small)
    elif name == "ssdlite":
        model = detection.ssdlite320_mobilenet_v3_large(
            score_thresh=0.01, weights=None, weights_backbone=None
        )
    else:
        model = detection.fcos_resnet50_fpn(score_thresh=0.01, **small)
    if init == "distinct":
        distinct_init(model)
    return model.eval()


def _same(a: torch.Tensor | None, b: torch.Tensor | None, where: str) -> None:
    assert (a is None) == (b is None), where
    if a is None or b is None:
        return
    assert a.shape == b.shape and a.dtype == b.dtype, where
    if a.dtype.is_floating_point:  # bit for bit, NaN included
        view = {4: torch.int32, 2: torch.int16, 8: torch.int64}[a.element_size()]
        assert torch.equal(a.contiguous().view(view), b.contiguous().view(view)), where
    else:
        assert torch.equal(a, b), where


@pytest.mark.parametrize("init", ["torchvision", "distinct"])
@pytest.mark.parametrize("name", ["fasterrcnn", "retinanet", "fcos", "ssdlite"])
def test_a_sampled_out_parse_records_exactly_what_a_logged_parse_records(name, init):
    model = _build(name, init)
    g = torch.Generator().manual_seed(4)
    images = [torch.rand(3, 240, 320, generator=g), torch.rand(3, 200, 288, generator=g)]
    records = {}
    boxes_decoded: dict[str, list[int]] = {}
    for key, sampling in (
        ("bare", None),
        ("logged", None),
        ("sampled out", pyodlog.Sampling(RARE)),
    ):
        logger = (
            model
            if key == "bare"
            else pyodlog.create_logger(
                model, "m", key.replace(" ", "-"), sink=InMemorySink(), sampling=sampling
            )
        )
        # How many boxes the parse decodes (the box coder's input rows).
        coder = (
            pyodlog.models.common.parts(model).roi_heads.box_coder
            if name == "fasterrcnn"
            else pyodlog.models.common.parts(model).box_coder
        )
        seen: list[int] = []
        method = "decode_single" if name != "fcos" else "decode"
        original = getattr(coder, method)

        def counting(codes, boxes, original=original, seen=seen):
            seen.append(int(codes.numel()) // 4)
            return original(codes, boxes)

        setattr(coder, method, counting)
        try:
            with torch.inference_mode():
                out = logger(images)
        finally:
            setattr(coder, method, original)
        assert sum(len(o["scores"]) for o in out) > 0
        boxes_decoded[key] = seen
        if key == "bare":
            continue
        records[key] = last_record(logger).detections
        assert logger.stats()["logging_errors"] == 0
        logger.close()
    full, sampled = records["logged"], records["sampled out"]
    assert sampled.near_misses is None and full.near_misses is not None
    for field in _FIELDS:
        _same(getattr(sampled, field), getattr(full, field), field)
    matched = int((full.candidate_index >= 0).sum())
    assert matched == int(full.counts.sum())  # every detection found its candidate
    # The logged parse decodes every candidate's boxes; the sampled-out one only those it reads.
    model_rows = sum(boxes_decoded["bare"])  # the model's own decoding, in every call
    parse_rows = {k: sum(boxes_decoded[k]) - model_rows for k in ("logged", "sampled out")}
    # At most the anchors of pairs that score as high as a returned detection, and the embeddings'
    # boxes; far fewer with torchvision's initialisation (the benchmark's models).
    detections = int(full.counts.sum())
    assert 0 < parse_rows["sampled out"] <= parse_rows["logged"] + detections, boxes_decoded
    if init == "torchvision" and name != "ssdlite":
        # (SSDlite's softmax over 91 classes at this initialisation puts a pair of nearly every
        # anchor above the lowest returned score: every anchor is decoded, as before.)
        assert parse_rows["sampled out"] < parse_rows["logged"] / 4, boxes_decoded


def _pair_boxes(
    boxes: torch.Tensor, rows_per_image: list[int], lie: bool = False, asked: list | None = None
) -> PairBoxes:
    first = [sum(rows_per_image[:i]) for i in range(len(rows_per_image))]

    def of(image, rows, labels):
        if asked is not None:
            asked.append(int(rows.numel()))
        rows = rows + first[image]
        out = boxes[rows, labels] if boxes.dim() == 3 else boxes[rows]
        return out + 1.0 if lie else out

    return PairBoxes(of, lambda: boxes)


@pytest.mark.parametrize("per_class", [False, True], ids=["class-agnostic", "per-class boxes"])
@pytest.mark.parametrize("first_label", [0, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_boxes_match_as_the_full_boxes_under_massive_ties(per_class, first_label, seed):
    """Crafted ties (scores on a grid of 3 values, 4 distinct boxes, NaN, an empty image, a
    detection no candidate reproduces): the rows of the full match and of the reference."""
    scores, boxes, output, rows_per_image = _tied_candidates(per_class, seed)
    returned = returned_detections(output, len(output), "test")
    expected = _reference(scores, boxes, output, rows_per_image, first_label)
    full = match_detections(returned, scores, boxes, rows_per_image, first_label=first_label)
    asked: list[int] = []
    lazy = _pair_boxes(boxes, rows_per_image, asked=asked)
    got = match_detections(returned, scores, lazy, rows_per_image, first_label=first_label)
    assert got.tolist() == full.tolist() == expected
    assert asked  # the pairs' boxes were asked for


def test_pair_boxes_that_reproduce_no_detection_fall_back_to_the_full_boxes():
    """A detection no pair reproduces with the boxes asked for is matched again on the full
    boxes: the rows are always those of the full boxes."""
    scores, boxes, output, rows_per_image = _tied_candidates(True, 0)
    returned = returned_detections(output, len(output), "test")
    expected = _reference(scores, boxes, output, rows_per_image, 1)
    lying = _pair_boxes(boxes, rows_per_image, lie=True)
    assert match_detections(returned, scores, lying, rows_per_image, first_label=1).tolist() == (
        expected
    )


def test_pair_boxes_with_nan_scores_and_no_pair_above_the_lowest_score():
    scores = torch.tensor([[0.0, 0.9], [0.0, float("nan")], [0.0, 0.5]])
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])
    output = [
        {"boxes": boxes, "scores": torch.tensor([0.9, float("nan"), 0.5]), "labels": torch.ones(3)},
        {"boxes": boxes[:1], "scores": torch.tensor([0.95]), "labels": torch.ones(1)},
        {"boxes": boxes[:0], "scores": torch.zeros(0), "labels": torch.zeros(0)},
    ]
    returned = returned_detections(output, 3, "test")
    rows = [3, 3, 3]
    all_scores = torch.cat([scores, scores, scores])
    all_boxes = torch.cat([boxes, boxes, boxes])
    full = match_detections(returned, all_scores, all_boxes, rows, first_label=1)
    lazy = match_detections(returned, all_scores, _pair_boxes(all_boxes, rows), rows, 1)
    # NaN matches nothing; 0.95 is above every pair of image 1; image 2 has no detection.
    assert lazy.tolist() == full.tolist() == [[0, -1, 2], [-1, -1, -1], [-1, -1, -1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_roi_pooled_on_its_own_level_equals_pooling_every_level(dtype):
    g = torch.Generator().manual_seed(0)
    padded = (256, 384)
    features = [
        torch.randn(2, 8, padded[0] // s, padded[1] // s, generator=g).to(dtype)
        for s in (8, 16, 32, 64, 128)
    ]
    xy = torch.rand(2, 30, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + torch.rand(2, 30, 2, generator=g) * 120], dim=2)
    level = torch.randint(0, 4, (2, 30), generator=g)  # level 4 left empty
    level[1, 25:] = -1  # padding
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got = level_roi_features(features, boxes, level, padded)
        want = level_roi_features(features, boxes, level, padded, every_level=True)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)
    assert bool((got[1, 25:] == 0).all())


@pytest.mark.parametrize(
    "candidate_dtype, returned_dtype",
    [
        (torch.float32, torch.bfloat16),  # a model that casts its output down
        (torch.bfloat16, torch.float32),  # candidates narrower than the output
        (torch.float32, torch.float16),
    ],
)
def test_pair_boxes_compare_in_the_narrower_dtype_as_the_full_boxes(
    candidate_dtype, returned_dtype
):
    scores, boxes, output, rows_per_image = _tied_candidates(True, 3)
    scores, boxes = scores.to(candidate_dtype), boxes.to(candidate_dtype)
    narrow = output if candidate_dtype != torch.float32 else None
    output = [
        {
            "boxes": o["boxes"].to(candidate_dtype).to(returned_dtype),
            "scores": o["scores"].to(candidate_dtype).to(returned_dtype),
            "labels": o["labels"],
        }
        for o in (narrow or output)
    ]
    returned = returned_detections(output, len(output), "test")
    full = match_detections(returned, scores, boxes, rows_per_image, first_label=1)
    lazy = match_detections(returned, scores, _pair_boxes(boxes, rows_per_image), rows_per_image, 1)
    assert lazy.tolist() == full.tolist()
    assert int((full >= 0).sum()) >= 90
