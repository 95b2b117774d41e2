"""Hugging Face ``transformers`` DETR-style detectors: DETR, Deformable DETR, RT-DETR (v1, v2).

These models return raw per-query outputs (``logits``, ``pred_boxes`` in
relative ``cxcywh``, the decoder's ``last_hidden_state``); the detections are
what the image processor's ``post_process_object_detection(outputs,
threshold=..., target_sizes=...)`` makes of them. The logger returns the
model's output object unchanged and logs exactly those detections, reproduced
on the device in one pass (no host sync, no loop over detections):

* DETR: softmax over classes plus "no object" (the last column); per query the
  best real class; kept where its probability is above the threshold, in
  query order.
* Deformable DETR, RT-DETR: per-class sigmoid; the top ``k`` (query, class)
  pairs over the whole ``[queries x classes]`` table, best first (RT-DETR:
  ``k`` = number of queries; Deformable DETR: the processor's ``top_k``,
  100 by default); kept above the threshold. One query can give several
  detections (different classes): each logs that query's logit vector.

There is no NMS in these models: ``iou_thresh`` is refused.

pyodlog never imports ``transformers``: ``detect`` matches the model type's
classes by module and name.
"""

from __future__ import annotations

from collections.abc import Mapping
from inspect import signature
from typing import Any

import torch
from torch import Tensor, nn

from pyodlog.models.common import gather_rows, host_tensor, with_uncertainty
from pyodlog.models.registry import register_logger
from pyodlog.monitoring.detection_logger import (
    NmsConfig,
    ObjectDetectionTorchLogger,
    unwrap_model,
)
from pyodlog.monitoring.validation import (
    check_img_sizes,
)
from pyodlog.ops.uncertainty import SIGMOID, SOFTMAX
from pyodlog.structures import DetectionBatch

__all__ = ["TransformersDetrLogger"]

#: ``post_process_object_detection``'s default ``threshold`` (same for every family here).
DEFAULT_SCORE_THRESH = 0.5
#: Deformable DETR's ``post_process_object_detection`` default ``top_k``.
DEFORMABLE_DEFAULT_TOP_K = 100

_BASE_INIT = signature(ObjectDetectionTorchLogger.__init__)


#: The handled ``transformers`` classes, by name, and how their detections are selected.
_KINDS = {
    "DetrForObjectDetection": "softmax",
    "DeformableDetrForObjectDetection": "deformable",
    "RTDetrForObjectDetection": "rtdetr",
    "RTDetrV2ForObjectDetection": "rtdetr",
}


def _kind_of(model: nn.Module) -> str | None:
    """How ``model``'s detections are selected; None if it is none of the handled classes.

    Matches the classes of the type's MRO by module and name, so nothing is
    imported (``transformers`` included).
    """
    for cls in type(model).__mro__:
        module = cls.__module__ or ""
        if module.startswith("transformers.") and cls.__name__ in _KINDS:
            return _KINDS[cls.__name__]
    return None


