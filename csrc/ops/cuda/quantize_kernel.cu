// Per-row uint8 quantisation on the GPU: a block-wide min/max reduction over a
// row, then the quantisation pass over the same row. Same arithmetic as the CPU
// (common/quantize_math.h), so both devices give the same codes.
//
// Bandwidth (measured on an H200, [8, 256, 200, 200] float32): the first version
// (one block of 256 threads per row, scalar loads and byte stores, as many rows in
// flight as blocks fit) reached 31% of a device-to-device copy, because its second
// pass re-read rows that no longer fit in L2. Long rows now go one row per
// multiprocessor at a time (1024 threads, so the rows in flight, ~rows x SMs, stay
// inside L2 and the second pass reads from it), with 16-byte loads and 4-byte stores
// where the row allows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "ops/common/quantize_math.h"
#include "ops/quantize.h"

namespace pyodlog {
namespace cuda {
namespace {

// Rows at least this long go one per multiprocessor (the L2-resident path).
constexpr int64_t kLongRow = 8192;

// The block's finite range of its per-thread ranges; every thread gets the parameters.
template <int kThreads>
__device__ common::QuantParams block_params(common::FiniteRange range, float* lo_shared, float* hi_shared,
                                            common::QuantParams* params, float* scale, float* offset, int64_t r) {
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
    *params = common::quant_params(total);
    scale[r] = params->scale;
    offset[r] = params->offset;
  }
  __syncthreads();
  return *params;
}

// kVector: float rows whose length is a multiple of 4 and whose storage is 16-byte aligned
// (checked on the host) are read as float4 and written as uchar4.
template <typename T, int kThreads, bool kVector>
__global__ void __launch_bounds__(kThreads)
    quantize_rows_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, int64_t rows, int64_t cols,
                         float* __restrict__ scale, float* __restrict__ offset) {
  __shared__ float lo_shared[kThreads / 32];
  __shared__ float hi_shared[kThreads / 32];
  __shared__ common::QuantParams params;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = x + r * cols;
    uint8_t* out = q + r * cols;
    common::FiniteRange range = common::empty_range();
    if constexpr (kVector) {
      const float4* row4 = reinterpret_cast<const float4*>(row);
      const int64_t n4 = cols / 4;
#pragma unroll 4
      for (int64_t j = threadIdx.x; j < n4; j += kThreads) {
        const float4 v = row4[j];
        range = common::add_value(common::add_value(common::add_value(common::add_value(range, v.x), v.y), v.z), v.w);
      }
    } else {
      for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
        range = common::add_value(range, static_cast<float>(row[j]));
      }
    }
    const common::QuantParams p =
        block_params<kThreads>(range, lo_shared, hi_shared, &params, scale, offset, r);
    if constexpr (kVector) {
      const float4* row4 = reinterpret_cast<const float4*>(row);
      uchar4* out4 = reinterpret_cast<uchar4*>(out);
      const int64_t n4 = cols / 4;
#pragma unroll 4
      for (int64_t j = threadIdx.x; j < n4; j += kThreads) {
        const float4 v = row4[j];
        out4[j] = make_uchar4(common::quantize_value(v.x, p), common::quantize_value(v.y, p),
                              common::quantize_value(v.z, p), common::quantize_value(v.w, p));
      }
    } else {
      for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
        out[j] = common::quantize_value(static_cast<float>(row[j]), p);
      }
    }
    __syncthreads();  // params is rewritten for the next row
  }
}

template <typename T, int kThreads>
void launch_quantize(const T* x, uint8_t* q, int64_t rows, int64_t cols, float* scale, float* offset,
                     int64_t blocks, cudaStream_t stream) {
  if constexpr (std::is_same<T, float>::value) {
    if (cols % 4 == 0 && reinterpret_cast<std::uintptr_t>(x) % 16 == 0 && reinterpret_cast<std::uintptr_t>(q) % 4 == 0) {
      quantize_rows_kernel<T, kThreads, true><<<blocks, kThreads, 0, stream>>>(x, q, rows, cols, scale, offset);
      return;
    }
  }
  quantize_rows_kernel<T, kThreads, false><<<blocks, kThreads, 0, stream>>>(x, q, rows, cols, scale, offset);
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
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "quantize_uint8_cuda", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    uint8_t* qp = q.data_ptr<uint8_t>();
    if (cols >= kLongRow) {
      launch_quantize<scalar_t, 1024>(xp, qp, rows, cols, scale.data_ptr<float>(), offset.data_ptr<float>(),
                                      std::min<int64_t>(rows, sms), stream);
    } else {
      launch_quantize<scalar_t, 256>(xp, qp, rows, cols, scale.data_ptr<float>(), offset.data_ptr<float>(),
                                     std::min<int64_t>(rows, 65535), stream);
    }
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
    constexpr int kThreads = 256;
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
