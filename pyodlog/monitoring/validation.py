"""Validation of everything a user hands the logger, once, at the API boundary.

Every message names the argument, the value received and how to fix it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pyodlog.structures import RecordStorage
from pyodlog_protocol import is_valid_name  # the collector accepts exactly these names

__all__ = [
    "FieldSpec",
    "LayerSpec",
    "check_class_names",
    "check_dataset_type",
    "check_encodable",
    "check_field_specs",
    "check_field_values",
    "check_img_sizes",
    "check_input_ids",
    "check_n_class",
    "check_n_epoch",
    "check_name",
    "check_storage",
    "check_target_layers",
    "check_targets",
    "check_thresholds",
]

FIELD_DTYPES = ("int32", "int64", "float32", "float64", "bool", "str")
COMPRESSIONS = ("uint8", "float16", "bfloat16", "none")


def check_name(value: Any, argument: str, allow_none: bool = False) -> str | None:
    """Names end up in file paths and URLs: letters, digits, '-', '_', '.'; not starting with '.'."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{argument} must be a string, got {type(value).__name__} {value!r}")
    if not is_valid_name(value) or value.startswith("."):
        raise ValueError(
            f"{argument}={value!r} is not a valid name: use 1 to 128 letters, digits, '-', '_' or '.' "
            f"(no '/', spaces or other characters, and no '.' first: that would be a hidden folder), "
            f"e.g. 'fasterrcnn-v2_2024.1'"
        )
    return value


def check_encodable(value: str, argument: str) -> str:
    """A string the store can write: UTF-8, with lone surrogates U+DC80..U+DCFF (``os.fsdecode``'s
    stand-ins for undecodable bytes) kept losslessly by ``surrogateescape``; any other lone
    surrogate is refused."""
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{argument}={value!r} cannot be stored: {exc.object[exc.start : exc.end]!r} at position "
            f"{exc.start} is a lone surrogate that is not an escaped byte (only U+DC80..U+DCFF, as "
            "os.fsdecode makes them, are kept); pass valid text, e.g. value.encode('utf-8', "
            "'surrogatepass').decode('utf-8', 'replace')"
        ) from None
    return value


def check_n_epoch(value: Any) -> str | int | None:
    if value is None or value == "latest":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"n_epoch must be 'latest', an int >= 0 or None, got {value!r}")
    return int(value)


def check_n_class(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"n_class must be an int >= 1 (or None to read it from the model), got {value!r}"
        )
    return int(value)


def _probability(value: Any, argument: str) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating, np.integer))
        or not (0.0 <= float(value) <= 1.0)
    ):
        raise ValueError(
            f"{argument} must be a number in [0, 1] (or None to keep the model's), got {value!r}"
        )
    return float(value)


def check_thresholds(
    score_thresh: Any, iou_thresh: Any, max_detections: Any
) -> tuple[float | None, float | None, int | None]:
    score = _probability(score_thresh, "score_thresh")
    iou = _probability(iou_thresh, "iou_thresh")
    if max_detections is not None and (
        isinstance(max_detections, bool)
        or not isinstance(max_detections, (int, np.integer))
        or max_detections < 1
    ):
        raise ValueError(
            f"max_detections_per_image must be an int >= 1 (or None to keep the model's), got {max_detections!r}"
        )
    return score, iou, None if max_detections is None else int(max_detections)


class FieldSpec:
    """One user column: ``{"name", "dtype", "default"?}``."""

    def __init__(
        self, name: str, dtype: str, default: Any = None, has_default: bool = False
    ) -> None:
        self.name, self.dtype, self.default, self.has_default = name, dtype, default, has_default

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype}
        if self.has_default:
            out["default"] = self.default
        return out

    def convert(self, value: Any, where: str) -> Any:
        """One value of this field as a plain Python value of its dtype."""
        try:
            if self.dtype == "str":
                if not isinstance(value, str):
                    raise TypeError
                return check_encodable(value, f"additional field {self.name!r}: {where}")
            if self.dtype == "bool":
                if isinstance(value, (bool, np.bool_)):
                    return bool(value)
                raise TypeError
            if self.dtype.startswith("int"):
                if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                    raise TypeError
                info = np.iinfo(self.dtype)
                if not info.min <= int(value) <= info.max:
                    raise TypeError
                return int(value)
            if isinstance(value, (bool, np.bool_)) or not isinstance(
                value, (int, float, np.integer, np.floating)
            ):
                raise TypeError
            return float(value)
        except TypeError:
            raise ValueError(
                f"additional field {self.name!r} is declared as {self.dtype}, but {where} is {value!r} "
                f"({type(value).__name__}): pass a {self.dtype} value"
            ) from None