@register_logger(priority=10)
class TransformersDetrLogger(ObjectDetectionTorchLogger):
    """Logs Hugging Face ``DetrForObjectDetection``, ``DeformableDetrForObjectDetection``,
    ``RTDetrForObjectDetection`` and ``RTDetrV2ForObjectDetection``.

    Per detection: the box, score and label that the processor's
    ``post_process_object_detection`` gives, the query's full logit vector
    (DETR: ``num_labels + 1`` values, the last one "no object"; the others
    ``num_labels`` per-class sigmoid logits), the query index as
    ``candidate_index``, and as embedding the decoder's last hidden state of
    that query (``outputs.last_hidden_state[b, query]``, ``d_model`` values:
    the input of the class head).

    Thresholds: ``score_thresh`` is the processor's ``threshold`` (default
    0.5, the processor's default); ``max_detections_per_image`` is Deformable
    DETR's ``top_k`` (default 100) and refused for DETR and RT-DETR, whose
    post-processing has no such cap; ``iou_thresh`` is refused (no NMS).
    Nothing is set on the model: its output is its own raw output.

    The call (see :meth:`__call__`): ``logger(pixel_values, pixel_mask=...)``,
    ``logger(pixel_values=..., pixel_mask=...)`` or ``logger(inputs)`` with the
    processor's output mapping (``model(**inputs)``).
    """

    family = "Hugging Face DETR, Deformable DETR, RT-DETR (v1, v2)"

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        # Checked before the base class touches any file or registers a hook.
        bound = _BASE_INIT.bind(self, model, *args, **kwargs)
        kind = _kind_of(unwrap_model(model)) if isinstance(model, nn.Module) else None
        if kind is not None:
            self._check_thresholds(
                kind,
                bound.arguments.get("iou_thresh"),
                bound.arguments.get("max_detections_per_image"),
            )
        super().__init__(model, *args, **kwargs)

    # -- the subclass contract ------------------------------------------------

    @staticmethod
    def detect(model: nn.Module) -> bool:
        return _kind_of(model) is not None

    def _get_n_class(self, model: nn.Module) -> int:
        detector: Any = model  # a transformers model: its attributes are not nn.Module's
        if _kind_of(model) == "softmax":
            return int(detector.class_labels_classifier.out_features)
        return int(detector.config.num_labels)

    @staticmethod
    def _check_thresholds(kind: str | None, iou_thresh: Any, max_detections: Any) -> None:
        if iou_thresh is not None:
            raise ValueError(
                f"iou_thresh={iou_thresh!r}: DETR-style models have no NMS (each query predicts at most one "
                "object, the detections are what post_process_object_detection keeps): leave iou_thresh None"
            )
        if max_detections is not None and kind != "deformable":
            raise ValueError(
                f"max_detections_per_image={max_detections!r}: the post-processing of DETR and RT-DETR "
                "(post_process_object_detection) has no cap on detections, so the log could not match it: "
                "leave it None (only Deformable DETR takes it, as the processor's top_k)"
            )

    def _apply_nms_config(self, model: nn.Module, nms_config: NmsConfig) -> None:
        """Keeps the post-processing settings (the model itself has none to set)."""
        kind = _kind_of(model)
        self._check_thresholds(kind, nms_config.iou_thresh, nms_config.max_detections_per_image)
        self._kind = kind
        self.score_thresh = (
            DEFAULT_SCORE_THRESH if nms_config.score_thresh is None else nms_config.score_thresh
        )
        if kind == "deformable":
            self.top_k: int | None = (
                DEFORMABLE_DEFAULT_TOP_K
                if nms_config.max_detections_per_image is None
                else nms_config.max_detections_per_image
            )
        else:
            self.top_k = None

    def _register_model_hooks(self, model: nn.Module) -> None:
        """No family hooks: logits, boxes and the decoder's last hidden state are in the output."""

    # -- the call ---------------------------------------------------------------

    def __call__(
        self,
        model_input: Tensor | Mapping[str, Any] | None = None,
        input_ids: list[str] | None = None,
        dataset_type: str = "deploying",
        *,
        pixel_values: Tensor | None = None,
        pixel_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Runs the model once, records the call, and returns the model's output object unchanged.

        The model is called as ``model(pixel_values=..., pixel_mask=...)``, or
        ``model(**inputs)`` when ``model_input`` is a mapping such as the image
        processor's output (every key goes to the model: put other model
        arguments such as ``output_attentions`` there). ``input_ids`` and
        ``dataset_type`` are pyodlog's (one id per image; never passed to the
        model, unlike a text model's ``input_ids``).

        Args:
            model_input: ``pixel_values`` ``Tensor[B, 3, H, W]``, or a mapping with
                ``"pixel_values"`` (and optionally ``"pixel_mask"``); or None
                when ``pixel_values=`` is given.
            input_ids: one string per image; generated (uuid4) when None.
            dataset_type: e.g. 'train', 'val', 'test', 'deploying'.
            pixel_values: the images, as a keyword (instead of ``model_input``).
            pixel_mask: ``Tensor[B, H, W]``, 1 on real pixels, 0 on padding.
            **kwargs: ``img_sizes`` or ``target_sizes`` (the same thing: the
                original ``(h, w)`` per image, a list or a ``Tensor[B, 2]``,
                what you pass to ``post_process_object_detection``; boxes are
                logged in those coordinates), and the values of
                ``additional_fields``. Without sizes, the unpadded size of
                each image read from ``pixel_mask`` (one host read of a tiny
                tensor), else the ``pixel_values`` size.

        Returns:
            Exactly what ``model(pixel_values=..., pixel_mask=...)`` (or
            ``model(**inputs)``) returns, e.g. a ``DetrObjectDetectionOutput``.

        Raises:
            ValueError: invalid arguments (nothing is recorded then).
            RuntimeError: the model is in training mode.
        """
        model_kwargs = _model_kwargs(model_input, pixel_values, pixel_mask)
        with self._call_in_flight():  # LoggerClosedError once close() began
            return self._logged_call(model_kwargs, input_ids, dataset_type, kwargs)

    def _call_image_sizes(self, model_input: dict[str, Any], kwargs: dict) -> list[tuple[int, int]]:
        # The model takes keyword tensors; the sizes come from img_sizes/target_sizes or pixel_mask.
        return_dict = model_input.get(
            "return_dict", getattr(self._core.config, "return_dict", True)
        )
        if return_dict is False:
            raise ValueError(
                "return_dict=False makes the model return a plain tuple, which the logger cannot read: "
                "leave return_dict out (or True) and set model.config.return_dict = True"
            )
        n_images = int(model_input["pixel_values"].shape[0])
        return _call_img_sizes(kwargs, model_input, n_images)

    def _run_model(self, model_input: dict[str, Any]) -> Any:
        return self.model(**model_input)

    def _parse_model_output(
        self, model_output: Any, img_sizes: list[tuple[int, int]]
    ) -> DetectionBatch:
        logits = model_output.logits  # [B, Q, C]
        n_images, n_queries, n_classes = logits.shape
        device = logits.device
        if self._kind == "softmax":
            # DETR: per query the best real class (the last column is "no object").
            scores, labels = torch.softmax(logits, -1)[..., :-1].max(-1)
            keep = scores > self.score_thresh
            # The kept queries first, in query order (stable sort).
            query = torch.argsort((~keep).to(torch.int32), dim=1, stable=True)
            scores, labels, keep = (
                scores.gather(1, query),
                labels.gather(1, query),
                keep.gather(1, query),
            )
        else:
            # Deformable DETR, RT-DETR: the top k (query, class) pairs, best first.
            k = n_queries if self.top_k is None else min(self.top_k, n_queries * n_classes)
            scores, index = torch.topk(torch.sigmoid(logits).flatten(1), k, dim=-1)
            labels = index % n_classes
            query = torch.div(index, n_classes, rounding_mode="floor")
            keep = scores > self.score_thresh  # a prefix: scores are sorted
        first_row = torch.arange(n_images, device=device)[:, None] * n_queries
        rows = torch.where(keep, query + first_row, -1)
        boxes = gather_rows(model_output.pred_boxes.reshape(n_images * n_queries, 4), rows)
        cx, cy, w, h = boxes.unbind(-1)
        boxes = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
        scale = host_tensor([(w, h, w, h) for h, w in img_sizes], torch.float32, device)
        boxes = boxes * scale[:, None, :]
        zero = torch.zeros((), dtype=scores.dtype, device=device)
        picked = gather_rows(logits.reshape(n_images * n_queries, n_classes), rows)
        embeddings = None
        if self.log_embeddings:
            hidden = model_output.last_hidden_state
            embeddings = gather_rows(hidden.reshape(n_images * n_queries, -1), rows)
        return DetectionBatch(
            torch.where(keep[..., None], boxes, torch.zeros((), dtype=boxes.dtype, device=device)),
            torch.where(keep, scores, zero),
            torch.where(keep, labels, -1),
            picked,
            torch.where(keep, query, -1),
            keep.sum(1),
            list(img_sizes),
            embeddings,
            near_misses=None,  # not logged for DETR (no NMS; a query selection)
            **with_uncertainty(picked, SOFTMAX if self._kind == "softmax" else SIGMOID),
        )


def _model_kwargs(
    model_input: Any, pixel_values: Tensor | None, pixel_mask: Tensor | None
) -> dict[str, Any]:
    """The keyword arguments of the model call, checked."""
    if model_input is not None and pixel_values is not None:
        raise ValueError(
            "pixel_values given twice (as model_input and as pixel_values=): pass it once"
        )
    if model_input is None:
        model_input = pixel_values
    if isinstance(model_input, Mapping):
        out = dict(model_input)
        if "pixel_values" not in out:
            raise ValueError(
                f"the inputs mapping has no 'pixel_values' (keys: {sorted(out)}): pass the image "
                "processor's output, or the pixel_values tensor"
            )
        if pixel_mask is not None:
            if out.get("pixel_mask") is not None:
                raise ValueError(
                    "pixel_mask given twice (in the inputs mapping and as pixel_mask=): pass it once"
                )
            out["pixel_mask"] = pixel_mask
    elif isinstance(model_input, Tensor):
        out = {"pixel_values": model_input}
        if pixel_mask is not None:
            out["pixel_mask"] = pixel_mask
    else:
        raise ValueError(
            "pass the images as logger(pixel_values, pixel_mask=...), logger(pixel_values=...) or "
            f"logger(inputs) with the image processor's output; got {type(model_input).__name__}"
        )
    values = out["pixel_values"]
    if not isinstance(values, Tensor) or values.dim() != 4:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"pixel_values must be a Tensor[B, 3, H, W], got {shape}")
    mask = out.get("pixel_mask")
    if mask is not None and (
        not isinstance(mask, Tensor) or tuple(mask.shape) != (values.shape[0], *values.shape[-2:])
    ):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"pixel_mask must be a Tensor[B, H, W] matching pixel_values {tuple(values.shape)}, got {shape}"
        )
    return out


def _call_img_sizes(
    kwargs: dict, model_input: dict[str, Any], n_images: int
) -> list[tuple[int, int]]:
    """The original size of each image: ``img_sizes`` / ``target_sizes``, else from ``pixel_mask``, else the input size."""
    img_sizes, target_sizes = kwargs.pop("img_sizes", None), kwargs.pop("target_sizes", None)
    if img_sizes is not None and target_sizes is not None:
        raise ValueError("img_sizes and target_sizes are the same thing: pass one of them")
    given = img_sizes if img_sizes is not None else target_sizes
    name = "img_sizes" if img_sizes is not None else "target_sizes"
    try:
        sizes = check_img_sizes(given, n_images)
    except ValueError as e:
        raise ValueError(str(e).replace("img_sizes", name)) from None
    if sizes is not None:
        return sizes
    mask = model_input.get("pixel_mask")
    if mask is not None:
        valid = mask != 0
        hw = torch.stack([valid.any(2).sum(1), valid.any(1).sum(1)], dim=1).tolist()
        if any(h == 0 or w == 0 for h, w in hw):
            raise ValueError(
                "pixel_mask has an image with no valid pixel: pass img_sizes=[(h, w), ...]"
            )
        return [(int(h), int(w)) for h, w in hw]
    height, width = (int(v) for v in model_input["pixel_values"].shape[-2:])
    return [(height, width)] * n_images
