// Per-row uint8 quantisation on the GPU: one block per row (grid-strided),
// a block-wide min/max reduction, then the quantisation pass (the row is then
// usually still in L2). Same arithmetic as the CPU (common/quantize_math.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/common/quantize_math.h"
#include "ops/quantize.h"

namespace pyodlog {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void quantize_rows_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, int64_t rows, int64_t cols,
                                     float* __restrict__ scale, float* __restrict__ offset) {
  __shared__ float lo_shared[kThreads / 32];
  __shared__ float hi_shared[kThreads / 32];
  __shared__ common::QuantParams params;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = x + r * cols;
    common::FiniteRange range = common::empty_range();
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      range = common::add_value(range, static_cast<float>(row[j]));
    }
    for (int delta = 16; delta > 0; delta >>= 1) {
      range = common::merge(range, {__shfl_down_sync(0xffffffffu, range.lo, delta),
                                    __shfl_down_sync(0xffffffffu, range.hi, delta)});
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
      lo_shared[warp] = range.lo;
      hi_shared[warp] = range.hi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      common::FiniteRange total = common::empty_range();
      for (int w = 0; w < kThreads / 32; ++w) {
        total = common::merge(total, {lo_shared[w], hi_shared[w]});
      }
      params = common::quant_params(total);
      scale[r] = params.scale;
      offset[r] = params.offset;
    }
    __syncthreads();
    const common::QuantParams p = params;
    uint8_t* out = q + r * cols;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      out[j] = common::quantize_value(static_cast<float>(row[j]), p);
    }
    __syncthreads();  // params is rewritten for the next row
  }
}

__global__ void dequantize_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scale,
                                  const float* __restrict__ offset, int64_t rows, int64_t cols, float* __restrict__ out) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t r = i / cols;
    out[i] = common::dequantize_value(q[i], scale[r], offset[r]);
  }
}

void quantize_uint8_out_cuda(const at::Tensor& x, at::Tensor& q, at::Tensor& scale, at::Tensor& offset) {
  check_quantize_args(x, q, scale, offset);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0), cols = xc.size(1);
  if (rows == 0) {
    return;
  }
  const int64_t blocks = std::min<int64_t>(rows, 65535);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "quantize_uint8_cuda", [&] {
    quantize_rows_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        xc.data_ptr<scalar_t>(), q.data_ptr<uint8_t>(), rows, cols, scale.data_ptr<float>(), offset.data_ptr<float>());
  });
  AT_CUDA_CHECK(cudaGetLastError());
}

at::Tensor dequantize_uint8_cuda(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& offset,
                                 at::ScalarType dtype) {
  check_dequantize_args(q, scale, offset);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), sc = scale.contiguous(), oc = offset.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  const int64_t n = q.numel();
  if (n > 0) {
    const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535);
    dequantize_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        qc.data_ptr<uint8_t>(), sc.data_ptr<float>(), oc.data_ptr<float>(), q.size(0), q.size(1),
        out.data_ptr<float>());
    AT_CUDA_CHECK(cudaGetLastError());
  }
  return dtype == at::kFloat ? out : out.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyodlog, CUDA, m) {
  m.impl("quantize_uint8_out", &quantize_uint8_out_cuda);
  m.impl("dequantize_uint8", &dequantize_uint8_cuda);
}

}  // namespace cuda
}  // namespace pyodlog
