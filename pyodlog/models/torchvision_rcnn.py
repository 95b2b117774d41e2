"""torchvision's two-stage detectors: Faster R-CNN (every backbone, v1 and v2), Mask R-CNN, Keypoint R-CNN."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads

from pyodlog.models.common import (
    PairBoxes,
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
    torchvision_output_only,
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

    def _output_only_detections(
        self, output: Any, img_sizes: list[tuple[int, int]]
    ) -> DetectionBatch | None:
        return torchvision_output_only(self, TorchvisionRCNNLogger, output, img_sizes)

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
        want_near_misses = bool(self.near_miss) and not self._sampled_out_now()
        net_sizes, input_sizes = self._state["net_sizes"], self._state["input_sizes"]
        # Exactly RoIHeads.postprocess_detections' scores and boxes, then GeneralizedRCNN's resize.
        # (decode returns [0, C * 4] for no proposal at all: the reshape makes it [0, C, 4].)
        boxes = (
            heads.box_coder.decode(self._state["box_regression"], proposals).reshape(
                n_rows, n_class, 4
            )
            if want_near_misses
            else None
        )
        scores = F.softmax(class_logits, -1)
        if boxes is not None:
            match_boxes: Any = clip_and_resize(boxes, counts, net_sizes, net_sizes, input_sizes)
        else:
            # No near-misses (a sampled-out call, or none asked for): only the boxes of the pairs
            # the match reads are decoded (a few hundred of the N * C).
            match_boxes = _pair_boxes(
                heads.box_coder,
                self._state["box_regression"],
                proposals,
                counts,
                net_sizes,
                input_sizes,
            )
        candidates = match_detections(returned, scores, match_boxes, counts, first_label=1)
        embeddings = (
            gather_rows(self._state["box_features"].flatten(1), candidates)
            if self.log_embeddings
            else None
        )
        logits = gather_rows(class_logits, candidates)
        near_misses = None
        if want_near_misses:  # sampled out: no rows
            assert boxes is not None
            box_features = self._state["box_features"].flatten(1)
            near_misses = near_misses_of(
                returned,
                candidates,
                scores,
                boxes,
                counts,
                net_sizes,
                input_sizes,
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


def _pair_boxes(
    box_coder: Any,
    box_regression: Tensor,
    proposals: list[Tensor],
    counts: list[int],
    net_sizes: list[tuple[int, int]],
    input_sizes: list[tuple[int, int]],
) -> PairBoxes:
    """The boxes of (proposal, class) pairs as ``RoIHeads.postprocess_detections`` decodes and
    ``GeneralizedRCNN`` resizes them, computed for the pairs asked for only (``decode_single`` and
    :func:`clip_and_resize` are elementwise: the same values as the full ``[N, C, 4]``)."""
    concat = torch.cat(proposals)
    n_rows = concat.shape[0]
    codes = box_regression.reshape(n_rows, -1, 4)
    n_class = codes.shape[1]
    first = [sum(counts[:i]) for i in range(len(counts))]

    def of(image: int, rows: Tensor, labels: Tensor) -> Tensor:
        rows = rows + first[image]
        decoded = box_coder.decode_single(
            codes.reshape(-1, 4).index_select(0, rows * n_class + labels),
            concat.index_select(0, rows),
        )
        size = net_sizes[image]
        return clip_and_resize(decoded, [decoded.shape[0]], [size], [size], [input_sizes[image]])

    def full() -> Tensor:
        boxes = box_coder.decode(box_regression, proposals).reshape(n_rows, n_class, 4)
        return clip_and_resize(boxes, counts, net_sizes, net_sizes, input_sizes)

    return PairBoxes(of, full)