RESERVED_FIELDS = {
    "input_id",
    "dataset_type",
    "n_epoch",
    "timestamp",
    "image_size",
    "img_sizes",
    "detections",
    "targets",
    "class_names",
}


def check_field_specs(specs: Any) -> list[FieldSpec]:
    if specs is None:
        return []
    if not isinstance(specs, (list, tuple)):
        raise ValueError(
            f"additional_fields must be a list of dicts like {{'name': 'camera', 'dtype': 'str'}}, got {specs!r}"
        )
    out: list[FieldSpec] = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, Mapping) or "name" not in spec or "dtype" not in spec:
            raise ValueError(
                f"additional_fields[{i}] must be a dict with 'name' and 'dtype' (and optional 'default'), got {spec!r}"
            )
        unknown = set(spec) - {"name", "dtype", "default"}
        if unknown:
            raise ValueError(
                f"additional_fields[{i}] has unknown keys {sorted(unknown)}: only 'name', 'dtype', 'default'"
            )
        name = spec["name"]
        if not isinstance(name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", name):
            raise ValueError(
                f"additional_fields[{i}]['name'] must be an identifier (letters, digits, '_'), got {name!r}"
            )
        if name in RESERVED_FIELDS or name in ("model_input", "input_ids"):
            raise ValueError(
                f"additional_fields[{i}]['name']={name!r} is reserved by pyodlog: choose another name"
            )
        dtype = str(spec["dtype"]).replace("torch.", "")
        if dtype not in FIELD_DTYPES:
            raise ValueError(
                f"additional_fields[{i}]['dtype'] must be one of {FIELD_DTYPES}, got {spec['dtype']!r}"
            )
        if any(f.name == name for f in out):
            raise ValueError(f"additional_fields has {name!r} twice: names must be unique")
        field_spec = FieldSpec(name, dtype, spec.get("default"), "default" in spec)
        if field_spec.has_default:
            field_spec.default = field_spec.convert(spec["default"], "its default")
        out.append(field_spec)
    return out


def check_field_values(
    specs: Sequence[FieldSpec], kwargs: Mapping[str, Any], n_images: int
) -> dict[str, list[Any]]:
    """One list of n_images values per field: a scalar applies to every image, a sequence gives one each."""
    known = {f.name for f in specs}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"unknown keyword argument(s) {unknown}: __call__ takes img_sizes and the additional_fields "
            f"declared at construction ({sorted(known) or 'none'})"
        )
    out: dict[str, Any] = {}  # per field: a list of values, or a device tensor
    for spec in specs:
        if spec.name not in kwargs:
            if not spec.has_default:
                raise ValueError(
                    f"additional field {spec.name!r} has no default: pass {spec.name}=... to the call"
                )
            out[spec.name] = [spec.default] * n_images
            continue
        value = kwargs[spec.name]
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            # Reading a device tensor would wait for the device: check what the
            # metadata tells and keep the tensor; the sink converts it later.
            _check_device_field(spec, value, n_images)
            out[spec.name] = value
            continue
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                value = value.item()
            else:
                value = value.tolist()
        if isinstance(value, (list, tuple, np.ndarray)):
            if len(value) != n_images:
                raise ValueError(
                    f"{spec.name} has {len(value)} values for {n_images} images: pass one per image or a single value"
                )
            out[spec.name] = [spec.convert(v, f"{spec.name}[{i}]") for i, v in enumerate(value)]
        else:
            out[spec.name] = [spec.convert(value, spec.name)] * n_images
    return out


