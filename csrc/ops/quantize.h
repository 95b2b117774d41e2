#pragma once
#include <ATen/ATen.h>

namespace pyodlog {

// Checks quantize_uint8_out's arguments: x [R, S] floating, q [R, S] uint8,
// scale and offset [R] float32, all contiguous on x's device.
void check_quantize_args(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& offset);

// Checks dequantize_uint8's arguments.
void check_dequantize_args(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& offset);

}  // namespace pyodlog
