"""JPEG thumbnails of the logged images (``create_logger(..., log_images={...})``), made off the call.

The call only keeps what the thumbnails are made from (:func:`thumbnail_source`):

* images on the CPU: a **reference** to the input tensors (no copy, no pixel
  work in the call); the writer thread downscales and encodes them with
  libjpeg (``torchvision.io.encode_jpeg``). An input changed in place before
  the writer reads it (a reused buffer) is detected through the tensor's
  version counter where it has one and gets no thumbnail rather than the
  wrong pixels;
* images on a GPU: a downscaled ``uint8`` copy made on the device in the call
  (asynchronous kernels, no host sync); the writer thread encodes it with
  nvJPEG on that device once the record's copy event completed.

The writer stores one JPEG per image in the images column ``thumbnail``
(ragged bytes; an image without a thumbnail stores no bytes), read back by
:meth:`pyodlog.io.reader.ResultData.thumbnail`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ThumbnailSource",
    "ThumbnailSpec",
    "check_log_images",
    "encode_thumbnails",
    "thumbnail_source",
]

log = logging.getLogger("pyodlog")

DEFAULT_MAX_SIDE = 256
DEFAULT_QUALITY = 85
MAX_SIDE_RANGE = (16, 4096)
_LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class ThumbnailSpec:
    """How large (longest side, pixels) and how good (JPEG quality 1..100) a thumbnail is."""

    max_side: int = DEFAULT_MAX_SIDE
    quality: int = DEFAULT_QUALITY

    def to_dict(self) -> dict[str, int]:
        return {"max_side": self.max_side, "quality": self.quality}


@dataclass
class ThumbnailSource:
    """What a call's thumbnails are made from (see the module docstring).

    Attributes:
        images: per image, a ``[C, H, W]`` tensor (a CPU input itself, or a
            device-downscaled ``uint8`` copy), or None (no thumbnail possible).
        versions: per image, the input's version counter at the call (None: not tracked).
        spec: size and quality.
    """

    images: list[Tensor | None]
    versions: list[int | None]
    spec: ThumbnailSpec


def check_log_images(value: Any) -> ThumbnailSpec | None:
    """``log_images``: None (no thumbnails) or ``{"max_side": int, "quality": int}`` (both optional).

    Raises:
        ValueError: anything else, naming what was wrong and what to pass.
    """
    if value is None:
        return None
    example = f'log_images={{"max_side": {DEFAULT_MAX_SIDE}, "quality": {DEFAULT_QUALITY}}}'
    if not isinstance(value, Mapping):
        raise ValueError(
            f"log_images must be None or a dict like {example} (an empty dict takes these "
            f"defaults), got {type(value).__name__} {value!r}"
        )
    unknown = sorted(map(str, set(value) - {"max_side", "quality"}))
    if unknown:
        raise ValueError(
            f"log_images has unknown keys {unknown}: only 'max_side' and 'quality', e.g. {example}"
        )
    max_side = value.get("max_side", DEFAULT_MAX_SIDE)
    quality = value.get("quality", DEFAULT_QUALITY)
    low, high = MAX_SIDE_RANGE
    if isinstance(max_side, bool) or not isinstance(max_side, int) or not low <= max_side <= high:
        raise ValueError(
            f"log_images['max_side'] must be an int from {low} to {high} (the thumbnail's longest "
            f"side in pixels), got {max_side!r}"
        )
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(
            f"log_images['quality'] must be an int from 1 to 100 (JPEG quality), got {quality!r}"
        )
    return ThumbnailSpec(int(max_side), int(quality))


def _version(t: Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors track no version
        return None


def _is_image(t: Any) -> bool:
    return isinstance(t, Tensor) and t.dim() == 3 and t.shape[0] in (1, 3) and t.numel() > 0


def _target_size(h: int, w: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _to_uint8(t: Tensor, max_side: int) -> Tensor:
    """``[C, H, W]`` (float in [0, 1] or uint8) downscaled to ``max_side`` as ``uint8``.

    On the CPU the image becomes uint8 first and is then resized (antialiased): PyTorch's uint8
    resize kernel is about 100x faster there than the float one (0.3 ms vs 44 ms for 640x480 to
    256). On a GPU the float image is resized (uint8 has no antialiased resize there).
    """
    h, w = int(t.shape[-2]), int(t.shape[-1])
    size = _target_size(h, w, max_side)
    x = t.detach()
    if x.dtype != torch.uint8 and (x.device.type == "cpu" or size == (h, w)):
        x = (x.float() * 255).round_().clamp_(0, 255).to(torch.uint8)
    if size != (h, w):
        x = torch.nn.functional.interpolate(
            x[None] if x.dtype == torch.uint8 and x.device.type == "cpu" else x[None].float(),
            size=size,
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
    if x.dtype != torch.uint8:
        x = (x * 255 if t.dtype != torch.uint8 else x).round_().clamp_(0, 255).to(torch.uint8)
    return x.contiguous()


def thumbnail_source(model_input: Any, spec: ThumbnailSpec) -> ThumbnailSource | None:
    """What the thumbnails of a call are made from; None when the input holds no image tensors.

    Runs in the call: CPU images are only referenced; device images are downscaled on their
    device (asynchronous kernels, no host sync, no Python loop over detections).
    """
    if isinstance(model_input, Tensor) and model_input.dim() == 4:
        images: list[Any] = list(model_input.unbind(0))
    elif isinstance(model_input, (list, tuple)) and all(isinstance(t, Tensor) for t in model_input):
        images = list(model_input)
    else:
        return None
    kept: list[Tensor | None] = []
    versions: list[int | None] = []
    for t in images:
        if not _is_image(t):
            kept.append(None)
            versions.append(None)
        elif t.device.type == "cpu":
            kept.append(t)
            versions.append(_version(t))
        else:
            with torch.no_grad():
                kept.append(_to_uint8(t, spec.max_side))
            versions.append(None)
    if not any(t is not None for t in kept):
        return None
    return ThumbnailSource(kept, versions, spec)


class _Failures:
    """Counts thumbnails that could not be made; logs at most one line per interval."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()
        self._last = 0.0

    def add(self, error: BaseException) -> None:
        with self._lock:
            self.count += 1
            now = time.monotonic()
            if now - self._last < _LOG_INTERVAL:
                return
            self._last = now
        log.warning(
            "pyodlog could not make a thumbnail (%r); the image is stored without one (%d so far)",
            error,
            self.count,
        )


