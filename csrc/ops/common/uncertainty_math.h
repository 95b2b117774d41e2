// Per-detection uncertainty from a logit vector, shared by the CPU and CUDA
// kernels of detection_uncertainty (computed in double, stored as float32).
//
//   softmax heads (kind 0): p = softmax(z) over all C columns (background too);
//   sigmoid heads (kind 1): p_c = sigmoid(z_c) independently, and the class
//                           distribution is q = p / sum(p).
//   entropy = -sum q log q (nats; q = p for softmax heads; 0 log 0 = 0)
//   margin  = top-1 minus top-2 of p (p itself, not q; 1 class: top-2 is 0)
//   energy  = -logsumexp(z) (both kinds)
// A NaN logit makes all three NaN. All logits -inf: entropy and margin NaN,
// energy +inf (softmax and logsumexp of plain PyTorch give the same). A +inf
// logit: entropy and margin NaN, energy -inf.
#pragma once

#include <cmath>
#include <cstdint>

#include "ops/common/box_math.h"

namespace pyodlog {
namespace common {

constexpr int64_t kSoftmaxHead = 0;
constexpr int64_t kSigmoidHead = 1;

template <typename T>
PYODLOG_HOST_DEVICE void uncertainty_of(const T* z, int64_t n, int64_t kind, float* entropy, float* margin,
                                        float* energy) {
  const double nan = NAN;
  const double inf = INFINITY;
  double m = -inf;
  bool has_nan = false, has_pinf = false;
  for (int64_t c = 0; c < n; ++c) {
    const double v = static_cast<double>(z[c]);
    if (v != v) {
      has_nan = true;
    } else if (v > m) {
      m = v;
    }
    has_pinf = has_pinf || v == inf;
  }
  if (has_nan || n == 0) {
    *entropy = *margin = *energy = static_cast<float>(nan);
    return;
  }
  if (has_pinf) {
    *entropy = *margin = static_cast<float>(nan);
    *energy = static_cast<float>(-inf);
    return;
  }
  if (m == -inf) {
    *energy = static_cast<float>(inf);
    if (kind == kSoftmaxHead) {
      *entropy = *margin = static_cast<float>(nan);
    } else {
      // sigmoid(-inf) = 0 for every class: no class distribution (0/0), top-2 margin 0.
      *entropy = static_cast<float>(nan);
      *margin = 0.0f;
    }
    return;
  }
  double s = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    s += exp(static_cast<double>(z[c]) - m);
  }
  const double lse = m + log(s);
  *energy = static_cast<float>(-lse);
  double top1 = -inf, top2 = -inf;  // the two largest logits (p is increasing in z for both kinds)
  for (int64_t c = 0; c < n; ++c) {
    const double v = static_cast<double>(z[c]);
    if (v > top1) {
      top2 = top1;
      top1 = v;
    } else if (v > top2) {
      top2 = v;
    }
  }
  double h = 0.0;
  if (kind == kSoftmaxHead) {
    const double log_s = log(s);
    for (int64_t c = 0; c < n; ++c) {
      const double d = static_cast<double>(z[c]) - m;
      const double p = exp(d) / s;
      if (p > 0.0) {
        h += p * (log_s - d);
      }
    }
    *margin = static_cast<float>(exp(top1 - m) / s - (top2 == -inf ? 0.0 : exp(top2 - m) / s));
  } else {
    double total = 0.0;
    for (int64_t c = 0; c < n; ++c) {
      total += 1.0 / (1.0 + exp(-static_cast<double>(z[c])));
    }
    if (total > 0.0) {
      for (int64_t c = 0; c < n; ++c) {
        const double q = 1.0 / (1.0 + exp(-static_cast<double>(z[c]))) / total;
        if (q > 0.0) {
          h -= q * log(q);
        }
      }
    } else {
      h = nan;
    }
    const double p1 = 1.0 / (1.0 + exp(-top1));
    const double p2 = top2 == -inf ? 0.0 : 1.0 / (1.0 + exp(-top2));
    *margin = static_cast<float>(p1 - p2);
  }
  *entropy = static_cast<float>(h);
}

}  // namespace common
}  // namespace pyodlog
