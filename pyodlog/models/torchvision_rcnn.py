"""torchvision's two-stage detectors: Faster R-CNN (every backbone, v1 and v2), Mask R-CNN, Keypoint R-CNN."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads

from pyodlog.models.common import gather_rows, host_tensor, local_index, rows_of_images
from pyodlog.models.registry import register_logger
from pyodlog.monitoring.detection_logger import NmsConfig, ObjectDetectionTorchLogger
from pyodlog.ops import postprocess_detections
from pyodlog.structures import DetectionBatch

__all__ = ["TorchvisionRCNNLogger"]

# torchvision's RoIHeads.postprocess_detections removes boxes smaller than this.
_MIN_BOX_SIZE = 1e-2


@register_logger(priority=10)
class TorchvisionRCNNLogger(ObjectDetectionTorchLogger):
    """Logs torchvision's ``GeneralizedRCNN`` models with ``RoIHeads``.

    Per detection: the ``class_logits`` row of the proposal it came from (all
    classes, background included), and as embedding that proposal's box-head
    feature (the input of ``box_predictor``, e.g. 1024 values).
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
        return int(model.roi_heads.box_predictor.cls_score.out_features)

    def _apply_nms_config(self, model: nn.Module, nms_config: NmsConfig) -> None:
        super()._apply_nms_config(model.roi_heads, nms_config)

    def _register_model_hooks(self, model: nn.Module) -> None:
        self._add_forward_pre_hook(model.roi_heads, self._on_roi_heads)
        self._add_forward_hook(model.roi_heads.box_predictor, self._on_box_predictor)

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
        heads = self._core.roi_heads
        proposals = self._state["proposals"]
        class_logits = self._state["class_logits"]
        device = class_logits.device
        counts = [int(p.shape[0]) for p in proposals]
        first_row = [sum(counts[:i]) for i in range(len(counts))]
        out = postprocess_detections(
            F.softmax(class_logits, -1),
            heads.box_coder.decode(self._state["box_regression"], proposals),
            rows_of_images(counts, device),
            host_tensor(self._state["net_sizes"], torch.long, device),
            host_tensor(img_sizes, torch.long, device),
            heads.score_thresh,
            heads.nms_thresh,
            heads.detections_per_img,
            first_label=1,
            min_size=_MIN_BOX_SIZE,
        )
        embeddings = (
            gather_rows(self._state["box_features"].flatten(1), out.candidates)
            if self.log_embeddings
            else None
        )
        return DetectionBatch(
            out.boxes,
            out.scores,
            out.labels,
            gather_rows(class_logits, out.candidates),
            local_index(out.candidates, host_tensor(first_row, torch.long, device)),
            out.counts,
            list(img_sizes),
            embeddings,
        )
