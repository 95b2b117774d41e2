#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/common/box_math.h"
#include "ops/scale_boxes.h"

namespace pyodlog {
namespace {

template <typename scalar_t>
__global__ void scale_boxes_kernel(
    const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, const float* __restrict__ from,
    const float* __restrict__ to, const int64_t* __restrict__ image_index, int64_t n, int64_t n_images,
    bool clip) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = image_index ? image_index[i] : 0;
    if (b < 0 || b >= n_images) {
      // Validated on the CPU; on the GPU an index out of range gives NaN boxes
      // rather than a host sync to raise.
      for (int k = 0; k < 4; ++k) dst[4 * i + k] = static_cast<scalar_t>(NAN);
      continue;
    }
    const float th = to[2 * b], tw = to[2 * b + 1];
    common::scale_box(src + 4 * i, dst + 4 * i, common::size_ratio(tw, from[2 * b + 1]),
                      common::size_ratio(th, from[2 * b]), clip, tw, th);
  }
}

at::Tensor scale_boxes_cuda(
    const at::Tensor& boxes,
    const at::Tensor& from_sizes,
    const at::Tensor& to_sizes,
    bool clip,
    const std::optional<at::Tensor>& image_index) {
  auto [from_f, to_f] = check_scale_boxes_args(boxes, from_sizes, to_sizes, image_index);
  const c10::cuda::CUDAGuard guard(boxes.device());
  const at::Tensor in = boxes.contiguous();
  at::Tensor out = at::empty_like(in);
  const int64_t n = in.size(0);
  if (n == 0) {
    return out;
  }
  at::Tensor index;
  if (image_index.has_value()) {
    index = image_index->to(at::kLong).contiguous();
  }
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "scale_boxes_cuda", [&] {
    scale_boxes_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        in.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), from_f.data_ptr<float>(),
        to_f.data_ptr<float>(), index.defined() ? index.data_ptr<int64_t>() : nullptr, n,
        from_f.size(0), clip);
  });
  AT_CUDA_CHECK(cudaGetLastError());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyodlog, CUDA, m) {
  m.impl("scale_boxes", &scale_boxes_cuda);
}

}  // namespace pyodlog