def _check_device_field(spec: FieldSpec, value: torch.Tensor, n_images: int) -> None:
    if (
        spec.dtype == "str"
        or (spec.dtype == "bool") != (value.dtype == torch.bool)
        or (
            spec.dtype.startswith("int")
            and (value.dtype.is_floating_point or value.dtype == torch.bool)
        )
    ):
        raise ValueError(
            f"additional field {spec.name!r} is declared as {spec.dtype}, but got a {value.dtype} tensor"
        )
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != n_images):
        raise ValueError(
            f"{spec.name} has shape {tuple(value.shape)}: pass one value per image ({n_images}) or a scalar"
        )


def check_input_ids(input_ids: Any, n_images: int) -> list[str] | None:
    if input_ids is None:
        return None
    if isinstance(input_ids, str) or not isinstance(input_ids, Sequence):
        raise ValueError(
            f"input_ids must be a list of strings (one per image), got {type(input_ids).__name__}"
        )
    if len(input_ids) != n_images:
        raise ValueError(
            f"input_ids has {len(input_ids)} entries but the batch has {n_images} images: pass one id per image"
        )
    for i, v in enumerate(input_ids):
        if not isinstance(v, str) or not v or len(v) > 1024:
            raise ValueError(
                f"input_ids[{i}] must be a non-empty string of at most 1024 characters, got {v!r}"
            )
        check_encodable(v, f"input_ids[{i}]")
    return list(input_ids)


def check_dataset_type(value: Any) -> str:
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > 64
        or any(ord(ch) < 32 for ch in value)
    ):
        raise ValueError(
            f"dataset_type must be a non-empty string of at most 64 printable characters such as 'train', 'val', 'test' or 'deploying', got {value!r}"
        )
    return check_encodable(value, "dataset_type")


def check_img_sizes(img_sizes: Any, n_images: int) -> list[tuple[int, int]] | None:
    if img_sizes is None:
        return None
    if isinstance(img_sizes, torch.Tensor):
        img_sizes = img_sizes.tolist()
    if not isinstance(img_sizes, Sequence) or len(img_sizes) != n_images:
        raise ValueError(
            f"img_sizes must give one (height, width) per image ({n_images}), got {img_sizes!r}"
        )
    out = []
    for i, size in enumerate(img_sizes):
        if (
            not isinstance(size, Sequence)
            or len(size) != 2
            or not all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size
            )
        ):
            raise ValueError(
                f"img_sizes[{i}] must be (height, width) with positive integers, got {size!r}"
            )
        out.append((int(size[0]), int(size[1])))
    return out


class LayerSpec:
    """One target layer: alias, dotted module path, compression and optional pooling grid."""

    def __init__(
        self,
        alias: str,
        path: str,
        compression: str = "uint8",
        pool_to: tuple[int, int] | None = None,
    ) -> None:
        self.alias, self.path, self.compression, self.pool_to = alias, path, compression, pool_to

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "compression": self.compression,
            "pool_to": None if self.pool_to is None else list(self.pool_to),
        }


def check_target_layers(target_layers: Any, model: torch.nn.Module) -> list[LayerSpec]:
    """``{alias: "dotted.path"}`` or ``{alias: {"path", "compression"?, "pool_to"?}}``."""
    if target_layers is None:
        return []
    if not isinstance(target_layers, Mapping):
        raise ValueError(
            f"target_layers must be a dict {{alias: 'dotted.module.path'}}, got {type(target_layers).__name__}"
        )
    modules = dict(model.named_modules())
    out = []
    for alias, spec in target_layers.items():
        check_name(alias, f"target_layers alias {alias!r}")
        if isinstance(spec, str):
            spec = {"path": spec}
        if (
            not isinstance(spec, Mapping)
            or "path" not in spec
            or set(spec) - {"path", "compression", "pool_to"}
        ):
            raise ValueError(
                f"target_layers[{alias!r}] must be a module path or a dict with 'path' and optional 'compression', 'pool_to'; got {spec!r}"
            )
        path = spec["path"]
        if path not in modules or path == "":
            near = difflib.get_close_matches(str(path), [n for n in modules if n], n=5, cutoff=0.5)
            hint = (
                f" Did you mean {', '.join(repr(n) for n in near)}?"
                if near
                else " List them with [n for n, _ in model.named_modules()]."
            )
            raise ValueError(
                f"target_layers[{alias!r}] = {path!r} is not a module of the model.{hint}"
            )
        compression = spec.get("compression", "uint8")
        if compression not in COMPRESSIONS:
            raise ValueError(
                f"target_layers[{alias!r}]['compression'] must be one of {COMPRESSIONS}, got {compression!r}"
            )
        pool_to = spec.get("pool_to")
        if pool_to is not None:
            if (
                not isinstance(pool_to, Sequence)
                or len(pool_to) != 2
                or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pool_to
                )
            ):
                raise ValueError(
                    f"target_layers[{alias!r}]['pool_to'] must be (height, width) positive ints, got {pool_to!r}"
                )
            pool_to = (int(pool_to[0]), int(pool_to[1]))
        out.append(LayerSpec(alias, path, compression, pool_to))
    return out


