"""ObjectDetectionTorchLogger: the abstract base of every model family's logger."""

from __future__ import annotations

import time
import uuid
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pyodlog.io.sink import Sink
from pyodlog.monitoring.monitoring_logger import MonitoringLogger
from pyodlog.monitoring.tracer import ObjectDetectionTorchTracer
from pyodlog.monitoring.validation import (
    check_dataset_type,
    check_field_specs,
    check_field_values,
    check_img_sizes,
    check_input_ids,
    check_n_class,
    check_target_layers,
    check_thresholds,
)
from pyodlog.structures import CallRecord, DetectionBatch

if TYPE_CHECKING:
    from pyodlog.sync import SyncConfig

__all__ = ["NmsConfig", "ObjectDetectionTorchLogger", "unwrap_model"]


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


def _image_sizes(model_input: Any) -> list[tuple[int, int]]:
    """(h, w) of each input image, from tensor shapes only (no device access)."""
    if isinstance(model_input, Tensor):
        if model_input.dim() != 4:
            raise ValueError(
                f"model_input must be a list of [C, H, W] images or a [B, C, H, W] tensor, got shape {tuple(model_input.shape)}"
            )
        return [tuple(model_input.shape[-2:])] * model_input.shape[0]
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
    * ``_parse_model_output(model_output, img_sizes) -> DetectionBatch``
    * optionally ``_apply_nms_config(model, nms_config)``.

    Args (see ``../shared/API.md``):
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
        force_table_recreate: drop and recreate a result whose schema differs.
        api_endpoint, api_key: default to ``PYODLOG_API_ENDPOINT`` / ``PYODLOG_API_KEY``.
        n_class: number of classes; read from the model when None.
        score_thresh, iou_thresh, max_detections_per_image: set the model's own
            thresholds, so the output and the log agree. None keeps the model's.
        sink: where records go (keyword only); default :class:`pyodlog.HDF5Store`
            (local HDF5 under ``PYODLOG_HOME`` or ``./pyodlog_data``).
        log_embeddings: record a per-detection embedding where the family has one.
        sync_config: how to reach the collector (keyword only): TLS CA bundle,
            timeouts, retries, piece size (:class:`pyodlog.SyncConfig`).
    """

    #: Human-readable name of the model family, for error messages.
    family: str = ""

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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        core = unwrap_model(model)
        if not type(self).detect(core):
            raise ValueError(
                f"{type(self).__name__} does not handle {type(core).__name__} models: use pyodlog.create_logger(model, ...) to pick the right logger"
            )
        # Everything is validated before any file is touched or hook registered.
        layers = check_target_layers(target_layers, core)
        self._field_specs = check_field_specs(additional_fields)
        nms = NmsConfig(*check_thresholds(score_thresh, iou_thresh, max_detections_per_image))
        model_n_class = self._get_n_class(core)
        n_class = check_n_class(n_class)
        if n_class is not None and n_class != model_n_class:
            raise ValueError(
                f"n_class={n_class} but the model's class head produces {model_n_class} classes: pass n_class={model_n_class} or None"
            )
        if not isinstance(log_embeddings, bool):
            raise ValueError(f"log_embeddings must be True or False, got {log_embeddings!r}")
        self.model = model
        self.n_class = model_n_class
        self.log_embeddings = log_embeddings
        schema = {
            "n_class": self.n_class,
            "additional_fields": [f.to_dict() for f in self._field_specs],
            "target_layers": {s.alias: s.to_dict() for s in layers},
            "family": type(self).__name__,
        }
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
        )
        self._apply_nms_config(core, nms)
        self._core = core
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
    ) -> DetectionBatch:
        """Builds the batch's detections (boxes in ``img_sizes`` coordinates) from the output and ``self._state``.

        Runs on the inference path: tensor operations only, no host sync, no
        Python loop over detections.
        """

    def _apply_nms_config(self, model: nn.Module, nms_config: NmsConfig) -> None:
        """Sets the model's own thresholds; the default handles torchvision-style attributes."""
        for attr, value in (
            ("score_thresh", nms_config.score_thresh),
            ("nms_thresh", nms_config.iou_thresh),
            ("detections_per_img", nms_config.max_detections_per_image),
        ):
            if value is not None:
                if not hasattr(model, attr):
                    raise ValueError(
                        f"{type(model).__name__} has no {attr} to set: leave that threshold None"
                    )
                setattr(model, attr, value)

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
                logged in those coordinates; default the input sizes) and the
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

    def _logged_call(
        self, model_input: Any, input_ids: list[str] | None, dataset_type: str, kwargs: dict
    ) -> Any:
        if self._core.training:
            raise RuntimeError(
                f"the {type(self._core).__name__} is in training mode, where torchvision detectors return losses, not "
                "detections: call model.eval() before logging inference"
            )
        input_sizes = _image_sizes(model_input)
        n_images = len(input_sizes)
        img_sizes = check_img_sizes(kwargs.pop("img_sizes", None), n_images) or input_sizes
        ids = check_input_ids(input_ids, n_images) or [uuid.uuid4().hex for _ in range(n_images)]
        dataset_type = check_dataset_type(dataset_type)
        fields = check_field_values(self._field_specs, kwargs, n_images)
        timestamp = time.time()
        # This call's own hook captures (self._state): calls in other threads have theirs.
        with self._call_capture() as capture:
            output = self.model(model_input)
            features = self._end_capture(capture)
            with torch.no_grad():
                detections = self._parse_model_output(output, img_sizes)
        self._submit(
            CallRecord(
                ids, dataset_type, self.n_epoch, timestamp, img_sizes, detections, features, fields
            )
        )
        return output

    def close(self) -> None:
        """Removes every hook from the model and closes the sink; idempotent, callable from any thread.

        Calls running in other threads finish first (their records are stored);
        new calls raise ``LoggerClosedError``.
        """
        self._stop_calls()
        self._remove_hooks()
        self._close_monitoring()
