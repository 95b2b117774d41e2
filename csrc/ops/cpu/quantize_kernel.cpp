// Per-row uint8 quantisation on the CPU: rows in parallel; each row is read
// once for its range and once more, from cache, to quantise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common/quantize_math.h"
#include "ops/quantize.h"

namespace pyodlog {
namespace cpu {
namespace {

// Rows of float32 are the common case: compiled for AVX2 as well as the
// baseline and picked by the CPU at load time.
__attribute__((target_clones("avx2", "default"))) void quantize_row_f32(const float* __restrict x,
                                                                        uint8_t* __restrict q, int64_t n,
                                                                        float* scale, float* offset) {
  // Fast path: plain min/max in several lanes (one minps/maxps each: a NaN
  // never wins a comparison, so NaNs are skipped for free). Only a row whose
  // min or max came out infinite is scanned again, finite values only.
  constexpr int kLanes = 16;
  float lo[kLanes], hi[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    lo[l] = INFINITY;
    hi[l] = -INFINITY;
  }
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = x[i + l];
      lo[l] = v < lo[l] ? v : lo[l];
      hi[l] = v > hi[l] ? v : hi[l];
    }
  }
  common::FiniteRange range = common::empty_range();
  for (int l = 0; l < kLanes; ++l) {
    range = common::merge(range, {lo[l], hi[l]});
  }
  for (; i < n; ++i) {
    range = common::add_value(range, x[i]);
  }
  if (!common::is_finite_value(range.lo) || !common::is_finite_value(range.hi)) {
    range = common::empty_range();
    for (int64_t j = 0; j < n; ++j) {
      range = common::add_value(range, x[j]);
    }
  }
  const common::QuantParams p = common::quant_params(range);
  for (int64_t j = 0; j < n; ++j) {
    q[j] = common::quantize_value(x[j], p);
  }
  *scale = p.scale;
  *offset = p.offset;
}

template <typename T>
void quantize_row(const T* x, uint8_t* q, int64_t n, float* scale, float* offset) {
  common::FiniteRange range = common::empty_range();
  for (int64_t i = 0; i < n; ++i) {
    range = common::add_value(range, static_cast<float>(x[i]));
  }
  const common::QuantParams p = common::quant_params(range);
  for (int64_t j = 0; j < n; ++j) {
    q[j] = common::quantize_value(static_cast<float>(x[j]), p);
  }
  *scale = p.scale;
  *offset = p.offset;
}

inline void quantize_row(const float* x, uint8_t* q, int64_t n, float* scale, float* offset) {
  quantize_row_f32(x, q, n, scale, offset);
}

void quantize_uint8_out_cpu(const at::Tensor& x, at::Tensor& q, at::Tensor& scale, at::Tensor& offset) {
  check_quantize_args(x, q, scale, offset);
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0), cols = xc.size(1);
  if (rows == 0) {
    return;
  }
  uint8_t* q_ptr = q.data_ptr<uint8_t>();
  float* scale_ptr = scale.data_ptr<float>();
  float* offset_ptr = offset.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "quantize_uint8_cpu", [&] {
    const scalar_t* x_ptr = xc.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        quantize_row(x_ptr + r * cols, q_ptr + r * cols, cols, scale_ptr + r, offset_ptr + r);
      }
    });
  });
}

at::Tensor dequantize_uint8_cpu(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& offset,
                                at::ScalarType dtype) {
  check_dequantize_args(q, scale, offset);
  const at::Tensor qc = q.contiguous(), sc = scale.contiguous(), oc = offset.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  const int64_t rows = q.size(0), cols = q.size(1);
  const uint8_t* q_ptr = qc.data_ptr<uint8_t>();
  const float* s_ptr = sc.data_ptr<float>();
  const float* o_ptr = oc.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = 0; j < cols; ++j) {
        out_ptr[r * cols + j] = common::dequantize_value(q_ptr[r * cols + j], s_ptr[r], o_ptr[r]);
      }
    }
  });
  return dtype == at::kFloat ? out : out.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyodlog, CPU, m) {
  m.impl("quantize_uint8_out", &quantize_uint8_out_cpu);
  m.impl("dequantize_uint8", &dequantize_uint8_cpu);
}

}  // namespace cpu
}  // namespace pyodlog
