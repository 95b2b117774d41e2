// The order NMS visits candidates in, shared by every NMS-based kernel:
// score descending, NaN scores first (as torch.sort does), ties by index
// ascending. That makes the result deterministic and equal to torchvision's
// coordinate-offset batched_nms, which visits candidates in a stable
// descending sort.
#pragma once

#include <cmath>
#include <cstdint>

#include "ops/common/box_math.h"

namespace pyodlog {
namespace common {

template <typename T>
PYODLOG_HOST_DEVICE bool visits_before(T score_a, int64_t index_a, T score_b, int64_t index_b) {
  const bool nan_a = score_a != score_a;
  const bool nan_b = score_b != score_b;
  if (nan_a != nan_b) {
    return nan_a;
  }
  if (!nan_a && score_a != score_b) {
    return score_a > score_b;
  }
  return index_a < index_b;
}

// The visiting order as one unsigned 64-bit key for float scores: sorting keys
// ascending visits by score descending, NaN first, ties by index ascending
// (the same order as visits_before). Integer keys sort several times faster
// than a comparator that has to handle NaN.
PYODLOG_HOST_DEVICE uint64_t visit_key(float score, uint32_t index) {
  uint32_t bits;
  if (score != score) {
    bits = 0u;  // NaN before everything
  } else {
    if (score == 0.0f) {
      score = 0.0f;  // -0 ties with +0
    }
    union {
      float f;
      uint32_t u;
    } pun{score};
    // Ascending-orderable bits, then inverted for descending order.
    const uint32_t ascending = (pun.u & 0x80000000u) ? ~pun.u : (pun.u | 0x80000000u);
    bits = ~ascending;  // never 0: only a NaN has ascending bits 0xffffffff
  }
  return (static_cast<uint64_t>(bits) << 32) | index;
}

// Whether `iou > threshold`, compared exactly as torchvision's CPU NMS (a double
// threshold). `threshold_t` comes from nms_threshold<T>().
template <typename T>
PYODLOG_HOST_DEVICE bool overlaps(T iou_value, T threshold_t) {
  return iou_value > threshold_t;
}

template <typename T>
inline T nms_threshold(double threshold);

template <>
inline float nms_threshold<float>(double threshold) {
  return float_threshold_below(threshold);
}

template <>
inline double nms_threshold<double>(double threshold) {
  return threshold;
}

}  // namespace common
}  // namespace pyodlog
