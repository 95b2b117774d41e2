"""Ultralytics YOLO: the ``YOLO`` wrapper (detect task) and its inner ``DetectionModel``.

Ultralytics is AGPL-3.0 and an optional extra (``pip install pyodlog[yolo]``):
this module never imports it at import time; :meth:`UltralyticsYOLOLogger.detect`
looks at class and module names only, and ``ultralytics`` is imported (lazily,
for its ``scale_boxes``) only once a YOLO model was passed.

How a call is logged. YOLO's ``Detect`` head returns, in inference, the decoded
boxes with per-class sigmoid scores ``[B, 4 + C, A]`` and the raw head outputs
(pre-sigmoid class logits ``[B, C, A]``, the neck feature maps). A forward hook
on the head captures them. Ultralytics' ``non_max_suppression`` keeps, per
anchor, the best class if its score is above ``conf``, then runs NMS per image
on boxes offset by ``class * 7680`` (class-aware) or not (agnostic), then keeps
``max_det``. The logger feeds exactly those candidates (best-class score, the
offset boxes) to pyodlog's fused ``postprocess_detections``, whose NMS keeps
what ``torchvision.ops.nms`` keeps, in the same order: the kept anchors, hence
the logged detections, are those of the call's output (tested, both modes).
Boxes are taken back to the original image with Ultralytics' own
``scale_boxes`` arithmetic (letterbox gain and padding, then clipping).

With the ``YOLO`` wrapper, ``predict`` runs a fused deep copy of ``yolo.model``
that its predictor builds (and may rebuild when setup arguments change): the
hooks go on that copy, from an ``on_predict_start`` callback, and the per-batch
captures are closed by an ``on_predict_postprocess_end`` callback (the
predictor runs the model once per ``batch`` images, and once more to warm up
on a GPU).
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import roi_align

from pyodlog.models.common import (
    gather_rows,
    host_tensor,
    local_index,
    output_only_batch,
    reads_calls_as,
    returned_detections,
    with_uncertainty,
)
from pyodlog.models.registry import register_logger
from pyodlog.monitoring.detection_logger import (
    NmsConfig,
    ObjectDetectionTorchLogger,
    unwrap_model,
)
from pyodlog.monitoring.validation import (
    check_dataset_type,
    check_field_values,
    check_input_ids,
    check_targets,
)
from pyodlog.ops import postprocess_detections
from pyodlog.ops.compression import CompressedFeature
from pyodlog.ops.uncertainty import SIGMOID
from pyodlog.structures import DetectionBatch

__all__ = ["UltralyticsYOLOLogger"]

#: Ultralytics' per-class coordinate offset for class-aware NMS (``max_wh``).
MAX_WH = 7680
#: Ultralytics' cap on the candidates of an image that enter NMS (``max_nms``).
MAX_NMS = 30000
#: Ultralytics' predict defaults for what the logger maps its thresholds to.
PREDICT_DEFAULTS = {"conf": 0.25, "iou": 0.7, "max_det": 300}
#: The predict arguments that decide the detections.
NMS_KEYS = ("conf", "iou", "max_det", "classes", "agnostic_nms")
#: Predict arguments whose output the logger cannot log.
_REFUSED = {
    "stream": "it returns a generator the logger cannot record; iterate logger(...) calls instead",
    "embed": "it returns embeddings instead of detections; use log_embeddings",
    "augment": "test-time augmentation runs the head several times per image",
}


def _is_ultralytics(cls: type, name: str) -> bool:
    return cls.__name__ == name and cls.__module__.startswith("ultralytics.")


def _is_detection_model(model: Any) -> bool:
    """An Ultralytics ``DetectionModel`` (not a subclass: segment, pose, ...) with a ``Detect`` head."""
    if not _is_ultralytics(type(model), "DetectionModel"):
        return False
    layers = getattr(model, "model", None)
    return (
        isinstance(layers, nn.Sequential)
        and len(layers) > 0
        and _is_ultralytics(type(layers[-1]), "Detect")
    )


def _is_yolo_wrapper(model: Any) -> bool:
    """An ``ultralytics`` ``Model`` (``YOLO``) of the detect task holding a ``DetectionModel``."""
    if not any(_is_ultralytics(c, "Model") for c in type(model).__mro__):
        return False
    inner = getattr(model, "_modules", {}).get("model")
    return model.__dict__.get("task") == "detect" and _is_detection_model(inner)


def _inner_of(model: nn.Module) -> Any:
    """The ``DetectionModel`` (untyped Ultralytics code: its attributes are not ``nn.Module``'s)."""
    inner = model._modules["model"] if _is_yolo_wrapper(model) else model
    assert inner is not None  # _is_yolo_wrapper checked it
    return inner


def _prefixed(target_layers: Any) -> Any:
    """Paths into ``yolo.model`` as paths into the ``YOLO`` wrapper (``"model." + path``)."""
    if not isinstance(target_layers, Mapping):
        return target_layers
    out = {}
    for alias, spec in target_layers.items():
        if isinstance(spec, str):
            spec = f"model.{spec}"
        elif isinstance(spec, Mapping) and isinstance(spec.get("path"), str):
            spec = {**spec, "path": f"model.{spec['path']}"}
        out[alias] = spec
    return out


def _count_images(source: Any) -> int | None:
    """How many images a predict source holds, where its type tells (None: a path, a video, ...)."""
    if isinstance(source, (list, tuple)):
        return len(source)
    if isinstance(source, Tensor):
        return int(source.shape[0]) if source.dim() == 4 else 1
    if type(source).__module__ == "numpy" or hasattr(source, "getpixel"):  # ndarray, PIL image
        return 1
    return None


NmsArgs = tuple[float, float, int, list[int] | None, bool]
"""``(conf, iou, max_det, classes, agnostic)``."""


def _nms_args(values: Mapping[str, Any]) -> NmsArgs:
    """``(conf, iou, max_det, classes, agnostic)`` from predict-style arguments, checked."""
    conf, iou, max_det = values["conf"], values["iou"], values["max_det"]
    for name, value in (("conf", conf), ("iou", iou)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if isinstance(max_det, bool) or not isinstance(max_det, int) or max_det < 1:
        raise ValueError(f"max_det must be an int >= 1, got {max_det!r}")
    classes = values.get("classes")
    if classes is not None and not isinstance(classes, (list, tuple)):
        classes = [classes]
    if classes is not None and not all(
        isinstance(c, int) and not isinstance(c, bool) for c in classes
    ):
        raise ValueError(f"classes must be class indices (ints), got {values.get('classes')!r}")
    return (
        float(conf),
        float(iou),
        int(max_det),
        None if classes is None else [int(c) for c in classes],
        bool(values.get("agnostic_nms") or False),
    )


@register_logger(priority=10)
class UltralyticsYOLOLogger(ObjectDetectionTorchLogger):
    """Ultralytics YOLO detectors (v8 / 11 ``Detect`` heads): ``YOLO(...)`` of the detect task, or its ``DetectionModel``.

    * ``YOLO`` wrapper: ``logger(source, input_ids=..., **predict_kwargs)``
      returns exactly ``yolo.predict(source, **predict_kwargs)`` (a list of
      ``Results``); the image sizes come from the source. ``stream``,
      ``embed`` and ``augment`` are refused. ``target_layers`` paths are paths
      into ``yolo.model`` (e.g. ``"model.15"``); they are stored prefixed with
      ``"model."``.
    * ``DetectionModel``: ``logger(images)`` with a letterboxed ``[B, 3, H, W]``
      tensor returns exactly ``model(images)``; ``img_sizes`` gives the
      original sizes (boxes are mapped back as Ultralytics' ``scale_boxes``
      does, default the input size). ``conf``, ``iou``, ``max_det``,
      ``classes`` and ``agnostic_nms`` may be passed per call; they decide
      what is logged.

    ``score_thresh`` / ``iou_thresh`` / ``max_detections_per_image`` become the
    ``conf`` / ``iou`` / ``max_det`` of every call (a per-call value wins), so
    output and log agree. Logged per detection: the box in original-image
    coordinates, score and label, the anchor's pre-sigmoid class logits
    ``[C]``, the anchor index (``candidate_index``, in ``[0, A)``) and, with
    ``log_embeddings``, the neck features RoIAlign-pooled (1x1) at the box on
    every level, concatenated (``sum`` of the levels' channels: 448 for
    YOLOv8n).

    Exactness: equal to Ultralytics' ``non_max_suppression`` for float32
    heads; above ``max_nms`` (30000) candidates in one image, its unstable
    sort may keep another of equally scored candidates; its NMS time limit is
    not reproduced. End-to-end (NMS-free) inference is refused (YOLOv10's
    head; YOLO26 in end-to-end mode or with ``nms=False``); YOLO26 is logged
    through its NMS (one-to-many) head.
    """

    family = "Ultralytics YOLO (v8, 11, 26 detect heads, NMS inference)"

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        core = unwrap_model(model) if isinstance(model, nn.Module) else model
        self._wrapper = _is_yolo_wrapper(core)
        if self.detect(core):
            head = _inner_of(core).model[-1]
            if getattr(head, "end2end", False):
                raise ValueError(
                    "this YOLO head is in end-to-end mode (NMS-free one-to-one head, e.g. a YOLO26 checkpoint), "
                    "which pyodlog does not log yet: set model.model[-1].end2end = False to use its NMS head"
                )
        self._call_nms: ContextVar[NmsArgs | None] = ContextVar(
            f"pyodlog_yolo_nms_{id(self):x}", default=None
        )
        if self._wrapper:
            bound = inspect.signature(ObjectDetectionTorchLogger.__init__).bind(
                self, model, *args, **kwargs
            )
            if bound.arguments.get("target_layers") is not None:
                bound.arguments["target_layers"] = _prefixed(bound.arguments["target_layers"])
            super().__init__(*bound.args[1:], **bound.kwargs)
        else:
            super().__init__(model, *args, **kwargs)

    # -- the subclass contract ------------------------------------------------

    @staticmethod
    def detect(model: nn.Module) -> bool:
        """A ``YOLO`` of the detect task or a ``DetectionModel`` with a ``Detect`` head (names only: no import)."""
        return _is_detection_model(model) or _is_yolo_wrapper(model)

    def _get_n_class(self, model: nn.Module) -> int:
        return int(_inner_of(model).model[-1].nc)

    def _apply_nms_config(self, model: nn.Module, nms_config: NmsConfig) -> None:
        """Keeps the thresholds as the ``conf`` / ``iou`` / ``max_det`` of every call."""
        self._nms_defaults = {
            key: value
            for key, value in (
                ("conf", nms_config.score_thresh),
                ("iou", nms_config.iou_thresh),
                ("max_det", nms_config.max_detections_per_image),
            )
            if value is not None
        }

    def _init_tracer(self, model: nn.Module, layers: list) -> None:
        if not self._wrapper:
            super()._init_tracer(model, layers)
            return
        # predict runs a deep copy of yolo.model: target_layers are hooked there.
        super()._init_tracer(model, [])
        self._layer_specs = layers
        self._copy_lock = threading.Lock()
        self._hooked_copy: weakref.ref | None = None
        self._copy_handles: list = []

    def _register_model_hooks(self, model: nn.Module) -> None:
        if not self._wrapper:
            self._hook_detection_model(model)
            return
        self._callbacks = [
            ("on_predict_start", self._on_predict_start),
            ("on_predict_postprocess_end", self._on_postprocess_end),
        ]
        yolo: Any = model  # an ultralytics YOLO (untyped)
        for event, callback in self._callbacks:
            yolo.add_callback(event, callback)

    def _hook_detection_model(self, model: Any) -> None:
        self._add_forward_pre_hook(model, self._on_input)
        self._add_forward_hook(model.model[-1], self._on_head)

    def _remove_hooks(self) -> None:
        if self._wrapper:
            yolo: Any = self._core
            for event, callback in getattr(self, "_callbacks", []):
                callbacks = yolo.callbacks.get(event, [])
                if callback in callbacks:
                    callbacks.remove(callback)
            self._callbacks = []
        super()._remove_hooks()

    # -- hooks and callbacks ------------------------------------------------------

    def _on_input(self, module, inputs) -> None:
        self._state["net_shape"] = tuple(int(v) for v in inputs[0].shape[-2:])

    def _on_head(self, module, inputs, output) -> None:
        if not isinstance(output, tuple):
            raise RuntimeError(
                "the YOLO Detect head is in export mode (it returns decoded boxes only, no logits): "
                "set model.model[-1].export = False"
            )
        if getattr(module, "end2end", False):
            raise RuntimeError(
                "the YOLO head ran end-to-end (NMS-free one-to-one head), which pyodlog does not log yet: "
                "pass nms=True to predict (or set model.model[-1].end2end = False) to use its NMS head"
            )
        raw = output[1]
        if "one2many" in raw:
            raw = raw["one2many"]
        # The last forward wins: a warm-up run before the batch is superseded.
        self._state["forward"] = (self._state.get("net_shape"), output[0], raw["scores"], inputs[0])

    def _on_predict_start(self, predictor) -> None:
        if self._capture_now() is None:
            return  # yolo.predict called directly, not through the logger
        backend_model = getattr(getattr(predictor.model, "backend", None), "model", None)
        inner = unwrap_model(backend_model) if isinstance(backend_model, nn.Module) else None
        if inner is None or not _is_detection_model(inner):
            raise RuntimeError(
                f"the YOLO predictor runs a {type(inner).__name__}, not a PyTorch DetectionModel: "
                "pyodlog logs YOLO models loaded as PyTorch modules (.yaml or .pt)"
            )
        with self._copy_lock:
            if self._hooked_copy is not None and self._hooked_copy() is inner:
                return
            for handle in self._copy_handles:
                handle.remove()
            self._hooks = [h for h in self._hooks if h not in self._copy_handles]
            modules = dict(inner.named_modules())
            missing = [s.path for s in self._layer_specs if s.path[len("model.") :] not in modules]
            if missing:
                raise ValueError(
                    f"target_layers {missing} are not in the fused model that YOLO's predict runs (it fuses "
                    "BatchNorm into the convolutions): hook the Conv block or another module instead"
                )
            first = len(self._hooks)
            self._hook_detection_model(inner)
            for spec in self._layer_specs:
                self._add_forward_hook(modules[spec.path[len("model.") :]], self._layer_hook(spec))
            self._copy_handles = self._hooks[first:]
            self._hooked_copy = weakref.ref(inner)

    def _on_postprocess_end(self, predictor) -> None:
        capture = self._capture_now()
        if capture is None or not capture.capturing:
            return
        try:
            self._collect_batch(capture, predictor)
        except Exception as error:  # never into predict(): the call goes on, unlogged
            capture.fail(error)

    def _reads_results(self) -> bool:
        """Whether a sampled-out call's aggregates can be read from ``predict``'s ``Results``
        alone (``sampled_out_aggregates="output"``): not for a subclass with a parse of its own."""
        return reads_calls_as(
            self, UltralyticsYOLOLogger, ("_parse_model_output", "_collect_batch", "_detections")
        )

    def _collect_batch(self, capture, predictor) -> None:
        forward = capture.state.pop("forward", None)
        if forward is None:
            raise RuntimeError("the YOLO predictor ran no PyTorch forward that pyodlog could hook")
        # This batch's run of each target layer is its last one (a GPU warm-up runs before it).
        capture.state.setdefault("layer_runs", []).append(
            {spec.alias: len(capture.raw.get(spec.alias, ())) - 1 for spec in self._layer_specs}
        )
        if capture.output_only:  # its aggregates come from the Results: no detections computed
            return
        orig_sizes = [(int(r.orig_shape[0]), int(r.orig_shape[1])) for r in predictor.results]
        with torch.no_grad():  # the batch's detections now: its head outputs can go
            detections = self._detections(forward, orig_sizes, _nms_args(vars(predictor.args)))
        capture.state.setdefault("batches", []).append(detections)

    def _end_capture(self, capture) -> dict:
        """Keeps one run of each target layer per predictor batch, the batches concatenated."""
        runs = capture.state.pop("layer_runs", None) if self._wrapper else None
        if runs:
            captured = {}
            for alias, calls in list(capture.raw.items()):
                kept = [r[alias] for r in runs if r.get(alias, -1) >= 0]
                by_leaf: dict[str, list] = {}
                for (name, index), feature in capture.captured.items():
                    if name.split("/", 1)[0] == alias and index in kept:
                        by_leaf.setdefault(name, []).append(feature)
                outputs = [calls[i] for i in kept]
                if all(isinstance(o, Tensor) for o in outputs) and _mergeable(by_leaf):
                    capture.raw[alias] = [outputs[0] if len(outputs) == 1 else torch.cat(outputs)]
                    for name, features in by_leaf.items():
                        captured[(name, 0)] = _cat_features(features)
                else:  # one entry per run, as the tracer names them
                    capture.raw[alias] = outputs
                    for (name, index), feature in capture.captured.items():
                        if name.split("/", 1)[0] == alias and index in kept:
                            captured[(name, kept.index(index))] = feature
            capture.captured = captured
        return super()._end_capture(capture)

    # -- the call -------------------------------------------------------------------

    def _logged_call(
        self, model_input: Any, input_ids: list[str] | None, dataset_type: str, kwargs: dict
    ) -> Any:
        nms = {key: kwargs.pop(key) for key in NMS_KEYS if key in kwargs}
        if not self._wrapper:
            args = _nms_args(
                {**PREDICT_DEFAULTS, **self._nms_defaults, **nms}
            )  # checked before the call
            token = self._call_nms.set(args)
            try:
                return super()._logged_call(model_input, input_ids, dataset_type, kwargs)
            finally:
                self._call_nms.reset(token)
        if "img_sizes" in kwargs:
            raise ValueError(
                "img_sizes is not taken with a YOLO model: predict reads each image's size from the "
                "source, and boxes are logged in those coordinates"
            )
        for key, why in _REFUSED.items():
            if kwargs.get(key):
                raise ValueError(f"{key}={kwargs[key]!r} cannot be logged: {why}")
        if kwargs.get("nms") is False:
            raise ValueError(
                "nms=False runs YOLO's end-to-end (NMS-free) head, which pyodlog does not log yet: "
                "leave nms out (or pass nms=True) to use its NMS head"
            )
        raw_targets = kwargs.pop("targets", None)  # ground truth: logged, never passed to predict
        names = {spec.name for spec in self._field_specs}
        field_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in names}
        predict_kwargs = {**self._nms_defaults, **nms, **kwargs}
        dataset_type = check_dataset_type(dataset_type)
        n_known = _count_images(model_input)
        if n_known is not None:
            check_input_ids(input_ids, n_known)
            check_field_values(self._field_specs, field_kwargs, n_known)
        # Checked before predict runs when the source's image count is known.
        targets = check_targets(raw_targets, n_known, self.n_class) if n_known is not None else None
        timestamp = time.time()
        # Sampling's draw before predict runs, when the source says how many images it holds (a
        # folder or a stream is drawn by the writer, from the output): a call nothing can keep
        # any more records only what the always-on aggregates need (README "Sampling").
        drawn_ids: list[str] | None = None
        decision = None
        if self._sampling is not None and n_known is not None:
            drawn_ids = check_input_ids(input_ids, n_known) or [
                uuid.uuid4().hex for _ in range(n_known)
            ]
            decision = self._sampling.before_call(dataset_type, drawn_ids, False)
        sampled_out = decision is not None and decision.sampled_out
        output_only = decision is not None and decision.output_only and self._reads_results()
        with self._call_capture(sampled_out, output_only) as capture:
            yolo: Any = self.model
            output = yolo.predict(model_input, **predict_kwargs)

            def identities() -> tuple[list[str], list[tuple[int, int]], dict[str, Any]]:
                # Known only from the output (a source whose image count disagrees with
                # input_ids is then a logging failure: the call still returns its output).
                img_sizes = [(int(r.orig_shape[0]), int(r.orig_shape[1])) for r in output]
                n_images = len(img_sizes)
                ids = (
                    drawn_ids
                    if drawn_ids is not None and len(drawn_ids) == n_images
                    else check_input_ids(input_ids, n_images)
                    or [uuid.uuid4().hex for _ in range(n_images)]
                )
                return ids, img_sizes, check_field_values(self._field_specs, field_kwargs, n_images)

            record = None
            try:
                if raw_targets is not None and targets is None:
                    targets = check_targets(raw_targets, len(output), self.n_class)
            except ValueError as error:  # the model answered: counted, never raised
                self._logging_failed(error)
            else:
                record = self._record_of_call(
                    capture,
                    output,
                    identities,
                    dataset_type,
                    timestamp,
                    targets=targets,
                )
        if record is not None:
            self._hand_over(record, decision)
        return output

    def _output_only_detections(
        self, output: Any, img_sizes: list[tuple[int, int]]
    ) -> DetectionBatch | None:
        """``predict``'s ``Results`` alone (their boxes, scores and classes, copied: the values
        the parse logs), for a call sampled out with ``sampled_out_aggregates="output"``; None
        (parsed) for a subclass with a parse of its own, or an output of another kind."""
        if not self._reads_results():
            return None
        returned = []
        for result in output:
            found = getattr(result, "boxes", None)
            xyxy, conf, cls = (getattr(found, k, None) for k in ("xyxy", "conf", "cls"))
            if not all(isinstance(t, Tensor) for t in (xyxy, conf, cls)):
                return None
            returned.append({"boxes": cast(Tensor, xyxy).float(), "scores": conf, "labels": cls})
        if not returned:
            return None
        detections = returned_detections(
            returned, len(img_sizes), f"{type(self).__name__}._output_only_detections"
        )
        return output_only_batch(detections, detections.boxes, img_sizes)

    def _parse_model_output(
        self, model_output: Any, img_sizes: list[tuple[int, int]]
    ) -> DetectionBatch:
        if self._wrapper:
            parts = self._state.get("batches", [])
        else:
            nms = self._call_nms.get()
            if nms is None:
                raise RuntimeError("a DetectionModel call ran without its NMS settings")
            parts = [self._detections(self._state["forward"], list(img_sizes), nms)]
        if sum(p[0].shape[0] for p in parts) != len(img_sizes):
            raise RuntimeError(
                f"pyodlog captured {sum(p[0].shape[0] for p in parts)} images of YOLO's head for "
                f"{len(img_sizes)} results"
            )
        fields = [
            None if any(t is None for t in ts) else ts[0] if len(ts) == 1 else torch.cat(ts)
            for ts in zip(*parts)
        ]
        boxes, scores, labels, logits, candidates, counts, embeddings = fields
        if (
            boxes is None
            or scores is None
            or labels is None
            or logits is None
            or candidates is None
            or counts is None
        ):
            raise RuntimeError("a YOLO batch was captured without its detections")
        return DetectionBatch(
            boxes,
            scores,
            labels,
            logits,
            candidates,
            counts,
            list(img_sizes),
            embeddings,
            near_misses=None,  # not logged for YOLO (its NMS runs in Ultralytics)
            **with_uncertainty(logits, SIGMOID),  # YOLO's head: per-class sigmoid
        )

    def _detections(
        self,
        forward: tuple,
        orig_sizes: list[tuple[int, int]],
        nms: tuple[float, float, int, list[int] | None, bool],
    ) -> tuple:
        """One predictor batch: Ultralytics' NMS through the fused operator, then the per-detection fields."""
        net_shape, decoded, logits, feats = forward
        conf, iou, max_det, classes, agnostic = nms
        pred = decoded.transpose(1, 2)  # [B, A, 4 + C]
        n_images, n_anchors, _ = pred.shape
        n_class = logits.shape[1]
        device = pred.device
        # xywh -> xyxy with Ultralytics' xywh2xyxy arithmetic.
        xy, half_wh = pred[..., :2], pred[..., 2:4] / 2
        xyxy = torch.cat((xy - half_wh, xy + half_wh), dim=-1)
        # The best class of each anchor (first of equal scores, as Ultralytics' cls.max(1)),
        # reduced over the contiguous [B, C, A] layout rather than the transposed view.
        score, label = decoded[:, 4 : 4 + n_class].max(dim=1)
        if classes is not None:
            allowed = (label[..., None] == host_tensor(classes, torch.long, device)).any(-1)
            score = torch.where(
                allowed, score, torch.full((), -1.0, dtype=score.dtype, device=device)
            )
        offset = label.to(pred.dtype) * (0 if agnostic else MAX_WH)
        net_sizes = host_tensor([net_shape] * n_images, torch.long, device)
        out = postprocess_detections(
            score.reshape(-1, 1),
            (xyxy + offset[..., None]).reshape(-1, 4),
            torch.arange(n_images, device=device).repeat_interleave(n_anchors),
            net_sizes,
            net_sizes,
            conf,
            iou,
            max_det,
            topk=MAX_NMS,
            clip=False,
        )
        candidates = out.candidates
        valid = candidates >= 0
        net_boxes = gather_rows(xyxy.reshape(-1, 4), candidates)
        labels = torch.where(
            valid,
            gather_rows(label.reshape(-1, 1), candidates).squeeze(-1),
            torch.full((), -1, dtype=torch.long, device=device),
        )
        local = local_index(candidates, torch.arange(n_images, device=device) * n_anchors)
        # The kept anchors' columns of [B, C, A] only (no transposed copy of every anchor).
        picked = logits.gather(2, local.clamp(min=0)[:, None, :].expand(-1, n_class, -1))
        anchor_logits = torch.where(
            valid[..., None],
            picked.transpose(1, 2),
            torch.zeros((), dtype=logits.dtype, device=device),
        )
        boxes = _unletterbox(net_boxes, net_shape, orig_sizes)
        embeddings = (
            _roi_embeddings(feats, net_boxes, net_shape, valid) if self.log_embeddings else None
        )
        return (
            boxes.float(),
            out.scores,
            labels,
            anchor_logits,
            local,
            out.counts,
            embeddings,
        )


def _mergeable(by_leaf: dict[str, list]) -> bool:
    """Whether each leaf's per-batch features can be concatenated along the batch dimension."""
    return all(
        len({(f.method, f.dtype, f.pooled_to, f.original_shape[1:]) for f in fs}) == 1
        and all(len(f.original_shape) >= 2 and f.payload.dim() >= 2 for f in fs)
        for fs in by_leaf.values()
    )


def _cat_features(features: list[CompressedFeature]) -> CompressedFeature:
    """Per-batch compressed captures of one layer as one (quantisation rows are per sample)."""
    if len(features) == 1:
        return features[0]
    first = features[0]

    def cat(name: str) -> Tensor | None:
        parts = [getattr(f, name) for f in features]
        return None if parts[0] is None else torch.cat(parts)

    return dataclasses.replace(
        first,
        payload=torch.cat([f.payload for f in features]),
        scale=cat("scale"),
        offset=cat("offset"),
        original_shape=(sum(f.original_shape[0] for f in features), *first.original_shape[1:]),
    )


def _unletterbox(
    boxes: Tensor, net_shape: tuple[int, int], orig_sizes: list[tuple[int, int]]
) -> Tensor:
    """``Tensor[B, D, 4]`` letterboxed-input boxes -> original images, by Ultralytics' ``scale_boxes``.

    The same scalar arithmetic as the predictor (gain and padding from the two
    shapes, then clipping), applied once per distinct original size.
    """
    from ultralytics.utils.ops import scale_boxes  # a YOLO model was passed: AGPL code may load

    boxes = boxes.clone()
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(orig_sizes):
        groups.setdefault(size, []).append(i)
    if len(groups) == 1:
        return cast(Tensor, scale_boxes(net_shape, boxes, orig_sizes[0]))  # a tensor for a tensor
    for size, rows in groups.items():
        index = host_tensor(rows, torch.long, boxes.device)
        boxes[index] = cast(Tensor, scale_boxes(net_shape, boxes[index], size))
    return boxes


def _roi_embeddings(
    feats: list[Tensor], boxes: Tensor, net_shape: tuple[int, int], valid: Tensor
) -> Tensor:
    """``Tensor[B, D, sum(F)]``: every level's map RoIAlign-pooled (1x1) at each box, concatenated.

    RoIAlign as torchvision's ``roi_align(output_size=1, sampling_ratio=2,
    aligned=True)`` on the level (boxes clipped to the network input first).
    Ultralytics runs its CPU models channels-last, where ``roi_align`` would
    first copy every feature map to NCHW; there the same bilinear samples are
    gathered straight from the channels-last rows (``embedding_bag`` with the
    bilinear weights), which costs per box, not per map (equal to ``roi_align``
    up to float rounding, tested).
    """
    b, d, _ = boxes.shape
    dtype, device = feats[0].dtype, boxes.device
    height, width = net_shape
    clipped = torch.stack(
        (
            boxes[..., 0].clamp(0, width),
            boxes[..., 1].clamp(0, height),
            boxes[..., 2].clamp(0, width),
            boxes[..., 3].clamp(0, height),
        ),
        dim=-1,
    ).float()
    if b * d and all(
        f.dim() == 4 and f.is_contiguous(memory_format=torch.channels_last) for f in feats
    ):
        pooled = _roi_align_channels_last(feats, clipped, width)
    else:
        batch_index = torch.arange(b, device=device, dtype=torch.float32)[:, None, None]
        rois = torch.cat((batch_index.expand(b, d, 1), clipped), dim=-1).reshape(-1, 5).to(dtype)
        pooled = [
            roi_align(f, rois, 1, f.shape[-1] / width, sampling_ratio=2, aligned=True).reshape(
                b, d, -1
            )
            for f in feats
        ]
    out = torch.cat(pooled, dim=-1)
    return torch.where(valid[..., None], out, torch.zeros((), dtype=dtype, device=device))


def _roi_align_channels_last(feats: list[Tensor], boxes: Tensor, width: int) -> list[Tensor]:
    """``roi_align(f, boxes, 1, f_w / width, sampling_ratio=2, aligned=True)`` of ``Tensor[B, D, 4]``
    boxes on each channels-last ``[B, C, h, w]`` map ``f``, without copying the maps: per
    level ``Tensor[B, D, C]``. The sample positions of all levels are computed at once."""
    b, d, _ = boxes.shape
    device = boxes.device

    def per_level(values) -> Tensor:
        return host_tensor(values, boxes.dtype, device)[:, None, None, None]

    h = per_level([f.shape[-2] for f in feats])
    w = per_level([f.shape[-1] for f in feats])
    start = boxes[None] * (w / width) - 0.5  # [L, B, D, 4]; aligned=True
    size = start[..., 2:] - start[..., :2]
    q = host_tensor([0.25, 0.75], boxes.dtype, device)  # 2 samples a side
    n = len(feats)
    xs = (start[..., 0, None] + q * size[..., 0, None])[..., None, :].expand(n, b, d, 2, 2)
    ys = (start[..., 1, None] + q * size[..., 1, None])[..., :, None].expand(n, b, d, 2, 2)
    xs, ys = xs.reshape(n, b, d, 4), ys.reshape(n, b, d, 4)
    inside = (ys >= -1) & (ys <= h) & (xs >= -1) & (xs <= w)
    y, x = ys.clamp(min=0), xs.clamp(min=0)
    y0, x0 = torch.minimum(y.floor(), h - 1), torch.minimum(x.floor(), w - 1)
    y = torch.where(y0 >= h - 1, y0, y)
    x = torch.where(x0 >= w - 1, x0, x)
    y1, x1 = torch.minimum(y0 + 1, h - 1), torch.minimum(x0 + 1, w - 1)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    first = torch.arange(b, device=device)[None, :, None, None] * (h * w).long()
    wl = w.long()
    y0, x0, y1, x1 = y0.long() * wl, x0.long(), y1.long() * wl, x1.long()
    index = torch.stack(
        (first + y0 + x0, first + y0 + x1, first + y1 + x0, first + y1 + x1), dim=-1
    ).reshape(n, b * d, 16)
    weight = (torch.stack((hy * hx, hy * lx, ly * hx, ly * lx), dim=-1) * inside[..., None]) / 4
    weight = weight.reshape(n, b * d, 16)
    out = []
    for level, f in enumerate(feats):
        rows = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # a view: the map is channels-last
        out.append(
            F.embedding_bag(
                index[level], rows, per_sample_weights=weight[level].to(rows.dtype), mode="sum"
            ).reshape(b, d, -1)
        )
    return out
