"""ObjectDetectionTorchLogger: the abstract base of every model family's logger."""

from __future__ import annotations

import contextlib
import math
import threading
import time
import uuid
import weakref
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pyodlog.io.sink import SegmentStore, Sink
from pyodlog.io.thumbnails import check_log_images, thumbnail_source
from pyodlog.monitoring.deferred import (
    PARSE_SETTINGS,
    DeferredBudget,
    DeferredDetections,
    FrozenView,
    ParseSettings,
    deferrable,
    held_tensors,
    nbytes,
    torchvision_output_copy,
)
from pyodlog.monitoring.modes import refuse_cuda_graphs
from pyodlog.monitoring.monitoring_logger import MonitoringLogger
from pyodlog.monitoring.sampling import CallDecision, Sampling, check_sampling
from pyodlog.monitoring.tracer import CallCapture, ObjectDetectionTorchTracer
from pyodlog.monitoring.validation import (
    check_class_names,
    check_dataset_type,
    check_field_specs,
    check_field_values,
    check_img_sizes,
    check_input_ids,
    check_n_class,
    check_storage,
    check_target_layers,
    check_targets,
    check_thresholds,
)
from pyodlog.structures import CallRecord, DetectionBatch, DetectionOutput

if TYPE_CHECKING:
    from pyodlog.sync import SyncConfig

__all__ = [
    "DEFAULT_NEAR_MISS",
    "NmsConfig",
    "ObjectDetectionTorchLogger",
    "check_near_miss",
    "model_class_names",
    "resolve_class_names",
    "unwrap_model",
]


#: Near-miss candidates logged per image by default (``near_miss=``): README, "What the model
#: almost said", gives the overhead and storage this costs.
DEFAULT_NEAR_MISS = 32


def check_near_miss(near_miss: Any, near_miss_floor: Any) -> tuple[int, float | None]:
    """``near_miss`` and ``near_miss_floor`` checked; ValueError naming what is wrong."""
    if isinstance(near_miss, bool) or not isinstance(near_miss, int) or near_miss < 0:
        raise ValueError(
            f"near_miss must be an int >= 0 (near-miss candidates logged per image; 0 logs none), "
            f"got {near_miss!r}"
        )
    if near_miss_floor is not None and (
        isinstance(near_miss_floor, bool)
        or not isinstance(near_miss_floor, (int, float))
        or not math.isfinite(near_miss_floor)
    ):
        raise ValueError(
            f"near_miss_floor must be a finite score or None (half the model's score threshold), "
            f"got {near_miss_floor!r}"
        )
    return int(near_miss), None if near_miss_floor is None else float(near_miss_floor)


@dataclass
class NmsConfig:
    """The user-visible NMS decisions; None keeps the model's own value."""

    score_thresh: float | None = None
    iou_thresh: float | None = None
    max_detections_per_image: int | None = None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``DataParallel``, ``DistributedDataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class _ModelClaim:
    """The live loggers of one model and the thresholds they changed on it.

    A model has one set of thresholds, so while a logger is live on a model no
    other logger may change them; the values changed are restored when the
    last live logger on the model closes.
    """

    def __init__(self) -> None:
        self.loggers: weakref.WeakSet = weakref.WeakSet()
        #: (object, attribute, original value, value set), by weak reference to the object.
        self.changes: list[tuple[weakref.ref, str, Any, Any]] = []


_CLAIMS: weakref.WeakKeyDictionary[nn.Module, _ModelClaim] = weakref.WeakKeyDictionary()
_CLAIMS_LOCK = threading.RLock()


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        inner = ", ".join(sorted({type(v).__name__ for v in value})) or "nothing"
        return f"a {type(value).__name__} of {len(value)} ({inner})"
    return type(value).__name__


def _image_sizes(model_input: Any) -> list[tuple[int, int]]:
    """(h, w) of each input image, from tensor shapes only (no device access)."""
    if isinstance(model_input, Tensor):
        if model_input.dim() != 4:
            raise ValueError(
                f"model_input must be a list of [C, H, W] images or a [B, C, H, W] tensor, got shape {tuple(model_input.shape)}"
            )
        return [(int(model_input.shape[-2]), int(model_input.shape[-1]))] * model_input.shape[0]
    if (
        isinstance(model_input, (list, tuple))
        and model_input
        and all(isinstance(t, Tensor) and t.dim() == 3 for t in model_input)
    ):
        return [(int(t.shape[-2]), int(t.shape[-1])) for t in model_input]
    raise ValueError(
        "model_input must be a non-empty list of [C, H, W] image tensors or a [B, C, H, W] tensor, "
        f"got {type(model_input).__name__}"
    )