# -- ground truth and class names (issue 15) ----------------------------------------------------


def check_targets(targets: Any, n_images: int, n_class: int | None = None) -> dict[str, Any] | None:
    """The call's ``targets=`` (torchvision's format), checked before the model runs.

    ``targets`` is one mapping per image with ``"boxes"`` (``Tensor[N, 4]`` xyxy in original-image
    pixels) and ``"labels"`` (``Tensor[N]`` integers); other keys (``masks``, ``image_id``, …) are
    ignored. Tensors on a device are checked by shape and dtype only (their values would need a
    host sync); CPU tensors, NumPy arrays and lists also by value: finite boxes with
    ``x2 >= x1`` and ``y2 >= y1``, labels in ``[0, n_class)``.

    Returns:
        None for None, else ``{"boxes": Tensor[M, 4] float32, "labels": Tensor[M] int64,
        "counts": list[int]}`` (every image's boxes one after the other, on the targets' device).

    Raises:
        ValueError: naming the image and what is wrong, and the expected format.
    """
    if targets is None:
        return None
    how = (
        'pass targets=[{"boxes": Tensor[N, 4] (x1, y1, x2, y2 in original-image pixels), '
        '"labels": Tensor[N] (int)}, ...], one dict per image'
    )
    if (
        isinstance(targets, Mapping)
        or not isinstance(targets, Sequence)
        or isinstance(targets, str)
    ):
        raise ValueError(f"targets must be a list of dicts, got {type(targets).__name__}: {how}")
    if len(targets) != n_images:
        raise ValueError(
            f"targets has {len(targets)} entries but the batch has {n_images} images: {how}"
        )
    boxes_list, labels_list, counts = [], [], []
    device = None
    for i, target in enumerate(targets):
        if not isinstance(target, Mapping) or "boxes" not in target or "labels" not in target:
            got = sorted(map(str, target)) if isinstance(target, Mapping) else type(target).__name__
            raise ValueError(
                f"targets[{i}] must be a dict with 'boxes' and 'labels', got {got}: {how}"
            )
        boxes, labels = target["boxes"], target["labels"]
        try:
            boxes = boxes if isinstance(boxes, torch.Tensor) else torch.as_tensor(np.asarray(boxes))
            labels = (
                labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
            )
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"targets[{i}] boxes/labels are not numeric arrays ({error}): {how}"
            ) from None
        if boxes.numel() == 0 and boxes.dim() <= 1:
            boxes = boxes.reshape(0, 4)
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(
                f"targets[{i}]['boxes'] has shape {tuple(boxes.shape)}, expected [N, 4]: {how}"
            )
        if boxes.dtype == torch.bool or boxes.is_complex():
            raise ValueError(
                f"targets[{i}]['boxes'] has dtype {boxes.dtype}, expected a number type"
            )
        if labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"targets[{i}]['labels'] has shape {tuple(labels.shape)} for {boxes.shape[0]} boxes: "
                f"expected [{boxes.shape[0]}]"
            )
        if labels.numel() and (labels.dtype.is_floating_point or labels.dtype == torch.bool):
            raise ValueError(
                f"targets[{i}]['labels'] has dtype {labels.dtype}: class indices are integers "
                f"(e.g. labels.long())"
            )
        if device is None:
            device = boxes.device
        if boxes.device != device or labels.device != device:
            raise ValueError(
                f"targets[{i}] is on {boxes.device}/{labels.device}, targets[0] on {device}: "
                f"put every target on one device"
            )
        if boxes.device.type == "cpu":
            b = boxes.detach().to(torch.float64)
            if not bool(torch.isfinite(b).all()):
                raise ValueError(f"targets[{i}]['boxes'] holds NaN or infinite coordinates")
            bad = torch.nonzero((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])).flatten()
            if len(bad):
                raise ValueError(
                    f"targets[{i}]['boxes'][{int(bad[0])}] = {b[int(bad[0])].tolist()} is not xyxy "
                    f"(x2 < x1 or y2 < y1): convert it, e.g. torchvision.ops.box_convert(boxes, "
                    f"'xywh', 'xyxy')"
                )
            if labels.numel():
                low, high = int(labels.min()), int(labels.max())
                if low < 0 or (n_class is not None and high >= n_class):
                    raise ValueError(
                        f"targets[{i}]['labels'] holds {low if low < 0 else high}, outside the model's "
                        f"classes [0, {n_class})"
                    )
        boxes_list.append(boxes.detach().to(torch.float32))
        labels_list.append(labels.detach().to(torch.int64))
        counts.append(int(boxes.shape[0]))
    return {
        "boxes": torch.cat(boxes_list) if boxes_list else torch.zeros(0, 4),
        "labels": torch.cat(labels_list) if labels_list else torch.zeros(0, dtype=torch.int64),
        "counts": counts,
    }


