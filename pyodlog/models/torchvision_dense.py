"""torchvision's one-stage detectors: RetinaNet (v1, v2), FCOS, SSD and SSDlite.

They share a layout: ``model.head(features)`` returns per-anchor outputs for the
whole batch and ``model.anchor_generator(images, features)`` the anchors; the
model's post-processing filters, keeps a top-k, runs NMS per class and keeps
the best ``detections_per_img``. The logger captures both with hooks, logs the
detections the model returned (ties included) and finds the anchor each came
from by its box, score and label (:func:`pyodlog.models.common.match_detections`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD

from pyodlog.models.common import (
    PairBoxes,
    ReturnedDetections,
    captured,
    clip_and_resize,
    gather_rows,
    image_sizes_of,
    level_roi_features,
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
from pyodlog.monitoring.detection_logger import ObjectDetectionTorchLogger
from pyodlog.ops.postprocess import activated_rows
from pyodlog.ops.uncertainty import SIGMOID, SOFTMAX
from pyodlog.structures import DetectionBatch, NearMissBatch

__all__ = ["FCOSLogger", "RetinaNetLogger", "SSDLogger"]


@functools.lru_cache(maxsize=4)  # a few input shapes; each up to ~1.6 MB (800 px, 9 anchors)
def _levels(sizes: tuple[int, ...], n_anchors: int, device: torch.device) -> Tensor:
    """``Tensor[A]`` the FPN level of each anchor (read only; made once per feature-map shape)."""
    per_location = n_anchors // sum(sizes)
    return torch.cat(
        [
            torch.full((n * per_location,), lvl, dtype=torch.long, device=device)
            for lvl, n in enumerate(sizes)
        ]
    )


class _DenseHeadLogger(ObjectDetectionTorchLogger):
    """The shared part of the one-stage families; subclasses say how scores and boxes come about."""

    #: Classes below this are background (SSD's class 0).
    first_label = 0
    #: Whether the levels share a channel count, so an RoI feature can serve as embedding.
    fpn_embeddings = True
    #: How the head activates its logits (the uncertainty columns): softmax or per-class sigmoid.
    uncertainty_kind: int = SIGMOID
    #: The top-k runs per (image, class) (SSD) rather than per (image, FPN level) (RetinaNet, FCOS).
    topk_per_class = False
    #: The activation ``_scores`` applies, as the fused operators apply it to raw logits
    #: (:data:`pyodlog.ops.postprocess.ACTIVATIONS`), or None (SSD's softmax: ``_scores`` only).
    #: With one, a CPU call activates only the anchors that can score above the threshold
    #: instead of every anchor's logits.
    activation: str | None = None

    def _register_model_hooks(self, model: nn.Module) -> None:
        parts = _parts(model)
        self._add_forward_pre_hook(parts.transform, self._on_transform)
        self._add_forward_hook(parts.head, self._on_head)
        self._add_forward_hook(parts.anchor_generator, self._on_anchors)

    def _on_transform(self, module, args) -> None:
        # The sizes the model resizes its boxes back to (its original_image_sizes).
        self._state["input_sizes"] = image_sizes_of(args[0])

    def _on_head(self, module, inputs, output) -> None:
        self._state["features"] = inputs[0]
        self._state["head"] = output

    def _on_anchors(self, module, inputs, output) -> None:
        image_list = inputs[0]
        self._state["net_sizes"] = image_list.image_sizes
        self._state["padded_size"] = tuple(image_list.tensors.shape[-2:])
        self._state["anchors"] = output

    def _scores(self, head: dict) -> Tensor:
        raise NotImplementedError

    def _decode(self, regression: Tensor, anchors: Tensor) -> Tensor:
        raise NotImplementedError

    def _centerness(self, head: dict) -> Tensor | None:
        """``Tensor[N]`` the centerness logit of each anchor (activation ``sigmoid_centerness``)."""
        return None

    def _fused(self, cls_logits: Tensor, boxes: Tensor) -> bool:
        """Whether the raw logits go to the operators (CPU, same dtype as the boxes: under
        autocast the model activates in its own dtype, which a cast here would change)."""
        return (
            self.activation is not None
            and cls_logits.device.type == "cpu"
            and cls_logits.dtype == boxes.dtype
        )

    def _match_fused(
        self,
        returned: ReturnedDetections,
        logits: Tensor,
        centerness: Tensor | None,
        boxes: Tensor | _AnchorBoxes,
        n_anchors: int,
        net_sizes: list[tuple[int, int]],
        want_near_misses: bool,
    ) -> tuple[Tensor, Tensor, str]:
        """:func:`match_detections` over the anchors that can hold a returned detection only.

        Every returned score is at least the lowest one (and above the model's threshold): the
        anchors none of whose logits can pass the lower of those, or of the near-miss floor (the
        lowest returned score alone when no near-misses are wanted), are left out
        (:func:`pyodlog.ops.activated_rows`, one read of the logits), the others activated
        exactly as the model does; the matches are mapped back to anchor rows. ``boxes``: the
        decoded anchors, or :class:`_AnchorBoxes` (decoded for the pairs the match reads).

        Returns:
            ``(candidates, scores, activation)``: what the near-miss operator is fed. When many
            anchors were activated here, their scores (the others 0: they cannot pass the
            operator's threshold, so none of its decisions changes) with ``"none"``; else the
            raw logits with the family's activation (the operator reads them once more and
            activates only the anchors it needs).
        """
        assert self.activation is not None
        n_images = len(net_sizes)
        n, n_classes = logits.shape
        heads = _parts(self._core)
        thresh = float(heads.score_thresh)
        if want_near_misses:
            floor = self.near_miss_floor
            thresh = min(thresh, thresh / 2 if floor is None else float(floor))
        valid = (
            torch.arange(returned.scores.shape[1])[None, :] < returned.counts[:, None]
        ) & ~returned.scores.isnan()
        if bool(valid.any()):
            lowest = float(returned.scores[valid].min())
            # Without near-misses the match alone reads the scores: only pairs scoring at least
            # the lowest returned score can match, so only anchors that can reach it are activated.
            thresh = min(thresh, lowest) if want_near_misses else lowest
        live, live_scores = activated_rows(
            logits, self.activation, math.nextafter(thresh, -math.inf), self.first_label, centerness
        )
        matched = torch.full(returned.scores.shape, -1, dtype=torch.long)
        if live.numel() == n and bool(valid.any()):  # every anchor live: nothing to map back
            return (
                match_detections(
                    returned,
                    live_scores,
                    clip_and_resize(
                        boxes,
                        [n_anchors] * n_images,
                        net_sizes,
                        net_sizes,
                        self._state["input_sizes"],
                    )
                    if isinstance(boxes, Tensor)
                    else boxes.of_rows(None),
                    [n_anchors] * n_images,
                    first_label=self.first_label,
                ),
                live_scores,
                "none",
            )
        if live.numel() and bool(valid.any()):
            live_rows = torch.bincount(live // n_anchors, minlength=n_images).tolist()
            matched = match_detections(
                returned,
                live_scores,
                clip_and_resize(
                    boxes[live], live_rows, net_sizes, net_sizes, self._state["input_sizes"]
                )
                if isinstance(boxes, Tensor)
                else boxes.of_rows(live, live_rows),
                live_rows,
                first_label=self.first_label,
            )
            matched = torch.where(matched >= 0, live[matched.clamp(min=0)], matched)
        if not want_near_misses or 4 * live.numel() <= n:
            return matched, logits, self.activation
        if live.numel() == n:
            return matched, live_scores, "none"
        scores = live_scores.new_zeros((n, n_classes))
        scores.index_copy_(0, live, live_scores)
        return matched, scores, "none"

    def _anchor_levels(
        self, features: list[Tensor], n_anchors: int, device: torch.device
    ) -> Tensor:
        """``Tensor[A]``: the FPN level of each anchor of an image."""
        return _levels(tuple(int(f.shape[-2] * f.shape[-1]) for f in features), n_anchors, device)

    def _output_only_detections(
        self, output: Any, img_sizes: list[tuple[int, int]]
    ) -> DetectionBatch | None:
        return torchvision_output_only(self, _DenseHeadLogger, output, img_sizes)

    def _parse_model_output(
        self, model_output: Any, img_sizes: list[tuple[int, int]]
    ) -> DetectionBatch:
        """The returned detections, each with the anchor it came from (found by box, score and label)."""
        returned = returned_detections(
            model_output, len(img_sizes), f"{type(self).__name__}._parse_model_output"
        )
        head = captured(self._state, "head", self.model)
        cls_logits = head["cls_logits"]
        n_images, n_anchors, n_classes = cls_logits.shape
        device = cls_logits.device
        anchors = torch.stack(self._state["anchors"]).reshape(-1, 4)
        regression = head["bbox_regression"].reshape(-1, 4)
        features = self._state["features"]
        net_sizes = self._state["net_sizes"]
        rows = [n_anchors] * n_images
        want_near_misses = bool(self.near_miss) and not self._sampled_out_now()
        # The model's candidates as it returns them: scores activated as it does, boxes decoded,
        # clipped to the network input and resized to the input images. On the CPU the raw logits
        # go to the operators, which activate only the anchors that can pass (no pass over every
        # anchor's scores here). Without near-misses (a sampled-out call, or none asked for) on
        # the CPU, only the anchors the match and the embeddings read are decoded.
        lazy = (
            _AnchorBoxes(self, regression, anchors, n_anchors)
            if not want_near_misses and cls_logits.device.type == "cpu"
            else None
        )
        boxes: Any = lazy if lazy is not None else self._decode(regression, anchors)
        fused = self._fused(cls_logits, regression)  # (the box coders decode in its dtype)
        centerness = self._centerness(head) if fused else None
        activation = "none"
        if fused:
            candidates, scores, activation = self._match_fused(
                returned,
                cls_logits.reshape(-1, n_classes),
                centerness,
                boxes,
                n_anchors,
                net_sizes,
                want_near_misses,
            )
        else:
            scores = self._scores(head).reshape(-1, n_classes)
            candidates = match_detections(
                returned,
                scores,
                clip_and_resize(boxes, rows, net_sizes, net_sizes, self._state["input_sizes"])
                if lazy is None
                else lazy.of_rows(None),
                rows,
                first_label=self.first_label,
            )
        first_row = torch.arange(n_images, device=device) * n_anchors
        local = local_index(candidates, first_row)
        embeddings = None
        if self.log_embeddings and self.fpn_embeddings:
            levels = self._anchor_levels(features, n_anchors, device)
            net_boxes = (
                gather_rows(
                    clip_and_resize(boxes, rows, net_sizes, net_sizes, net_sizes), candidates
                )
                if lazy is None
                else lazy.of_candidates(candidates)
            )
            level_of = torch.where(local >= 0, levels[local.clamp(min=0)], local)
            embeddings = level_roi_features(
                features, net_boxes, level_of, self._state["padded_size"]
            )
        logits = gather_rows(cls_logits.reshape(-1, n_classes), candidates)
        near_misses = None
        if want_near_misses:  # sampled out: no rows
            near_misses = self._near_misses(
                returned,
                candidates,
                scores,
                boxes,
                rows,
                img_sizes,
                cls_logits.reshape(-1, n_classes),
                activation=activation,
                centerness=centerness if activation != "none" else None,
            )
        return DetectionBatch(
            logged_boxes(returned, self._state["input_sizes"], img_sizes),
            returned.scores,
            returned.labels,
            logits,
            local,
            returned.counts,
            list(img_sizes),
            embeddings,
            near_misses=near_misses,
            **with_uncertainty(logits, self.uncertainty_kind),
        )

    def _near_misses(
        self,
        returned: ReturnedDetections,
        candidates: Tensor,
        scores: Tensor,
        boxes: Tensor,
        rows: list[int],
        img_sizes: list[tuple[int, int]],
        logits: Tensor,
        activation: str | None = None,
        centerness: Tensor | None = None,
    ) -> NearMissBatch:
        """The near-misses of the anchors the model post-processed, with its own settings.

        With ``activation``, ``scores`` are the raw logits and the operator activates them.
        """
        model = _parts(self._core)
        features = self._state["features"]
        net_sizes = self._state["net_sizes"]
        n_images, n_anchors = len(rows), rows[0]
        device = scores.device
        levels = self._anchor_levels(features, n_anchors, device)
        topk_group = None
        if not self.topk_per_class:
            # RetinaNet and FCOS keep their top-k per (image, FPN level).
            topk_group = (
                torch.arange(n_images, device=device)[:, None] * len(features) + levels[None, :]
            ).reshape(-1)
        embeddings = None
        if self.log_embeddings and self.fpn_embeddings:
            net_boxes = clip_and_resize(boxes, rows, net_sizes, net_sizes, net_sizes)
            first_row = torch.arange(n_images, device=device) * n_anchors

            def embeddings(nm_rows: Tensor) -> Tensor:
                local = local_index(nm_rows, first_row)
                level_of = torch.where(local >= 0, levels[local.clamp(min=0)], local)
                return level_roi_features(
                    features, gather_rows(net_boxes, nm_rows), level_of, self._state["padded_size"]
                )

        return near_misses_of(
            returned,
            candidates,
            scores,
            boxes,
            rows,
            net_sizes,
            self._state["input_sizes"],
            img_sizes,
            logits,
            k=self.near_miss,
            floor=self.near_miss_floor,
            score_thresh=model.score_thresh,
            iou_thresh=model.nms_thresh,
            max_detections=model.detections_per_img,
            first_label=self.first_label,
            topk=model.topk_candidates,
            topk_group=topk_group,
            topk_per_class=self.topk_per_class,
            uncertainty_kind=self.uncertainty_kind,
            embeddings=embeddings,
            activation=activation or "none",
            centerness=centerness,
        )


class _AnchorBoxes:
    """A one-stage call's anchor boxes, decoded for the anchors asked for only (the box coders
    and :func:`clip_and_resize` are elementwise: the same values as decoding every anchor)."""

    def __init__(
        self, logger: _DenseHeadLogger, regression: Tensor, anchors: Tensor, n_anchors: int
    ) -> None:
        self.logger = logger
        self.regression = regression  # [B * A, 4]
        self.anchors = anchors  # [B * A, 4]
        self.n_anchors = n_anchors

    def decoded(self, flat: Tensor) -> Tensor:
        """``Tensor[R, 4]``: the decoded boxes of flat anchor rows ``flat`` (network input)."""
        return self.logger._decode(
            self.regression.index_select(0, flat), self.anchors.index_select(0, flat)
        )

    def full(self) -> Tensor:
        return self.logger._decode(self.regression, self.anchors)

    def of_rows(self, live: Tensor | None, live_rows: list[int] | None = None) -> PairBoxes:
        """The :class:`PairBoxes` of a match over every anchor (``live`` None) or over the anchor
        rows ``live`` (ascending, ``live_rows`` of them per image), clipped and resized as the
        model returns them."""
        state = self.logger._state
        net_sizes, input_sizes = state["net_sizes"], state["input_sizes"]
        n_images = len(net_sizes)
        counts = [self.n_anchors] * n_images if live_rows is None else live_rows
        first = [sum(counts[:i]) for i in range(n_images)]

        def of(image: int, rows: Tensor, labels: Tensor) -> Tensor:
            # Class-agnostic boxes: each anchor decoded once, however many of its classes are
            # asked for (rows come in ascending order).
            unique, inverse = torch.unique_consecutive(rows, return_inverse=True)
            flat = unique + first[image]
            if live is not None:
                flat = live.index_select(0, flat)
            size = net_sizes[image]
            boxes = clip_and_resize(
                self.decoded(flat), [flat.shape[0]], [size], [size], [input_sizes[image]]
            )
            return boxes.index_select(0, inverse)

        def full() -> Tensor:
            boxes = self.full() if live is None else self.full()[live]
            return clip_and_resize(boxes, counts, net_sizes, net_sizes, input_sizes)

        return PairBoxes(of, full)

    def of_candidates(self, candidates: Tensor) -> Tensor:
        """``gather_rows`` of the boxes clipped to the network input, for ``candidates``
        ``Tensor[B, D]`` (flat anchor rows, -1 in padding: zeros there)."""
        b, d = candidates.shape
        net_sizes = self.logger._state["net_sizes"]
        if candidates.numel() == 0 or self.regression.shape[0] == 0:
            return self.regression.new_zeros((b, d, 4))
        boxes = self.decoded(candidates.clamp(min=0).reshape(-1))
        boxes = clip_and_resize(boxes, [d] * b, net_sizes, net_sizes, net_sizes).reshape(b, d, 4)
        return torch.where((candidates >= 0)[..., None], boxes, torch.zeros((), dtype=boxes.dtype))


@register_logger(priority=10)
class RetinaNetLogger(_DenseHeadLogger):
    """torchvision RetinaNet (v1 and v2): sigmoid class scores per anchor; logits are the anchor's class row."""

    family = "torchvision RetinaNet (v1, v2)"
    activation = "sigmoid"

    @staticmethod
    def detect(model: nn.Module) -> bool:
        return isinstance(model, RetinaNet)

    def _get_n_class(self, model: nn.Module) -> int:
        return int(_parts(model).head.classification_head.num_classes)

    def _scores(self, head: dict) -> Tensor:
        return torch.sigmoid(head["cls_logits"])

    def _decode(self, regression: Tensor, anchors: Tensor) -> Tensor:
        return _parts(self._core).box_coder.decode_single(regression, anchors)


