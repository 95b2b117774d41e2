// detection_uncertainty on the GPU: one thread per row, the arithmetic of the
// CPU kernel (ops/common/uncertainty_math.h). No host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/common/uncertainty_math.h"
#include "ops/uncertainty.h"

namespace pyodlog {
namespace cuda {
namespace {

template <typename T>
__global__ void uncertainty_kernel(const T* __restrict__ z, int64_t rows, int64_t c, int64_t kind,
                                   float* __restrict__ entropy, float* __restrict__ margin,
                                   float* __restrict__ energy) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    common::uncertainty_of(z + r * c, c, kind, entropy + r, margin + r, energy + r);
  }
}

UncertaintyResult detection_uncertainty_cuda(const at::Tensor& logits, int64_t kind) {
  check_uncertainty_args(logits, kind);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto result = empty_uncertainty_result(logits);
  auto& [entropy, margin, energy] = result;
  const int64_t c = logits.size(-1);
  const int64_t rows = c == 0 ? entropy.numel() : logits.numel() / c;
  if (rows == 0) {
    return result;
  }
  const at::Tensor z = logits.contiguous();
  const int threads = 128;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((rows + threads - 1) / threads, 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "detection_uncertainty_cuda", [&] {
    uncertainty_kernel<scalar_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        z.data_ptr<scalar_t>(), rows, c, kind, entropy.data_ptr<float>(), margin.data_ptr<float>(),
        energy.data_ptr<float>());
  });
  AT_CUDA_CHECK(cudaGetLastError());
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyodlog, CUDA, m) {
  m.impl("detection_uncertainty", &detection_uncertainty_cuda);
}

}  // namespace cuda
}  // namespace pyodlog
