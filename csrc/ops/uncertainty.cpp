// detection_uncertainty: entropy, margin and energy of each logit vector (the
// last axis), for softmax heads (kind 0) or per-class sigmoid heads (kind 1);
// the arithmetic is ops/common/uncertainty_math.h.
#include "ops/uncertainty.h"

#include <torch/library.h>

#include "ops/common/checks.h"
#include "ops/common/uncertainty_math.h"

namespace pyodlog {

void check_uncertainty_args(const at::Tensor& logits, int64_t kind) {
  TORCH_CHECK(logits.dim() >= 1, "logits must have at least one axis (the classes), got a scalar");
  checks::floating(logits, "logits");
  TORCH_CHECK(kind == common::kSoftmaxHead || kind == common::kSigmoidHead,
              "kind must be 0 (softmax head) or 1 (per-class sigmoid head), got ", kind);
}

UncertaintyResult empty_uncertainty_result(const at::Tensor& logits) {
  auto shape = logits.sizes().vec();
  shape.pop_back();
  const auto options = logits.options().dtype(at::kFloat);
  return {at::empty(shape, options), at::empty(shape, options), at::empty(shape, options)};
}

}  // namespace pyodlog

TORCH_LIBRARY_FRAGMENT(pyodlog, m) {
  m.def("detection_uncertainty(Tensor logits, int kind) -> (Tensor entropy, Tensor margin, Tensor energy)");
}
