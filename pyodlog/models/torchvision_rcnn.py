"""torchvision's two-stage detectors: Faster R-CNN (every backbone, v1 and v2), Mask R-CNN, Keypoint R-CNN."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads

from pyodlog.models.common import (
    captured,
    clip_and_resize,
    first_rows,
    gather_rows,
    image_sizes_of,
    local_index,
    logged_boxes,
    match_detections,
    near_misses_of,
    returned_detections,
    with_uncertainty,
)
from pyodlog.models.common import parts as _parts
from pyodlog.models.registry import register_logger
from pyodlog.monitoring.detection_logger import NmsConfig, ObjectDetectionTorchLogger
from pyodlog.ops.uncertainty import SOFTMAX
from pyodlog.structures import DetectionBatch

__all__ = ["TorchvisionRCNNLogger"]


@register_logger(priority=10)
class TorchvisionRCNNLogger(ObjectDetectionTorchLogger):
    """Logs torchvision's ``GeneralizedRCNN`` models with ``RoIHeads``.

    The logged detections are the ones the model returned (ties included);
    per detection, the proposal it came from is found by box, score and label
    among every (proposal, class) pair, and its ``class_logits`` row (all
    classes, background included) and box-head feature (the input of
    ``box_predictor``, e.g. 1024 values, as embedding) are logged, with the
    uncertainty of the softmax over ``class_logits`` and, with ``near_miss``,
    the near-misses of the same proposals (:func:`~pyodlog.models.common.near_misses_of`).
    """

    family = "torchvision Faster R-CNN (all backbones, v1 and v2), Mask R-CNN, Keypoint R-CNN"

    @staticmethod
    def detect(model: nn.Module) -> bool:
        heads = getattr(model, "roi_heads", None)
        return (
            isinstance(model, GeneralizedRCNN)
            and isinstance(heads, RoIHeads)
            and isinstance(getattr(heads.box_predictor, "cls_score", None), nn.Linear)
        )

    def _get_n_class(self, model: nn.Module) -> int:
        return int(_parts(model).roi_heads.box_predictor.cls_score.out_features)

    def _apply_nms_config(self, model: nn.Module, nms_config: NmsConfig) -> None:
        super()._apply_nms_config(_parts(model).roi_heads, nms_config)

    def _register_model_hooks(self, model: nn.Module) -> None:
        parts = _parts(model)
        self._add_forward_pre_hook(parts.transform, self._on_transform)
        self._add_forward_pre_hook(parts.roi_heads, self._on_roi_heads)
        self._add_forward_hook(parts.roi_heads.box_predictor, self._on_box_predictor)

    def _on_transform(self, module, args) -> None:
        # The sizes the model resizes its boxes back to (GeneralizedRCNN's original_image_sizes).
        self._state["input_sizes"] = image_sizes_of(args[0])

    def _on_roi_heads(self, module, args) -> None:
        # RoIHeads.forward(features, proposals, image_shapes, targets=None)
        self._state["proposals"] = args[1]
        self._state["net_sizes"] = args[2]

    def _on_box_predictor(self, module, inputs, output) -> None:
        self._state["box_features"] = inputs[0]
        self._state["class_logits"], self._state["box_regression"] = output

    def _parse_model_output(
        self, model_output: Any, img_sizes: list[tuple[int, int]]
    ) -> DetectionBatch:
        """The returned detections, each with the proposal it came from (found by box, score and label)."""
        heads = _parts(self._core).roi_heads
        returned = returned_detections(
            model_output, len(img_sizes), f"{type(self).__name__}._parse_model_output"
        )
        proposals = captured(self._state, "proposals", self.model)
        class_logits = self._state["class_logits"]
        device = class_logits.device
        n_rows, n_class = class_logits.shape
        counts = [int(p.shape[0]) for p in proposals]
        # Exactly RoIHeads.postprocess_detections' scores and boxes, then GeneralizedRCNN's resize.
        # (decode returns [0, C * 4] for no proposal at all: the reshape makes it [0, C, 4].)
        boxes = heads.box_coder.decode(self._state["box_regression"], proposals).reshape(
            n_rows, n_class, 4
        )
        scores = F.softmax(class_logits, -1)
        candidates = match_detections(
            returned,
            scores,
            clip_and_resize(
                boxes,
                counts,
                self._state["net_sizes"],
                self._state["net_sizes"],
                self._state["input_sizes"],
            ),
            counts,
            first_label=1,
        )
        embeddings = (
            gather_rows(self._state["box_features"].flatten(1), candidates)
            if self.log_embeddings
            else None
        )
        logits = gather_rows(class_logits, candidates)
        near_misses = None
        if self.near_miss and not self._sampled_out_now():  # sampled out: no rows
            box_features = self._state["box_features"].flatten(1)
            near_misses = near_misses_of(
                returned,
                candidates,
                scores,
                boxes,
                counts,
                self._state["net_sizes"],
                self._state["input_sizes"],
                img_sizes,
                class_logits,
                k=self.near_miss,
                floor=self.near_miss_floor,
                score_thresh=heads.score_thresh,
                iou_thresh=heads.nms_thresh,
                max_detections=heads.detections_per_img,
                first_label=1,
                min_size=1e-2,
                uncertainty_kind=SOFTMAX,
                embeddings=(lambda rows: gather_rows(box_features, rows))
                if self.log_embeddings
                else None,
            )
        return DetectionBatch(
            logged_boxes(returned, self._state["input_sizes"], img_sizes),
            returned.scores,
            returned.labels,
            logits,
            local_index(candidates, first_rows(counts, device)),
            returned.counts,
            list(img_sizes),
            embeddings,
            near_misses=near_misses,
            **with_uncertainty(logits, SOFTMAX),
        )
