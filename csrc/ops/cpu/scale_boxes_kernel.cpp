#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common/box_math.h"
#include "ops/scale_boxes.h"

namespace pyodlog {
namespace {

at::Tensor scale_boxes_cpu(
    const at::Tensor& boxes,
    const at::Tensor& from_sizes,
    const at::Tensor& to_sizes,
    bool clip,
    const std::optional<at::Tensor>& image_index) {
  auto [from_f, to_f] = check_scale_boxes_args(boxes, from_sizes, to_sizes, image_index);
  const int64_t n = boxes.size(0);
  const int64_t n_images = from_f.size(0);
  const float* from = from_f.data_ptr<float>();
  const float* to = to_f.data_ptr<float>();
  for (int64_t b = 0; b < n_images; ++b) {
    TORCH_CHECK(from[2 * b] > 0 && from[2 * b + 1] > 0 && to[2 * b] > 0 && to[2 * b + 1] > 0,
                "image sizes must be positive, got from_sizes[", b, "] = (", from[2 * b], ", ",
                from[2 * b + 1], ") and to_sizes[", b, "] = (", to[2 * b], ", ", to[2 * b + 1], ")");
  }
  at::Tensor index;
  if (image_index.has_value()) {
    index = image_index->to(at::kLong).contiguous();
    const int64_t* idx = index.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(idx[i] >= 0 && idx[i] < n_images, "image_index[", i, "] = ", idx[i],
                  " is out of range for ", n_images, " images");
    }
  }
  const at::Tensor in = boxes.contiguous();
  at::Tensor out = at::empty_like(in);
  if (n == 0) {
    return out;
  }
  const int64_t* idx = index.defined() ? index.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "scale_boxes_cpu", [&] {
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = idx ? idx[i] : 0;
        const float th = to[2 * b], tw = to[2 * b + 1];
        common::scale_box(src + 4 * i, dst + 4 * i, common::size_ratio(tw, from[2 * b + 1]),
                          common::size_ratio(th, from[2 * b]), clip, tw, th);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyodlog, CPU, m) {
  m.impl("scale_boxes", &scale_boxes_cpu);
}

}  // namespace pyodlog