class ObjectDetectionTorchLogger(MonitoringLogger, ObjectDetectionTorchTracer, metaclass=ABCMeta):
    """Base MonitoringLogger for object detection with PyTorch models.

    Wrap a detector once; each call runs the model, returns exactly what the
    model returns, and hands a :class:`~pyodlog.structures.CallRecord` to the
    sink. Use :func:`pyodlog.create_logger` to pick the subclass for a model.

    Subclasses implement:

    * ``detect(model) -> bool`` (static): does this subclass handle ``model``?
    * ``_get_n_class(model) -> int``
    * ``_register_model_hooks(model)``: hooks (via ``self._add_forward_hook`` /
      ``self._add_forward_pre_hook``) that put what ``_parse_model_output``
      needs into ``self._state``.
    * ``_parse_model_output(model_output, img_sizes)`` -> one
      :class:`~pyodlog.structures.DetectionOutput` per image, or a padded
      :class:`~pyodlog.structures.DetectionBatch`.
    * optionally ``_apply_nms_config(model, nms_config)`` (setting attributes
      with ``self._set_model_threshold``).

    Args (see ``docs/specification.md``):
        model: the detector (``DataParallel``, ``DistributedDataParallel`` and
            ``torch.compile`` wrappers are looked through).
        model_name, version_name: identify the model; letters, digits, '-', '_', '.'.
        result_name: a named collection of records; None: the most recent one,
            or a new one named from the current UTC time.
        n_epoch: ``'latest'`` (resolved once, now), an int >= 0, or None (untagged).
        target_layers: ``{alias: "dotted.module.path"}`` or ``{alias: {"path",
            "compression" ("uint8", "float16", "bfloat16", "none"), "pool_to": (h, w)}}``.
        additional_fields: ``[{"name", "dtype", "default"?}]``, dtypes int32,
            int64, float32, float64, bool, str; values come from call kwargs.
        auto_sync: upload closed data in the background when an endpoint is set.
        force_table_recreate: start a result whose schema differs again; its records are moved aside
            to ``<result>.replaced-<UTC time>`` (never deleted); refused while another logger writes it.
        api_endpoint, api_key: default to ``PYODLOG_API_ENDPOINT`` / ``PYODLOG_API_KEY``.
        n_class: number of classes; read from the model when None.
        score_thresh, iou_thresh, max_detections_per_image: set the model's own
            thresholds; None keeps the model's. ``close()`` restores them (once
            no other live logger uses the model); while a logger is live on a
            model, another logger that would change them is refused (ValueError).
        sink: where records go (keyword only); default :class:`pyodlog.HDF5Store`
            (local HDF5 under ``PYODLOG_HOME`` or ``./pyodlog_data``).
        log_embeddings: record a per-detection embedding where the family has one.
        near_miss: near-miss candidates logged per image besides the detections (keyword only,
            int >= 0, default :data:`DEFAULT_NEAR_MISS`; 0 logs none): candidates the model dropped
            for a score under ``score_thresh`` (but above ``near_miss_floor``), suppressed by NMS,
            or cut by ``max_detections_per_image`` -- what ``ResultData.replay`` replays from.
            Families that support it: torchvision R-CNN, RetinaNet, FCOS, SSD/SSDlite; a custom
            subclass sets ``DetectionBatch.near_misses`` itself (see ``near_misses_of``).
        near_miss_floor: the lowest score (exclusive) of a below-score near-miss (keyword only);
            None: half the model's score threshold.
        sync_config: how to reach the collector (keyword only): TLS CA bundle,
            timeouts, retries, piece size (:class:`pyodlog.SyncConfig`).
        log_images: None (default) or ``{"max_side": 256, "quality": 85}`` (keyword only):
            store a downscaled JPEG thumbnail of each input image, made off the inference path
            (CPU images are only referenced by the call and encoded by the writer thread; GPU
            images are downscaled on the device and encoded there with nvJPEG by the writer).
            For image-tensor inputs (a list of ``[C, H, W]`` or a ``[B, C, H, W]`` tensor, float
            in [0, 1] or uint8); read back with ``ResultData.thumbnail(i)``.
        retention: the local disk budget (keyword only; :class:`pyodlog.Retention`). None or
            True: ``Retention()`` (default budget ``min(10 GiB, 25 % of the free space at start
            + what the result holds)``; only segments the collector acknowledged are ever
            deleted; unacknowledged data over the budget drops new records, counted). False: no
            budget. Only for a sink that stores segments (``HDF5Store``).
        metrics: Prometheus metrics (keyword only; ``pyodlog_*``, read from ``stats()`` at
            scrape time): None: on ``prometheus_client``'s default registry when
            ``prometheus_client`` is installed, else none; True: the default registry
            (``ImportError`` without ``prometheus_client``); a ``CollectorRegistry``: that one;
            False: none.
        class_names: the name of each label (keyword only): a list (index = label), a
            ``{label: name}`` dict, or torchvision weights (``weights.meta["categories"]``, e.g.
            ``class_names=FasterRCNN_ResNet50_FPN_Weights.DEFAULT``: torchvision models do not
            carry their names). None reads them from the model where it has them (Ultralytics
            ``names``, transformers ``config.id2label``). Stored in the result's schema
            (``result.json``, the export manifest); read back as ``ResultData.class_names``.
        sampling: which calls' rows are written (keyword only): None (every call), a rate in
            (0, 1], or a :class:`pyodlog.Sampling` policy; the always-on aggregates count every
            call either way (README "Sampling").
        storage: the stored precision of logits and embeddings (keyword only): None (compact:
            float16 logits, uint8 embeddings projected to 128 dimensions), ``"float32"`` (exact)
            or a :class:`pyodlog.RecordStorage`; part of the result's schema.
    """

    #: Human-readable name of the model family, for error messages.
    family: str = ""
    #: A call (logged or sampled out) on the CPU is parsed on the store's writer thread rather
    #: than on the call's (:mod:`pyodlog.monitoring.deferred`): the call keeps references to what
    #: its hooks captured, a copy of the returned boxes, scores and labels and the settings its
    #: parse reads (``near_miss``, ``near_miss_floor``, ``log_embeddings``, and the model's
    #: :attr:`parse_settings`, read through ``pyodlog.models.common.parts(self._core)``). Sound
    #: for a ``_parse_model_output`` that reads only those, the output, ``self._state`` and the
    #: model's stateless parts (e.g. its box coder; the subclass contract): it may run after the
    #: next call began, or after ``close()`` gave the model its thresholds back. A family whose
    #: parse reads anything else sets it False (every call is then parsed on its path).
    defer_parse: bool = True
    #: The attribute of release sampling2 (only sampled-out calls were deferred then), kept:
    #: False opts the family out of deferral altogether, as ``defer_parse = False``.
    defer_sampled_out: bool = True
    #: The model's settings a parse reads (dotted attribute paths from the unwrapped model; those
    #: it lacks are skipped), fixed at call time for a deferred parse: torchvision's thresholds of
    #: the one-stage heads and of R-CNN's ``roi_heads``.
    parse_settings: tuple[str, ...] = (
        "score_thresh",
        "nms_thresh",
        "detections_per_img",
        "topk_candidates",
        "roi_heads.score_thresh",
        "roi_heads.nms_thresh",
        "roi_heads.detections_per_img",
    )
    #: The most bytes of captured tensors the not-yet-parsed calls of one logger may
    #: hold (one call alone may hold more); past it, calls are parsed on their path.
    max_deferred_bytes: int = 512 << 20

    def __init__(
        self,
        model: nn.Module,
        model_name: str,
        version_name: str,
        result_name: str | None = None,
        n_epoch: str | int | None = "latest",
        target_layers: dict[str, Any] | None = None,
        additional_fields: list[dict] | None = None,
        auto_sync: bool = True,
        force_table_recreate: bool = False,
        api_endpoint: str | None = None,
        api_key: str | None = None,
        n_class: int | None = None,
        score_thresh: float | None = None,
        iou_thresh: float | None = None,
        max_detections_per_image: int | None = None,
        *,
        sink: Sink | None = None,
        log_embeddings: bool = True,
        sync_config: SyncConfig | None = None,
        log_images: dict[str, int] | None = None,
        retention: Any = None,
        metrics: Any = None,
        class_names: Any = None,
        sampling: float | Sampling | None = None,
        storage: Any = None,
        near_miss: int = DEFAULT_NEAR_MISS,
        near_miss_floor: float | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module detector (e.g. a torchvision detection model), got "
                f"{type(model).__name__}: pass the model object itself, not its name or path"
            )
        core = unwrap_model(model)
        if not type(self).detect(core):
            raise ValueError(
                f"{type(self).__name__} does not handle {type(core).__name__} models: use pyodlog.create_logger(model, ...) to pick the right logger"
            )
        # Everything is validated before any file is touched or hook registered.
        refuse_cuda_graphs(model)  # every family: a replay reuses the buffers the logger reads
        layers = check_target_layers(target_layers, core)
        self._field_specs = check_field_specs(additional_fields)
        nms = NmsConfig(*check_thresholds(score_thresh, iou_thresh, max_detections_per_image))
        model_n_class = self._get_n_class(core)
        n_class = check_n_class(n_class)
        if n_class is not None and n_class != model_n_class:
            raise ValueError(
                f"n_class={n_class} but the model's class head produces {model_n_class} classes: pass n_class={model_n_class} or None"
            )
        self._log_images = check_log_images(log_images)
        if not isinstance(log_embeddings, bool):
            raise ValueError(f"log_embeddings must be True or False, got {log_embeddings!r}")
        self.class_names = resolve_class_names(class_names, core, model_n_class)
        self._sampling = check_sampling(sampling)
        self._deferred_budget = DeferredBudget(self.max_deferred_bytes)
        self._storage = check_storage(storage)
        # Schema keys filled in by a default (not by the user): an older result lacking them is
        # continued as it was written (monitoring/wiring.open_with_class_names).
        self._schema_defaults: tuple[str, ...] = ("storage",) if storage is None else ()
        self.near_miss, self.near_miss_floor = check_near_miss(near_miss, near_miss_floor)
        self.model = model
        self.n_class = model_n_class
        self.log_embeddings = log_embeddings
        self._core = core
        # Thresholds before anything else is touched: a missing attribute or a conflict with another
        # live logger on this model refuses the logger before any file is opened or hook registered.
        with _CLAIMS_LOCK:
            self._claim: _ModelClaim | None = _CLAIMS.setdefault(core, _ModelClaim())
            self._threshold_changes: list[tuple[Any, str, Any, Any]] = []
            try:
                self._apply_nms_config(core, nms)
            except BaseException:
                self._undo_threshold_changes()
                self._claim = None
                raise
            for obj, attr, original, value in self._threshold_changes:
                self._claim.changes.append((weakref.ref(obj), attr, original, value))
            self._claim.loggers.add(self)
        try:
            self._init_rest(
                model_name,
                version_name,
                result_name,
                n_epoch,
                layers,
                force_table_recreate,
                auto_sync,
                api_endpoint,
                api_key,
                sink,
                sync_config,
                retention=retention,
                metrics=metrics,
            )
        except BaseException:
            # Nothing of a logger that failed to start stays behind: hooks, thresholds, sink.
            if hasattr(self, "_hooks"):
                self._remove_hooks()
            self._release_model()
            if getattr(self, "_closed", True) is False:
                # The constructor's own error is the one to report.
                with contextlib.suppress(Exception):
                    self._close_monitoring()
            raise

    # The settings a parse reads: those of its call while a deferred parse runs (fixed at call
    # time, :class:`~pyodlog.monitoring.deferred.ParseSettings`), else the logger's own.

    @property
    def near_miss(self) -> int:
        """Near-miss candidates logged per image (``near_miss=``)."""
        settings = PARSE_SETTINGS.get()
        if settings is not None and settings.owner is self:
            return settings.near_miss
        return self._near_miss

    @near_miss.setter
    def near_miss(self, value: int) -> None:
        self._near_miss = value

    @property
    def near_miss_floor(self) -> float | None:
        """The lowest score (exclusive) of a below-score near-miss (``near_miss_floor=``)."""
        settings = PARSE_SETTINGS.get()
        if settings is not None and settings.owner is self:
            return settings.near_miss_floor
        return self._near_miss_floor

    @near_miss_floor.setter
    def near_miss_floor(self, value: float | None) -> None:
        self._near_miss_floor = value

    @property
    def log_embeddings(self) -> bool:
        """Whether a per-detection embedding is logged (``log_embeddings=``)."""
        settings = PARSE_SETTINGS.get()
        if settings is not None and settings.owner is self:
            return settings.log_embeddings
        return self._log_embeddings

    @log_embeddings.setter
    def log_embeddings(self, value: bool) -> None:
        self._log_embeddings = value

    def _init_rest(
        self,
        model_name: str,
        version_name: str,
        result_name: str | None,
        n_epoch: str | int | None,
        layers: list,
        force_table_recreate: bool,
        auto_sync: bool,
        api_endpoint: str | None,
        api_key: str | None,
        sink: Sink | None,
        sync_config: SyncConfig | None,
        retention: Any = None,
        metrics: Any = None,
    ) -> None:
        core = self._core
        schema = {
            "n_class": self.n_class,
            "additional_fields": [f.to_dict() for f in self._field_specs],
            "target_layers": {s.alias: s.to_dict() for s in layers},
            "family": type(self).__name__,
        }
        if getattr(self, "class_names", None) is not None:
            schema["class_names"] = self.class_names
        if not self._storage.is_full:  # compact columns: how to read them is part of the schema
            schema["storage"] = self._storage.to_dict()
        self._init_monitoring(
            model_name,
            version_name,
            result_name,
            n_epoch,
            schema,
            force_table_recreate,
            auto_sync,
            api_endpoint,
            api_key,
            sink,
            sync_config,
            retention=retention,
            metrics=metrics,
        )
        self._init_tracer(core, layers)
        self._register_model_hooks(core)

    # -- the subclass contract ------------------------------------------------

    @staticmethod
    @abstractmethod
    def detect(model: nn.Module) -> bool:
        """Whether this subclass handles ``model`` (already unwrapped)."""

    @abstractmethod
    def _get_n_class(self, model: nn.Module) -> int:
        """Number of classes of the model's class head."""

    @abstractmethod
    def _register_model_hooks(self, model: nn.Module) -> None:
        """Registers the hooks that capture what per-detection logits need."""

    @abstractmethod
    def _parse_model_output(
        self, model_output: Any, img_sizes: list[tuple[int, int]]
    ) -> list[DetectionOutput] | DetectionBatch:
        """The batch's detections (boxes in ``img_sizes`` coordinates), from the output and ``self._state``.

        Returns either one :class:`~pyodlog.structures.DetectionOutput` per
        image (a single one is accepted for a one-image batch) or a padded
        :class:`~pyodlog.structures.DetectionBatch`; anything else is a
        ``TypeError`` naming this method. Log what the model returned: the
        detections of ``model_output`` (ties included), with the logits of the
        candidate each came from.

        Runs on the inference path: tensor operations only, no host sync, no
        Python loop over detections (a loop over images is fine). On the CPU, for an output in
        torchvision's format and a segment store, it runs on the store's writer thread after the
        call returned (:attr:`defer_parse`): it reads the settings of its call then (``near_miss``,
        ``near_miss_floor``, ``log_embeddings``, the model's :attr:`parse_settings` through
        ``pyodlog.models.common.parts(self._core)``).
        """

    def _apply_nms_config(self, model: nn.Module, nms_config: NmsConfig) -> None:
        """Sets the model's own thresholds; the default handles torchvision-style attributes.

        An override sets attributes with :meth:`_set_model_threshold`, so that
        ``close()`` restores them and another live logger cannot change them.
        """
        for argument, attr, value in (
            ("score_thresh", "score_thresh", nms_config.score_thresh),
            ("iou_thresh", "nms_thresh", nms_config.iou_thresh),
            ("max_detections_per_image", "detections_per_img", nms_config.max_detections_per_image),
        ):
            if value is not None:
                self._set_model_threshold(model, attr, value, argument)

    def _set_model_threshold(self, obj: Any, attr: str, value: Any, argument: str) -> None:
        """Sets ``obj.attr = value`` for this logger; restored when the last logger on the model closes.

        Raises:
            ValueError: ``obj`` has no such attribute, or another live logger
                uses this model and ``value`` differs from the model's.
        """
        if not hasattr(obj, attr):
            raise ValueError(
                f"{type(obj).__name__} has no {attr} to set for {argument}={value!r}: leave {argument} None"
            )
        current = getattr(obj, attr)
        if current == value:
            return
        others = [lg for lg in (self._claim.loggers if self._claim else ()) if lg is not self]
        if others:
            other = others[0]
            raise ValueError(
                f"{argument}={value!r} would change {type(obj).__name__}.{attr} from {current!r}, but another "
                f"live logger uses this model ({type(other).__name__} for {other.model_name}/{other.version_name}, "
                f"result {other.result_name!r}), and a model has one set of thresholds: close that logger first, "
                f"or pass {argument}=None to keep the model's {current!r}"
            )
        self._threshold_changes.append((obj, attr, current, value))
        setattr(obj, attr, value)

    def _undo_threshold_changes(self) -> None:
        for obj, attr, original, _ in reversed(self._threshold_changes):
            setattr(obj, attr, original)
        self._threshold_changes = []

    def _release_model(self) -> None:
        """Leaves the model; the last logger on it restores the thresholds loggers changed."""
        with _CLAIMS_LOCK:
            claim, self._claim = getattr(self, "_claim", None), None
            if claim is None:
                return
            claim.loggers.discard(self)
            if len(claim.loggers):
                return
            for ref, attr, original, value in reversed(claim.changes):
                obj = ref()
                # A value changed by hand since is the user's: it stays.
                if obj is not None and getattr(obj, attr, None) == value:
                    setattr(obj, attr, original)
            claim.changes.clear()

    def _as_detection_batch(self, parsed: Any, img_sizes: list[tuple[int, int]]) -> DetectionBatch:
        """What ``_parse_model_output`` returned, as a :class:`DetectionBatch` (checked: shapes only)."""
        n_images = len(img_sizes)
        method = f"{type(self).__name__}._parse_model_output"
        if isinstance(parsed, DetectionOutput) and n_images == 1:
            parsed = [parsed]
        if (
            isinstance(parsed, (list, tuple))
            and len(parsed) == n_images
            and all(isinstance(d, DetectionOutput) for d in parsed)
        ):
            widths = {int(d.logits.shape[-1]) for d in parsed}
            if widths - {self.n_class}:
                raise ValueError(
                    f"{method} returned logits with {sorted(widths)} columns, but the logger's n_class is "
                    f"{self.n_class}: each DetectionOutput.logits must be [N, {self.n_class}]"
                )
            return DetectionBatch.from_outputs(list(parsed), img_sizes)
        if isinstance(parsed, DetectionBatch) and len(parsed) == n_images:
            return parsed
        raise TypeError(
            f"{method} must return a list of one pyodlog.DetectionOutput per image ({n_images}) or a "
            f"pyodlog.DetectionBatch of {n_images} images, got {_describe(parsed)}"
        )

    # -- the call ---------------------------------------------------------------

    def __call__(
        self,
        model_input: Any,
        input_ids: list[str] | None = None,
        dataset_type: str = "deploying",
        **kwargs: Any,
    ) -> Any:
        """Runs the model once, records the call, and returns the model's raw output unchanged.

        Args:
            model_input: what the model takes (a list of ``[C, H, W]`` images for torchvision detectors).
            input_ids: one string per image; generated (uuid4) when None.
            dataset_type: e.g. 'train', 'val', 'test', 'deploying'.
            **kwargs: ``img_sizes`` (original ``(h, w)`` per image: boxes are
                logged in those coordinates; default the input sizes), ``targets``
                (ground truth, torchvision's format: ``[{"boxes": Tensor[N, 4] xyxy
                original-image pixels, "labels": Tensor[N]}, ...]``, one per image; checked
                before the model runs, logged beside the detections) and the
                values of ``additional_fields`` (one value for all images, or
                one per image).

        Returns:
            Exactly what ``model(model_input)`` returns.

        Raises:
            ValueError: invalid arguments (nothing is recorded then).
            RuntimeError: the model is in training mode.
        """
        with self._call_in_flight():  # LoggerClosedError once close() began; close() waits for it
            return self._logged_call(model_input, input_ids, dataset_type, kwargs)

    def _call_image_sizes(self, model_input: Any, kwargs: dict) -> list[tuple[int, int]]:
        """The original ``(h, w)`` of each image of a call, checked before the model runs.

        ``img_sizes`` (popped from ``kwargs``) when given, else the input images' sizes. A family
        whose model takes other inputs (keyword tensors, a processor's output) overrides this and
        :meth:`_run_model`.

        Raises:
            ValueError: the input or ``img_sizes`` is not what the model takes.
        """
        input_sizes = _image_sizes(model_input)
        return check_img_sizes(kwargs.pop("img_sizes", None), len(input_sizes)) or input_sizes

    def _run_model(self, model_input: Any) -> Any:
        """Runs the model once on a call's input (the hooks capture what they need meanwhile)."""
        return self.model(model_input)

    def _logged_call(
        self, model_input: Any, input_ids: list[str] | None, dataset_type: str, kwargs: dict
    ) -> Any:
        if self._core.training:
            raise RuntimeError(
                f"the {type(self._core).__name__} is in training mode, where detectors return losses or "
                "training outputs, not detections: call model.eval() before logging inference"
            )
        img_sizes = self._call_image_sizes(model_input, kwargs)
        n_images = len(img_sizes)
        ids = check_input_ids(input_ids, n_images) or [uuid.uuid4().hex for _ in range(n_images)]
        dataset_type = check_dataset_type(dataset_type)
        targets = check_targets(kwargs.pop("targets", None), n_images, self.n_class)
        fields = check_field_values(self._field_specs, kwargs, n_images)
        timestamp = time.time()
        # Sampling's draw, before the model runs: a call nothing can keep any more records only
        # what the always-on aggregates need (README "Sampling").
        decision = (
            None
            if self._sampling is None
            else self._sampling.before_call(dataset_type, ids, self.near_miss > 0)
        )
        sampled_out = decision is not None and decision.sampled_out
        output_only = decision is not None and decision.output_only
        # This call's own hook captures (self._state): calls in other threads have theirs.
        with self._call_capture(sampled_out, output_only) as capture:
            output = self._run_model(model_input)
            record = self._record_of_call(
                capture,
                output,
                lambda: (ids, img_sizes, fields),
                dataset_type,
                timestamp,
                targets=targets,
            )
        if record is not None:
            self._hand_over(record, decision, model_input)
        return output

    def _hand_over(
        self, record: CallRecord, decision: CallDecision | None, model_input: Any = None
    ) -> None:
        """A call's record to the sink, with its sampling decision made before the model ran (a
        call it sampled out is counted; a kept one gets its thumbnails, from ``model_input``)."""
        if decision is not None:
            record.sampling = decision
        if decision is not None and decision.sampled_out:
            self._count_sampled_out()
        elif model_input is not None:
            self._attach_thumbnails(record, model_input)
        self._submit_or_count(record)

    def _attach_thumbnails(self, record: CallRecord, model_input: Any) -> None:
        """With ``log_images``: what the writer makes the thumbnails from (a reference on the CPU)."""
        if self._log_images is None:
            return
        try:
            record.thumbnails = thumbnail_source(model_input, self._log_images)
        except Exception as error:
            self._logging_failed(error)

    def _record_of_call(
        self,
        capture: CallCapture,
        output: Any,
        identities: Callable[[], tuple[list[str], list[tuple[int, int]], dict[str, Any]]],
        dataset_type: str,
        timestamp: float,
        targets: dict[str, Any] | None = None,
    ) -> CallRecord | None:
        """The record of a call whose model answered, or None (the failure counted and reported).

        ``identities()`` gives the call's input ids, original image sizes and field values (a
        family may learn them only from the output). From here on the call returns the model's
        output whatever logging does. ``targets`` is the call's checked ground truth
        (:func:`~pyodlog.monitoring.validation.check_targets`), logged beside the detections.
        A call sampled out with aggregates of its output alone (``capture.output_only``) is not
        parsed where the family reads its output alone (:meth:`_output_only_detections`).
        """
        self._count_call_seen()
        try:
            features = self._end_capture(capture)
            ids, img_sizes, fields = identities()
            detections = None
            if capture.output_only:
                try:
                    detections = self._output_only_detections(output, img_sizes)
                except Exception:  # what the family's parse makes of it (and reports) instead
                    detections = None
            if detections is None:
                detections = self._deferred_detections(capture, output, img_sizes)
            if detections is None:
                with torch.no_grad():
                    detections = self._as_detection_batch(
                        self._parse_model_output(output, img_sizes), img_sizes
                    )
            if targets is not None and len(targets["counts"]) != len(img_sizes):
                raise ValueError(
                    f"targets has {len(targets['counts'])} entries but the call had {len(img_sizes)} "
                    f"images: pass one target dict per image"
                )
            return CallRecord(
                ids,
                dataset_type,
                self.n_epoch,
                timestamp,
                img_sizes,
                detections,
                features,
                fields,
                targets=targets,
            )
        except Exception as error:
            self._logging_failed(error)
            return None

    def _output_only_detections(
        self, output: Any, img_sizes: list[tuple[int, int]]
    ) -> DetectionBatch | None:
        """A sampled-out call's detections as the model returned them, unparsed
        (:attr:`DetectionBatch.output_only <pyodlog.structures.DetectionBatch>`: its boxes in
        ``img_sizes`` coordinates, scores and labels, copied), for
        ``Sampling(sampled_out_aggregates="output")``; or None where the family cannot read
        them without its parse (the default: the call is then parsed, as with ``"all"``)."""
        return None

    def _output_for_deferred_parse(self, output: Any) -> Any:
        """A copy of the model's output that the parse may read later, after the caller changed
        the output in place, or None when this output cannot be parsed later. The default:
        torchvision's ``[{"boxes", "scores", "labels", ...}, ...]`` with those three cloned
        (:func:`~pyodlog.monitoring.deferred.torchvision_output_copy`); None for anything else."""
        return torchvision_output_copy(output)

    def _deferred_detections(
        self, capture: CallCapture, output: Any, img_sizes: list[tuple[int, int]]
    ) -> DetectionBatch | None:
        """A call's detections (logged or sampled out), parsed when the store's writer first reads
        them (:class:`~pyodlog.monitoring.deferred.DeferredDetections`), or None to parse them
        now: the family opts out (``defer_parse``/``defer_sampled_out`` False), the sink has no
        writer thread, the hooks captured nothing, the output is not one that can be copied, a captured tensor is on a device
        or has autograd history, or the unparsed calls already hold ``max_deferred_bytes``.
        Tensor references only: no copy of what the hooks captured, no device access; the
        settings the parse reads are fixed now (:class:`~pyodlog.monitoring.deferred.ParseSettings`)."""
        if (
            not self.defer_parse
            or not self.defer_sampled_out
            or not isinstance(self._sink, SegmentStore)
        ):
            return None
        if not capture.state:
            # The hooks captured nothing (e.g. a model compiled before they were registered): the
            # parse fails, and says why, now rather than on the writer.
            return None
        copy = self._output_for_deferred_parse(output)
        if copy is None:
            return None
        held = [*held_tensors(capture.state), *held_tensors(copy)]
        if not deferrable(held):
            return None
        size, budget = nbytes(held), self._deferred_budget
        if not budget.take(size):
            return None
        current = self._current_call
        settings = ParseSettings(
            self,
            self._core,
            FrozenView.of(self._core, self._parse_setting_paths()),
            self._near_miss,
            self._near_miss_floor,
            self._log_embeddings,
            # Autocast is the calling thread's: the parse runs under the same (e.g. roi_align
            # over bfloat16 features is computed in float32 under CPU autocast only).
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
        )

        def parse() -> DetectionBatch:
            # The call's own captures and settings current again, in the thread that reads them.
            token = current.set(capture)
            settings_token = PARSE_SETTINGS.set(settings)
            autocast = (
                contextlib.nullcontext()
                if settings.autocast_dtype is None
                else torch.autocast("cpu", dtype=settings.autocast_dtype)
            )
            try:
                with torch.no_grad(), autocast:
                    return self._as_detection_batch(
                        self._parse_model_output(copy, img_sizes), img_sizes
                    )
            except Exception as error:
                self._logging_failed(error)  # as on the call path; the store quarantines the call
                raise
            finally:
                PARSE_SETTINGS.reset(settings_token)
                current.reset(token)

        return DeferredDetections(parse, held, lambda: budget.give_back(size))

    def _parse_setting_paths(self) -> tuple[str, ...]:
        """:attr:`parse_settings` that the model has (found once: a path it lacks costs a failed
        attribute lookup of ``nn.Module`` at every call)."""
        found = self.__dict__.get("_parse_paths")
        if found is None or found[0] != self.parse_settings:
            found = (self.parse_settings, FrozenView.resolvable(self._core, self.parse_settings))
            self.__dict__["_parse_paths"] = found
        return found[1]

    def _submit_or_count(self, record: CallRecord) -> None:
        """Hands a record to the sink; a failure is counted and reported, never raised."""
        try:
            self._submit(record)
        except Exception as error:
            self._logging_failed(error)

    def close(self) -> None:
        """Removes every hook from the model, restores what it changed on the model, closes the sink.

        Idempotent and callable from any thread: calls running in other threads finish first
        (their records are stored); new calls raise ``LoggerClosedError``. Thresholds the logger
        set on the model (``score_thresh``, ``iou_thresh``, ``max_detections_per_image``) get
        their previous values back once no other live logger uses the model (a value changed by
        hand since is kept).
        """
        self._stop_calls()
        self._remove_hooks()
        self._release_model()
        self._close_monitoring()


