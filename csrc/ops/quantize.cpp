// Feature compression: per-row affine uint8 quantisation and its inverse.
// A row is one (sample, channel) of a captured activation.
#include "ops/quantize.h"

#include <torch/library.h>

#include "ops/common/checks.h"

namespace pyodlog {

void check_quantize_args(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& offset) {
  TORCH_CHECK(x.dim() == 2, "x must have shape [R, S] (rows quantised independently), got ", x.sizes());
  checks::floating(x, "x");
  TORCH_CHECK(q.scalar_type() == at::kByte && q.sizes() == x.sizes() && q.is_contiguous(),
              "q must be a contiguous uint8 tensor of x's shape ", x.sizes(), ", got ", q.scalar_type(), " ", q.sizes());
  for (const auto& [t, name] : {std::pair{&scale, "scale"}, std::pair{&offset, "offset"}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == x.size(0) && t->is_contiguous(),
                name, " must be a contiguous float32 tensor of shape [", x.size(0), "], got ", t->scalar_type(), " ",
                t->sizes());
    checks::same_device(x, *t, "x", name);
  }
  checks::same_device(x, q, "x", "q");
}

void check_dequantize_args(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& offset) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte, "q must be a uint8 tensor of shape [R, S], got ",
              q.scalar_type(), " ", q.sizes());
  for (const auto& [t, name] : {std::pair{&scale, "scale"}, std::pair{&offset, "offset"}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == q.size(0), name,
                " must be a float32 tensor of shape [", q.size(0), "], got ", t->scalar_type(), " ", t->sizes());
    checks::same_device(q, *t, "q", name);
  }
}

}  // namespace pyodlog

TORCH_LIBRARY_FRAGMENT(pyodlog, m) {
  m.def("quantize_uint8_out(Tensor x, Tensor(a!) q, Tensor(b!) scale, Tensor(c!) offset) -> ()");
  m.def("dequantize_uint8(Tensor q, Tensor scale, Tensor offset, ScalarType dtype) -> Tensor");
}
