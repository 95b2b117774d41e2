// Which rows of raw class logits can hold a pair whose activated score passes a
// threshold, decided in logit space without computing the activation.
//
// The exact score of a pair is torch's own float activation (sigmoid, or FCOS's
// sqrt(sigmoid(logit) * sigmoid(centerness))), compared with the threshold as
// the detection heads compare it. A logit-space bound can only say which pairs
// surely fail: torch's float sigmoid is not correctly rounded (nor exactly
// monotone at the last bit), float16/bfloat16 round it further, so the bound is
// taken below the threshold with a wide margin (2 % of the threshold plus
// 1e-6, far above any of those errors) and every pair above the bound gets its
// exact score computed; the exact comparison decides. NaN logits always pass
// the bound (their score is computed, NaN, and fails the exact comparison).
#pragma once

#include <cmath>
#include <limits>

#include "ops/common/box_math.h"

namespace pyodlog {
namespace common {

constexpr double kActivationRelativeMargin = 0.02;
constexpr double kActivationAbsoluteMargin = 1e-6;

// A probability below every activated score that passes `thresh` (<= 0: no bound exists,
// every pair must be scored).
PYODLOG_HOST_DEVICE double activated_lower_bound(double thresh) {
  return thresh - kActivationRelativeMargin * std::fabs(thresh) - kActivationAbsoluteMargin;
}

// The logit whose sigmoid is probability `p` (0 < p), +inf from p >= 1 (no logit reaches it).
PYODLOG_HOST_DEVICE double logit_of(double p) {
  if (!(p < 1.0)) {
    return std::numeric_limits<double>::infinity();
  }
  return std::log(p) - std::log1p(-p);
}

// The largest float not above `v` (a float bound that stays on the safe side of a double one).
PYODLOG_HOST_DEVICE float float_at_most(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) > v) {
    f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  }
  return f;
}

// The class-logit bound of a row with a centerness logit: sqrt(sigmoid(x) * sigmoid(c)) >
// thresh needs sigmoid(x) > thresh^2 / sigmoid(c). `lower` is activated_lower_bound(thresh) > 0.
// A NaN centerness returns -inf (the row is scored: NaN scores then fail exactly).
PYODLOG_HOST_DEVICE double centerness_logit_bound(double lower, double centerness) {
  if (std::isnan(centerness)) {
    return -std::numeric_limits<double>::infinity();
  }
  const double sc = 1.0 / (1.0 + std::exp(-centerness));
  if (!(sc > 0.0)) {
    return std::numeric_limits<double>::infinity();  // score 0: cannot pass a positive threshold
  }
  return logit_of(lower * lower / sc);
}

// Whether logit `x` may pass: above the bound, or NaN.
template <typename T>
PYODLOG_HOST_DEVICE bool may_pass(T x, T bound) {
  return !(x <= bound);
}

}  // namespace common
}  // namespace pyodlog