@register_logger(priority=10)
class FCOSLogger(_DenseHeadLogger):
    """torchvision FCOS: score = sqrt(sigmoid(class) * sigmoid(centerness)); logits are the location's class row.

    The uncertainty columns are those of the class logits (per-class sigmoid), without centerness.
    """

    family = "torchvision FCOS"
    activation = "sigmoid_centerness"

    @staticmethod
    def detect(model: nn.Module) -> bool:
        return isinstance(model, FCOS)

    def _get_n_class(self, model: nn.Module) -> int:
        return int(_parts(model).head.classification_head.num_classes)

    def _scores(self, head: dict) -> Tensor:
        return torch.sqrt(torch.sigmoid(head["cls_logits"]) * torch.sigmoid(head["bbox_ctrness"]))

    def _centerness(self, head: dict) -> Tensor | None:
        return head["bbox_ctrness"].reshape(-1)

    def _decode(self, regression: Tensor, anchors: Tensor) -> Tensor:
        return _parts(self._core).box_coder.decode(regression, anchors)


@register_logger(priority=10)
class SSDLogger(_DenseHeadLogger):
    """torchvision SSD and SSDlite: softmax over classes, class 0 is background, top-k per class.

    No embedding: SSD's feature maps have different channel counts per level.
    """

    family = "torchvision SSD, SSDlite"
    first_label = 1
    fpn_embeddings = False
    uncertainty_kind = SOFTMAX
    topk_per_class = True

    @staticmethod
    def detect(model: nn.Module) -> bool:
        return isinstance(model, SSD)

    def _get_n_class(self, model: nn.Module) -> int:
        return int(_parts(model).head.classification_head.num_columns)

    def _scores(self, head: dict) -> Tensor:
        return torch.softmax(head["cls_logits"], dim=-1)

    def _decode(self, regression: Tensor, anchors: Tensor) -> Tensor:
        return _parts(self._core).box_coder.decode_single(regression, anchors)
