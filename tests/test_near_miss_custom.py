"""The custom-subclass path: a logger of one's own model logs near-misses with near_misses_of."""

from __future__ import annotations

import torch

import pyodlog
from pyodlog.models.common import match_detections, near_misses_of, returned_detections
from pyodlog.ops.uncertainty import SIGMOID
from tests.helpers.tiny_models import TinyDetector, TinyDetectorLogger


class TinyNearMissLogger(TinyDetectorLogger):
    """The README's TinyDetectorLogger, plus what near-misses need: the candidates' scores and
    boxes as the model computes them, and its post-processing settings."""

    def _parse_model_output(self, model_output, img_sizes):
        batch = super()._parse_model_output(model_output, img_sizes)
        model, raw = self._core, self._state["logits"]
        n_images, n_class = raw.shape[:2]

        def rows(t):
            return t.flatten(2).transpose(1, 2).reshape(-1, n_class)

        logits, scores = rows(raw), rows(raw.sigmoid())
        boxes = model.decode(self._state["deltas"], self._state["deltas"].shape[-2:]).reshape(-1, 4)
        n_cells = [logits.shape[0] // n_images] * n_images
        returned = returned_detections(model_output, n_images, "TinyNearMissLogger")
        cells = match_detections(returned, scores, boxes, n_cells)
        batch.near_misses = near_misses_of(
            returned,
            cells,
            scores,
            boxes,
            n_cells,
            img_sizes,  # the model does not resize: network, input and original sizes agree
            img_sizes,
            img_sizes,
            logits,
            k=self.near_miss,
            floor=self.near_miss_floor,
            score_thresh=model.score_thresh,
            iou_thresh=model.nms_thresh,
            max_detections=model.detections_per_img,
            clip=False,  # TinyDetector does not clip its boxes
            uncertainty_kind=SIGMOID,
        )
        return batch


def test_a_custom_logger_with_near_misses_replays_its_model(tmp_path):
    torch.manual_seed(3)
    model = TinyDetector().eval()
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 128, 128, generator=g), torch.rand(3, 128, 128, generator=g)]
    logger = TinyNearMissLogger(model, "tiny", "nm", auto_sync=False, near_miss=1000)
    with torch.no_grad():
        logger(imgs)
    data = pyodlog.open_result(logger.export(tmp_path))
    logger.close()
    assert data.images["nm_exhausted"].tolist() == [0, 0]
    assert len(data.near_misses["scores"]) > 0 and "entropy" in data.near_misses
    for score, iou, cap in [
        (0.16, 0.5, 50),
        (0.2, 0.3, 50),
        (0.25, 0.7, 10),
        (0.4, 0.45, 50),
        (0.3, 0.6, 3),
    ]:
        model.score_thresh, model.nms_thresh, model.detections_per_img = score, iou, cap
        with torch.no_grad():
            want = model(imgs)
        got = data.replay(score, iou, cap)
        for i, w in enumerate(want):
            assert torch.equal(got[i].labels, w["labels"])
            assert torch.equal(got[i].scores, w["scores"])
            assert torch.equal(got[i].boxes, w["boxes"])
