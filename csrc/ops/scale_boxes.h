#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace pyodlog {

// Validates scale_boxes' arguments and returns (from_sizes, to_sizes) as float32
// contiguous [B, 2] tensors on the boxes' device.
std::pair<at::Tensor, at::Tensor> check_scale_boxes_args(
    const at::Tensor& boxes,
    const at::Tensor& from_sizes,
    const at::Tensor& to_sizes,
    const std::optional<at::Tensor>& image_index);

}  // namespace pyodlog
