// detection_uncertainty on the CPU: rows in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common/uncertainty_math.h"
#include "ops/uncertainty.h"

namespace pyodlog {
namespace cpu {
namespace {

UncertaintyResult detection_uncertainty_cpu(const at::Tensor& logits, int64_t kind) {
  check_uncertainty_args(logits, kind);
  auto result = empty_uncertainty_result(logits);
  auto& [entropy, margin, energy] = result;
  const int64_t c = logits.size(-1);
  const int64_t rows = c == 0 ? entropy.numel() : logits.numel() / c;
  if (rows == 0) {
    return result;
  }
  const at::Tensor z = logits.contiguous();
  float* h = entropy.data_ptr<float>();
  float* mg = margin.data_ptr<float>();
  float* e = energy.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "detection_uncertainty_cpu", [&] {
    const scalar_t* data = z.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        common::uncertainty_of(data + r * c, c, kind, h + r, mg + r, e + r);
      }
    });
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyodlog, CPU, m) {
  m.impl("detection_uncertainty", &detection_uncertainty_cpu);
}

}  // namespace cpu
}  // namespace pyodlog