FAILURES = _Failures()


def _encode_one(image: Tensor, spec: ThumbnailSpec) -> bytes:
    from torchvision.io import encode_jpeg

    pixels = _to_uint8(image, spec.max_side)  # a device thumbnail is already small: unchanged
    if pixels.is_cuda:
        try:
            data = encode_jpeg(pixels, quality=spec.quality)  # nvJPEG on the image's device
            assert isinstance(data, Tensor)
            return bytes(data.cpu().numpy().tobytes())
        except (RuntimeError, AssertionError) as error:  # a torchvision built without nvJPEG
            FAILURES.add(error)
            pixels = pixels.cpu()
    data = encode_jpeg(pixels, quality=spec.quality)
    assert isinstance(data, Tensor)
    return data.numpy().tobytes()


def encode_thumbnails(source: ThumbnailSource, n_images: int) -> list[bytes]:
    """One JPEG per image (``b""`` where there is none); runs on the writer thread.

    An image changed in place since the call (its version counter moved) gets no thumbnail.
    A failure leaves that image without a thumbnail and is counted (:data:`FAILURES`), never raised.
    """
    out: list[bytes] = []
    for i in range(n_images):
        image = source.images[i] if i < len(source.images) else None
        if image is None:
            out.append(b"")
            continue
        version = source.versions[i] if i < len(source.versions) else None
        if version is not None and _version(image) != version:
            out.append(b"")
            continue
        try:
            out.append(_encode_one(image, source.spec))
        except Exception as error:
            FAILURES.add(error)
            out.append(b"")
    return out
