"""Feature compression: uint8 quantisation against a plain-PyTorch reference, casts, pooling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyodlog.ops import compress_features, dequantize_uint8, quantize_uint8
from pyodlog.ops.compression import CODE_NAN, CODE_NEG_INF, CODE_POS_INF, MAX_CODE

# Half a step, plus the float32 rounding of code * scale + offset.
BOUND_SLACK = 1e-4


def reference_quantize(x2d: torch.Tensor):
    """Plain PyTorch: finite min/max per row, codes 0..252, specials for non-finite."""
    x = x2d.double()
    finite = torch.isfinite(x)
    lo = torch.where(finite, x, torch.inf).amin(1)
    hi = torch.where(finite, x, -torch.inf).amax(1)
    has = finite.any(1)
    lo = torch.where(has, lo, 0.0)
    hi = torch.where(has, hi, 0.0)
    scale = (hi - lo) / MAX_CODE
    return lo, scale


def assert_within_half_step(x, restored, scale):
    rows = scale.numel()
    x2, r2 = x.reshape(rows, -1).double(), restored.reshape(rows, -1).double()
    finite = torch.isfinite(x2)
    err = torch.where(finite, (x2 - r2).abs(), 0.0).amax(1)
    bound = scale.double() / 2 * (1 + BOUND_SLACK) + x2.abs().where(finite, 0.0).amax(1) * 1e-6
    assert (err <= bound).all(), f"error {float((err - bound).max())} over the bound"


@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (4, 16), (33,), (1, 1, 1, 1), (2, 5, 300)])
def test_error_is_at_most_half_a_step_per_channel(device, shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 10).to(device)
    q, scale, offset = quantize_uint8(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    lo, ref_scale = reference_quantize(x.reshape(scale.numel(), -1).cpu())
    torch.testing.assert_close(offset.cpu().double(), lo, rtol=0, atol=0)
    torch.testing.assert_close(scale.cpu().double(), ref_scale, rtol=1e-6, atol=0)
    assert int(q.max()) <= MAX_CODE
    assert_within_half_step(x.cpu(), dequantize_uint8(q, scale, offset).cpu(), scale.cpu())


def test_constant_and_all_zero_channels_come_back_exactly(device):
    x = torch.zeros(2, 3, 4, 4, device=device)
    x[0, 1] = 3.25
    x[1, 2] = -7.5
    q, scale, offset = quantize_uint8(x)
    assert (scale == 0).all()
    assert torch.equal(dequantize_uint8(q, scale, offset), x)


def test_nan_and_inf_round_trip_and_do_not_spoil_the_channel(device):
    x = torch.tensor(
        [
            [1.0, float("nan"), 3.0, float("inf"), -float("inf"), 2.0],
            [float("nan")] * 6,
            [float("inf"), -float("inf"), float("inf"), 5.0, 5.0, 5.0],
        ],
        device=device,
    )
    q, scale, offset = quantize_uint8(x)
    assert q[0, 1] == CODE_NAN and q[0, 3] == CODE_POS_INF and q[0, 4] == CODE_NEG_INF
    assert offset[0].item() == 1.0 and scale[0].item() == pytest.approx(2.0 / MAX_CODE)
    assert scale[1].item() == 0.0 and offset[1].item() == 0.0
    restored = dequantize_uint8(q, scale, offset)
    same = (restored == x) | (torch.isnan(restored) & torch.isnan(x))
    assert same[:, [1, 3, 4]].all() and same[1:].all()
    assert_within_half_step(x.cpu(), restored.cpu(), scale.cpu())


def test_huge_range_does_not_overflow(device):
    x = torch.tensor([[-3e38, 0.0, 3e38]], device=device)
    q, scale, _offset = quantize_uint8(x)
    assert q.tolist() == [[0, 126, 252]]
    assert torch.isfinite(scale).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(device, dtype):
    x = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(1)).to(
        device=device, dtype=dtype
    )
    c = compress_features(x, "uint8")
    assert c.decompress().dtype == dtype
    # The bound holds for the float32 restoration; casting it back to a 16-bit
    # dtype then adds that dtype's own rounding.
    restored = dequantize_uint8(c.payload, c.scale, c.offset, torch.float32)
    assert_within_half_step(x.float().cpu(), restored.cpu(), c.scale.cpu())


def test_preallocated_buffers_are_reused(device):
    x = torch.randn(2, 8, 6, 6, device=device)
    first = compress_features(x, "uint8")
    second = compress_features(x * 2, "uint8", out=first)
    assert second.payload.data_ptr() == first.payload.data_ptr()
    assert_within_half_step((x * 2).cpu(), second.decompress().cpu(), second.scale.cpu())


@pytest.mark.parametrize(
    "method, dtype",
    [("float16", torch.float16), ("bfloat16", torch.bfloat16), ("none", torch.float32)],
)
def test_casts(device, method, dtype):
    x = torch.randn(2, 4, 5, 5, device=device)
    c = compress_features(x, method)
    assert c.payload.dtype == dtype and c.scale is None
    torch.testing.assert_close(c.decompress(), x.to(dtype).float(), rtol=0, atol=0)


def test_pooling_to_a_grid_then_quantising(device):
    x = torch.randn(2, 4, 20, 30, device=device)
    c = compress_features(x, "uint8", pool_to=(5, 6))
    assert (
        c.payload.shape == (2, 4, 5, 6)
        and c.original_shape == (2, 4, 20, 30)
        and c.pooled_to == (5, 6)
    )
    pooled = F.adaptive_avg_pool2d(x, (5, 6))
    assert_within_half_step(pooled.cpu(), c.decompress().cpu(), c.scale.cpu())
    assert c.nbytes == 2 * 4 * 5 * 6 + 2 * 8 * 4


def test_compressed_copy_does_not_follow_later_in_place_changes(device):
    x = torch.randn(1, 2, 4, 4, device=device)
    c = compress_features(x, "none")
    before = c.payload.clone()
    x.add_(100.0)
    assert torch.equal(c.payload, before)


def test_empty_tensor(device):
    c = compress_features(torch.empty(0, 3, 4, 4, device=device), "uint8")
    assert c.payload.shape == (0, 3, 4, 4) and c.decompress().shape == (0, 3, 4, 4)


def test_wrong_input_gets_a_clear_error():
    with pytest.raises(ValueError, match="method must be one of"):
        compress_features(torch.randn(2, 2), "int4")
    with pytest.raises(ValueError, match="only floating-point"):
        compress_features(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"pool_to needs an \[N, C, H, W\]"):
        compress_features(torch.randn(2, 3), pool_to=(1, 1))
    with pytest.raises(RuntimeError, match="q must be a contiguous uint8 tensor"):
        torch.ops.pyodlog.quantize_uint8_out(
            torch.randn(2, 3), torch.empty(2, 3), torch.empty(2), torch.empty(2)
        )
    with pytest.raises(
        RuntimeError, match=r"scale must be a contiguous float32 tensor of shape \[2\]"
    ):
        torch.ops.pyodlog.quantize_uint8_out(
            torch.randn(2, 3), torch.empty(2, 3, dtype=torch.uint8), torch.empty(3), torch.empty(2)
        )


def test_opcheck(device):
    x = torch.randn(6, 50, device=device)
    q = torch.empty(6, 50, dtype=torch.uint8, device=device)
    scale, offset = torch.empty(6, device=device), torch.empty(6, device=device)
    torch.library.opcheck(torch.ops.pyodlog.quantize_uint8_out.default, (x, q, scale, offset))
    quantize_uint8(x, (q, scale, offset))
    torch.library.opcheck(
        torch.ops.pyodlog.dequantize_uint8.default, (q, scale, offset, torch.float32)
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU present")
def test_cuda_codes_equal_cpu_codes():
    x = torch.randn(4, 32, 17, 19, generator=torch.Generator().manual_seed(3))
    x[0, 0, 0, 0] = float("nan")
    x[1, 1, 1, 1] = float("inf")
    cpu = quantize_uint8(x)
    gpu = quantize_uint8(x.cuda())
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU present")
@pytest.mark.parametrize(
    "shape, offset",
    [
        ((3, 5, 100, 100), 0),  # long rows (>= 8192), float4 loads: one row per multiprocessor
        ((3, 5, 100, 101), 0),  # long rows of odd length: the scalar long-row path
        ((2, 3, 100, 100), 1),  # a storage offset that breaks 16-byte alignment: scalar path
        ((8, 64, 12), 0),  # short rows, float4 loads
    ],
)
def test_cuda_codes_equal_cpu_codes_on_every_kernel_path(shape, offset):
    n = torch.Size(shape).numel()
    flat = torch.randn(n + offset, generator=torch.Generator().manual_seed(4)) * 7
    x = flat[offset:].reshape(shape)
    x.view(-1)[:: max(1, n // 5)] = float("nan")
    x.view(-1)[3] = float("-inf")
    x.view(-1)[-2] = float("inf")
    x[0, 1] = 2.5  # a constant channel
    cpu = quantize_uint8(x)
    gpu = quantize_uint8(flat.cuda()[offset:].reshape(shape))
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
