// Per-row affine uint8 quantisation, shared by the CPU and CUDA kernels.
//
// Finite values map to codes 0..kMaxCode with x ~= code * scale + offset, where
// offset is the row's finite minimum and scale = (max - min) / kMaxCode, so the
// error is at most half a step. Non-finite values keep their own codes and
// round-trip exactly.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "ops/common/box_math.h"

namespace pyodlog {
namespace common {

constexpr uint8_t kMaxCode = 252;
constexpr uint8_t kCodeNegInf = 253;
constexpr uint8_t kCodePosInf = 254;
constexpr uint8_t kCodeNaN = 255;

PYODLOG_HOST_DEVICE bool is_finite_value(float v) {
  return v - v == 0.0f;  // inf - inf and NaN - NaN are NaN
}

// Running finite min/max; NaN and inf are skipped.
struct FiniteRange {
  float lo;
  float hi;
};

PYODLOG_HOST_DEVICE FiniteRange empty_range() {
  return {INFINITY, -INFINITY};
}

PYODLOG_HOST_DEVICE FiniteRange add_value(FiniteRange r, float v) {
  const bool finite = is_finite_value(v);
  r.lo = (finite && v < r.lo) ? v : r.lo;
  r.hi = (finite && v > r.hi) ? v : r.hi;
  return r;
}

PYODLOG_HOST_DEVICE FiniteRange merge(FiniteRange a, FiniteRange b) {
  return {b.lo < a.lo ? b.lo : a.lo, b.hi > a.hi ? b.hi : a.hi};
}

// scale, offset and the multiplier used to quantise, from a row's range.
struct QuantParams {
  float scale;
  float offset;
  float inv_scale;
};

PYODLOG_HOST_DEVICE QuantParams quant_params(FiniteRange r) {
  if (!(r.lo <= r.hi)) {  // no finite value at all
    return {0.0f, 0.0f, 0.0f};
  }
  // The range in double: hi - lo can overflow float.
  const double range = static_cast<double>(r.hi) - static_cast<double>(r.lo);
  if (range == 0.0) {
    return {0.0f, r.lo, 0.0f};
  }
  return {static_cast<float>(range / kMaxCode), r.lo, static_cast<float>(kMaxCode / range)};
}

// Branch-free so that the CPU loop vectorises: the finite code and the special
// code are both computed and one is selected.
PYODLOG_HOST_DEVICE uint8_t quantize_value(float v, QuantParams p) {
  float t = (v - p.offset) * p.inv_scale + 0.5f;
  t = t > 0.0f ? t : 0.0f;  // also maps NaN to 0 before the conversion
  t = t < static_cast<float>(kMaxCode) ? t : static_cast<float>(kMaxCode);
  const int finite_code = static_cast<int>(t);  // t >= 0: truncation is floor, i.e. round half up
  const int special = v != v ? kCodeNaN : (v > 0.0f ? kCodePosInf : kCodeNegInf);
  return static_cast<uint8_t>(is_finite_value(v) ? finite_code : special);
}

PYODLOG_HOST_DEVICE float dequantize_value(uint8_t code, float scale, float offset) {
  if (code > kMaxCode) {
    return code == kCodeNaN ? NAN : (code == kCodePosInf ? INFINITY : -INFINITY);
  }
  return static_cast<float>(code) * scale + offset;
}

}  // namespace common
}  // namespace pyodlog
