// Argument checks shared by every device's entry point of an operator, so an
// error reads the same on the CPU and the GPU.
#pragma once

#include <ATen/ATen.h>

namespace pyodlog {
namespace checks {

inline void floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      at::isFloatingType(t.scalar_type()),
      name, " must be a floating-point tensor (float32, float16, bfloat16 or float64), got ",
      t.scalar_type());
}

inline void boxes_nx4(const at::Tensor& boxes, const char* name = "boxes") {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4,
              name, " must have shape [N, 4] (x1, y1, x2, y2), got ", boxes.sizes());
  floating(boxes, name);
}

inline void sizes_bx2(const at::Tensor& sizes, const char* name) {
  TORCH_CHECK(sizes.dim() == 2 && sizes.size(1) == 2,
              name, " must have shape [B, 2] holding (height, width) per image, got ", sizes.sizes());
  TORCH_CHECK(sizes.scalar_type() != at::kBool && !at::isComplexType(sizes.scalar_type()),
              name, " must hold integer or floating sizes, got ", sizes.scalar_type());
}

inline void index_n(const at::Tensor& index, int64_t n, const char* name) {
  TORCH_CHECK(index.dim() == 1 && index.size(0) == n,
              name, " must have shape [", n, "] (one entry per box), got ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
              name, " must be an int64 or int32 tensor, got ", index.scalar_type());
}

inline void same_device(const at::Tensor& a, const at::Tensor& b, const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), name_a, " and ", name_b,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

}  // namespace checks
}  // namespace pyodlog