def check_class_names(
    value: Any, n_class: int | None, argument: str = "class_names"
) -> list[str] | None:
    """Class names: a list of ``n_class`` strings (index = label), or a ``{label: name}`` mapping.

    A mapping may leave labels out (e.g. COCO's unused ids, a background): those get ``""``.

    Raises:
        ValueError: not strings, wrong length, labels outside ``[0, n_class)``.
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        try:
            keys = {int(k): v for k, v in value.items()}
        except (TypeError, ValueError):
            raise ValueError(
                f"{argument} keys must be class indices (ints), got {list(value)[:5]!r}"
            ) from None
        size = n_class if n_class is not None else (max(keys) + 1 if keys else 0)
        if keys and (min(keys) < 0 or max(keys) >= size):
            raise ValueError(
                f"{argument} has label {min(keys) if min(keys) < 0 else max(keys)}, outside the "
                f"model's classes [0, {size})"
            )
        value = [keys.get(i, "") for i in range(size)]
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(
            f"{argument} must be a list of strings (index = label), got {type(value).__name__}"
        )
    names = list(value)
    for i, name in enumerate(names):
        if not isinstance(name, str) or len(name) > 256:
            raise ValueError(
                f"{argument}[{i}] must be a string of at most 256 characters, got {name!r}"
            )
        check_encodable(name, f"{argument}[{i}]")
    if n_class is not None and len(names) != n_class:
        raise ValueError(
            f"{argument} has {len(names)} names, the model's class head has {n_class} classes "
            f"(labels 0..{n_class - 1}; torchvision counts the background as label 0): pass one "
            f"name per label, or a {{label: name}} dict"
        )
    return names


def check_storage(value: Any) -> RecordStorage:
    """``storage=`` of ``create_logger``: None (the compact default), ``"float32"`` (exact, every
    dimension: the storage of segment formats 1 and 2), or a :class:`pyodlog.RecordStorage`."""
    if value is None:
        return RecordStorage()
    if isinstance(value, RecordStorage):
        return value
    if value == "float32":
        return RecordStorage.full()
    raise ValueError(
        f"storage must be None (compact: float16 logits, uint8 embeddings projected to 128 dimensions), "
        f"'float32' (exact) or a pyodlog.RecordStorage(logits=..., embeddings=..., embedding_dim=...); "
        f"got {value!r}"
    )