# -- class names (issue 15) -----------------------------------------------------------------------


def _placeholder_names(names: list[str]) -> bool:
    """Names a library makes up when it knows none (``"0"``, ``"LABEL_0"``, ``"class_0"``)."""
    return all(
        n in ("", str(i), f"LABEL_{i}", f"class_{i}", f"class{i}") for i, n in enumerate(names)
    )


def model_class_names(model: Any) -> list[str] | dict[int, str] | None:
    """The class names a model carries itself, or None.

    Ultralytics (``YOLO`` and ``DetectionModel``): ``model.names``; transformers:
    ``model.config.id2label``. Torchvision models carry none (their weights do: pass
    ``class_names=weights``). Placeholder names (``"0"``, ``"LABEL_0"``) count as none.
    """
    for owner in (model, getattr(model, "model", None)):
        names = getattr(owner, "names", None) if owner is not None else None
        if isinstance(names, (dict, list, tuple)) and names:
            return dict(names) if isinstance(names, dict) else list(names)
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if isinstance(id2label, dict) and id2label:
        return dict(id2label)
    return None


def resolve_class_names(value: Any, model: nn.Module, n_class: int) -> list[str] | None:
    """``class_names`` as given (a list, a dict, torchvision weights), else the model's, checked.

    Raises:
        ValueError: names that do not fit the model's ``n_class`` labels (the message says how).
    """
    if value is None:
        found = model_class_names(model)
        if found is None:
            return None
        try:
            names = check_class_names(found, n_class, "the model's class names")
        except ValueError:
            return None  # names the model carries but that do not fit its head: not used
        return None if names is None or _placeholder_names(names) else names
    meta = getattr(value, "meta", None)  # a torchvision WeightsEnum member
    if isinstance(meta, dict):
        if "categories" not in meta:
            raise ValueError(
                f"class_names={value!r} has no meta['categories']: pass a list of names instead"
            )
        value = meta["categories"]
    return check_class_names(value, n_class)
