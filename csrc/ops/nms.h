#pragma once
#include <ATen/ATen.h>

namespace pyodlog {

// Validates batched_nms' arguments (shapes, dtypes, devices, threshold).
void check_batched_nms_args(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs, double iou_threshold);

// The dtype NMS computes in: float for float/half/bfloat16, double for double.
inline at::ScalarType nms_compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace pyodlog
