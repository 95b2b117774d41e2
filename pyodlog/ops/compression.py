"""Compression of captured activations: per-channel uint8 quantisation,
half/bfloat16 casts and spatial pooling, each with its inverse."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pyodlog._extension import assert_has_ops, has_ops, register_fake

__all__ = [
    "CODE_NAN",
    "CODE_NEG_INF",
    "CODE_POS_INF",
    "MAX_CODE",
    "METHODS",
    "CompressedFeature",
    "compact_rows",
    "compress_features",
    "decompress_features",
    "dequantize_uint8",
    "dequantize_uint8_reference",
    "quantize_uint8",
    "random_projection",
    "widen_rows",
]

#: Finite values use codes 0..MAX_CODE; the three codes above are -inf, +inf and NaN.
MAX_CODE = 252
CODE_NEG_INF, CODE_POS_INF, CODE_NAN = 253, 254, 255
METHODS = ("uint8", "float16", "bfloat16", "none")


def _rows(shape: torch.Size) -> tuple[int, int]:
    """How a tensor is cut into quantisation rows: one per (sample, channel)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    rows = shape[0] * shape[1]
    return rows, (int(torch.Size(shape).numel()) // rows if rows else 0)


def quantize_uint8(
    x: Tensor, out: tuple[Tensor, Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel affine uint8 quantisation.

    Each row — a (sample, channel) of an ``[N, C, ...]`` activation, a sample of
    ``[N, D]`` — gets ``offset`` = its smallest finite value and ``scale`` =
    (largest - smallest) / 252. A finite ``v`` becomes ``round((v - offset) / scale)``
    in 0..252, so ``code * scale + offset`` is within ``scale / 2`` of ``v`` (plus
    float32 rounding of that expression). ``-inf``, ``+inf`` and NaN get codes
    253, 254 and 255 and come back exactly. A constant row has ``scale = 0`` and
    comes back exactly; a row with no finite value has ``scale = offset = 0``.

    Args:
        x: floating tensor of any shape.
        out: optional preallocated ``(q, scale, offset)``: ``q`` uint8 of
            ``x``'s shape, ``scale`` and ``offset`` float32 of shape ``[R]``.
            Reusing them avoids fresh large allocations (which page-fault).

    Returns:
        ``(q, scale, offset)``: ``q`` uint8 with ``x``'s shape, ``scale`` and
        ``offset`` float32 ``[R]``.
    """
    rows, cols = _rows(x.shape)
    if out is None:
        q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        scale = torch.empty(rows, dtype=torch.float32, device=x.device)
        offset = torch.empty(rows, dtype=torch.float32, device=x.device)
    else:
        q, scale, offset = out
    assert_has_ops()
    torch.ops.pyodlog.quantize_uint8_out.default(
        x.reshape(rows, cols), q.view(rows, cols), scale, offset
    )
    return q, scale, offset


def dequantize_uint8(
    q: Tensor, scale: Tensor, offset: Tensor, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of :func:`quantize_uint8`: ``Tensor`` of ``q``'s shape and ``dtype``.

    Without the compiled extension (a machine that only reads results) the same arithmetic runs
    in plain PyTorch (:func:`dequantize_uint8_reference`, bit-identical).
    """
    rows, cols = _rows(q.shape)
    if not has_ops():
        return dequantize_uint8_reference(q, scale, offset, dtype)
    return torch.ops.pyodlog.dequantize_uint8.default(
        q.reshape(rows, cols), scale, offset, dtype
    ).reshape(q.shape)


def dequantize_uint8_reference(
    q: Tensor, scale: Tensor, offset: Tensor, dtype: torch.dtype = torch.float32
) -> Tensor:
    """:func:`dequantize_uint8` in plain PyTorch: ``code * scale + offset`` in float32 (two roundings,
    as the kernels compute it), the special codes back to -inf, +inf and NaN."""
    rows, cols = _rows(q.shape)
    codes = q.reshape(rows, cols)
    values = codes.to(torch.float32) * scale.to(torch.float32).reshape(rows, 1)
    values = values + offset.to(torch.float32).reshape(rows, 1)
    special = torch.tensor([-math.inf, math.inf, math.nan], dtype=torch.float32, device=q.device)
    is_special = codes > MAX_CODE
    values = torch.where(
        is_special, special[(codes.to(torch.long) - CODE_NEG_INF).clamp(0, 2)], values
    )
    return values.to(dtype).reshape(q.shape)


@dataclass
class CompressedFeature:
    """A captured activation in compressed form, with what restores it.

    Attributes:
        method: ``"uint8"``, ``"float16"``, ``"bfloat16"`` or ``"none"``.
        payload: the stored values (uint8 codes, or the cast tensor).
        scale: ``Tensor[R]`` float32 per-row scale (``uint8`` only).
        offset: ``Tensor[R]`` float32 per-row offset (``uint8`` only).
        dtype: dtype of the original activation.
        original_shape: shape of the original activation.
        pooled_to: ``(h, w)`` grid the activation was average-pooled to, or None.
    """

    method: str
    payload: Tensor
    scale: Tensor | None
    offset: Tensor | None
    dtype: torch.dtype
    original_shape: tuple[int, ...]
    pooled_to: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        total = self.payload.numel() * self.payload.element_size()
        for t in (self.scale, self.offset):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def decompress(self) -> Tensor:
        """The activation, restored (pooled, if it was pooled)."""
        return decompress_features(self)


def compress_features(
    x: Tensor,
    method: str = "uint8",
    pool_to: tuple[int, int] | None = None,
    out: CompressedFeature | None = None,
) -> CompressedFeature:
    """Compresses an activation for storage.

    Args:
        x: floating activation, e.g. ``Tensor[N, C, H, W]``.
        method: ``"uint8"`` (per-channel quantisation, see
            :func:`quantize_uint8`), ``"float16"``/``"bfloat16"`` (cast), or
            ``"none"`` (a copy).
        pool_to: average-pool ``[N, C, H, W]`` to this ``(h, w)`` grid first
            (``adaptive_avg_pool2d``), e.g. ``(7, 7)``.
        out: a :class:`CompressedFeature` of the same method and shape whose
            tensors are reused (no fresh allocation).

    Returns:
        :class:`CompressedFeature`. Its tensors are new (or ``out``'s); ``x`` is
        not referenced, so changing ``x`` afterwards does not change them.

    Raises:
        ValueError: an unknown method, a non-floating tensor, or ``pool_to``
            for a tensor that is not ``[N, C, H, W]``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"only floating-point activations can be compressed, got {x.dtype}")
    original_shape = tuple(x.shape)
    if pool_to is not None:
        if x.dim() != 4:
            raise ValueError(
                f"pool_to needs an [N, C, H, W] activation, got shape {original_shape}"
            )
        x = F.adaptive_avg_pool2d(x, pool_to)
        pool_to = (int(pool_to[0]), int(pool_to[1]))
    if method == "uint8":
        buffers = None
        if out is not None:
            if out.scale is None or out.offset is None:
                raise ValueError("out must be a uint8 CompressedFeature (with scale and offset)")
            buffers = (out.payload, out.scale, out.offset)
        q, scale, offset = quantize_uint8(x, buffers)
        return CompressedFeature("uint8", q, scale, offset, x.dtype, original_shape, pool_to)
    target = {"float16": torch.float16, "bfloat16": torch.bfloat16, "none": x.dtype}[method]
    payload = torch.empty(x.shape, dtype=target, device=x.device) if out is None else out.payload
    payload.copy_(x)
    return CompressedFeature(method, payload, None, None, x.dtype, original_shape, pool_to)


def decompress_features(c: CompressedFeature) -> Tensor:
    """Restores a :class:`CompressedFeature` to its original dtype."""
    if c.method == "uint8":
        if c.scale is None or c.offset is None:
            raise ValueError("a uint8 CompressedFeature needs its scale and offset")
        return dequantize_uint8(c.payload, c.scale, c.offset, c.dtype)
    return c.payload.to(c.dtype)


# -- compact per-detection rows (logits, embeddings) -------------------------------------------

_PROJECTIONS: dict[tuple[int, int, int], Tensor] = {}
_PROJECTIONS_C: dict[tuple[int, int, int], np.ndarray] = {}


def c_order_projection(in_dim: int, out_dim: int, seed: int) -> np.ndarray:
    """:func:`random_projection` as a C-ordered numpy array (cached; BLAS reads it faster than
    the QR's column-major layout)."""
    key = (int(in_dim), int(out_dim), int(seed))
    cached = _PROJECTIONS_C.get(key)
    if cached is None:
        cached = np.ascontiguousarray(random_projection(in_dim, out_dim, seed).numpy())
        _PROJECTIONS_C[key] = cached
    return cached


FLOAT16_MAX = 65504.0


def random_projection(in_dim: int, out_dim: int, seed: int) -> Tensor:
    """A seeded random orthogonal projection ``Tensor[in_dim, out_dim]`` float32 (CPU), cached.

    The columns are orthonormal (QR of a Gaussian matrix drawn with ``torch.Generator``
    seeded by ``seed``: the same on every machine) and scaled by ``sqrt(in_dim / out_dim)``,
    so ``x @ P`` keeps squared lengths and distances in expectation (Johnson-Lindenstrauss:
    relative error of a squared distance about ``sqrt(2 / out_dim)``, README "Compact records").
    """
    key = (int(in_dim), int(out_dim), int(seed))
    cached = _PROJECTIONS.get(key)
    if cached is None:
        generator = torch.Generator().manual_seed(int(seed))
        wide = in_dim < out_dim  # e.g. the 16-d aggregate sketch of 3-d embeddings
        shape = (out_dim, in_dim) if wide else (in_dim, out_dim)
        gauss = torch.randn(*shape, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gauss)
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
        # Wider than its input: orthonormal rows, an exact isometry (no scaling needed); else
        # orthonormal columns scaled to keep squared lengths in expectation.
        cached = (q.T if wide else q * math.sqrt(in_dim / out_dim)).to(torch.float32)
        _PROJECTIONS[key] = cached
    return cached


# OpenBLAS runs a product on one thread below this many multiply-adds. Threaded BLAS (numpy's or
# torch's) is many times slower than one thread when the other cores are busy, e.g. with the
# model's own intra-op threads: the writer's products stay under it, in row blocks.
ONE_THREAD_MACS = 65536 * 4


def matmul_one_thread(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for ``a [N, K]``, ``b [K, M]``, computed in row blocks that BLAS keeps on one thread."""
    rows = max(1, (ONE_THREAD_MACS - 1) // max(1, a.shape[1] * b.shape[1]))
    if a.shape[0] <= rows:
        return a @ b
    out = np.empty((a.shape[0], b.shape[1]), np.result_type(a, b))
    for start in range(0, a.shape[0], rows):
        np.matmul(a[start : start + rows], b, out=out[start : start + rows])
    return out


def compact_rows(
    x: Tensor, precision: str, project_to: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Rows ``Tensor[N, W]`` in a storage precision: ``(values, scale, offset)``.

    Optionally projected first (``project_to`` < W: ``x @ random_projection(W, project_to, seed)``,
    on ``x``'s device). ``"float16"`` clamps finite values to +-65504 (inf and NaN kept);
    ``"bfloat16"`` gives the 16-bit pattern as int16; ``"uint8"`` per-row codes with float32
    ``scale`` and ``offset`` ``[N]`` (:func:`quantize_uint8`: error <= scale / 2, inf/NaN exact);
    ``"float32"`` a float32 copy. Scale and offset are None except for ``"uint8"``.
    """
    x = x.float()
    if project_to is not None and x.shape[-1] > project_to:
        if x.device.type == "cpu":  # the writer thread: BLAS on one thread (see matmul_one_thread)
            projection = c_order_projection(x.shape[-1], project_to, seed)
            x = torch.from_numpy(matmul_one_thread(x.detach().numpy(), projection))
        else:
            x = x @ random_projection(x.shape[-1], project_to, seed).to(x.device)
    if precision == "float32":
        return x, None, None
    if precision == "float16":
        # One cast; only values the cast took to +-inf though finite (beyond +-65520) are put
        # back to +-65504: the same halves as clamping the finite values first.
        values = x.half()
        overflow = torch.isinf(values)
        if bool(overflow.any()):
            overflow &= torch.isfinite(x)
            values[overflow] = torch.where(x[overflow] > 0, FLOAT16_MAX, -FLOAT16_MAX).half()
        return values, None, None
    if precision == "bfloat16":
        return x.bfloat16().view(torch.int16), None, None
    if precision == "uint8":
        if x.shape[0] == 0:
            empty = torch.empty(0, dtype=torch.float32, device=x.device)
            return torch.empty(x.shape, dtype=torch.uint8, device=x.device), empty, empty
        return quantize_uint8(x.contiguous())
    raise ValueError(f"precision must be float32, float16, bfloat16 or uint8, got {precision!r}")


def widen_rows(values: Tensor, scale: Tensor | None = None, offset: Tensor | None = None) -> Tensor:
    """The inverse of :func:`compact_rows` (up to its rounding): float32 ``Tensor[N, W]``.

    The dtype tells the precision: uint8 codes (with ``scale`` and ``offset``), int16/uint16
    bfloat16 patterns, float16, float32. Works without the compiled extension.
    """
    if values.dtype == torch.uint8:
        if scale is None or offset is None:
            raise ValueError("uint8 rows need their scale and offset")
        if values.shape[0] == 0:
            return torch.empty(values.shape, dtype=torch.float32)
        return dequantize_uint8(values, scale, offset, torch.float32)
    if values.dtype in (torch.int16, torch.uint16):
        return values.view(torch.bfloat16).float()
    return values.float()


@register_fake("pyodlog::quantize_uint8_out")
def _quantize_uint8_out_fake(x, q, scale, offset):
    torch._check(x.dim() == 2, lambda: f"x must have shape [R, S], got {tuple(x.shape)}")
    torch._check(
        q.shape == x.shape and q.dtype == torch.uint8, lambda: "q must be uint8 of x's shape"
    )
    torch._check(
        scale.shape == (x.shape[0],) and offset.shape == (x.shape[0],),
        lambda: "scale and offset must be [R]",
    )
    return None


@register_fake("pyodlog::dequantize_uint8")
def _dequantize_uint8_fake(q, scale, offset, dtype):
    torch._check(
        q.dim() == 2 and q.dtype == torch.uint8, lambda: "q must be a uint8 tensor of shape [R, S]"
    )
    return q.new_empty(q.shape, dtype=dtype)
