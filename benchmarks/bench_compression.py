"""Feature compression of a [8, 256, 80, 80] float32 activation (an FPN level of a batch of 8).

Baseline: a plain ``copy_`` of the same tensor into a preallocated buffer — the
least any logger must do to keep the activation. Outputs are preallocated for
every variant (fresh large CPU allocations page-fault and would dominate).
"""

from __future__ import annotations

import pytest
import torch

from pyodlog.ops import quantize_uint8

SHAPE = (8, 256, 80, 80)


def _naive_quantize(x):
    rows = x.reshape(SHAPE[0] * SHAPE[1], -1)
    lo = rows.amin(1, keepdim=True)
    hi = rows.amax(1, keepdim=True)
    scale = (hi - lo) / 252
    return ((rows - lo) / scale).round_().clamp_(0, 252).to(torch.uint8), scale, lo


def _variants(device):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(device)
    rows = SHAPE[0] * SHAPE[1]
    copy_dst = torch.empty_like(x)
    half_dst = torch.empty_like(x, dtype=torch.float16)
    q = (
        torch.empty_like(x, dtype=torch.uint8),
        torch.empty(rows, device=device),
        torch.empty(rows, device=device),
    )
    return {
        "copy_ (baseline)": lambda: copy_dst.copy_(x),
        "pyodlog uint8": lambda: quantize_uint8(x, q),
        "float16 cast": lambda: half_dst.copy_(x),
        "naive pytorch uint8": lambda: _naive_quantize(x),
    }


@pytest.mark.parametrize(
    "variant", ["copy_ (baseline)", "pyodlog uint8", "float16 cast", "naive pytorch uint8"]
)
def test_compress_cpu(benchmark, variant):
    fn = _variants("cpu")[variant]
    benchmark.group = "compression cpu [8, 256, 80, 80] float32"
    benchmark.extra_info["role"] = "baseline" if variant.startswith("copy_") else variant
    benchmark(fn)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU present")
@pytest.mark.parametrize(
    "variant", ["copy_ (baseline)", "pyodlog uint8", "float16 cast", "naive pytorch uint8"]
)
def test_compress_cuda(benchmark, variant):
    fn = _variants("cuda")[variant]

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.group = "compression cuda [8, 256, 80, 80] float32"
    benchmark.extra_info["role"] = "baseline" if variant.startswith("copy_") else variant
    # Bytes moved, for the bandwidth column: read float32, write the output.
    out_bytes = {
        "copy_ (baseline)": 4,
        "pyodlog uint8": 1,
        "float16 cast": 2,
        "naive pytorch uint8": 1,
    }[variant]
    benchmark.extra_info["bytes"] = torch.Size(SHAPE).numel() * (4 + out_bytes)
    benchmark(run)
