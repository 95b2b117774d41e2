#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace pyodlog {

using UncertaintyResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Validates detection_uncertainty's arguments.
void check_uncertainty_args(const at::Tensor& logits, int64_t kind);

// Allocates entropy, margin, energy: float32 of logits' shape without its last axis.
UncertaintyResult empty_uncertainty_result(const at::Tensor& logits);

}  // namespace pyodlog
