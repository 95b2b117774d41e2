// Near-miss decisions of postprocess_detections_near_miss, shared by the CPU and
// CUDA kernels: the reason codes, the order near-misses are selected in, and
// which kept box suppressed a candidate.
//
// A near-miss is a (candidate, class) pair that passed the floor, the size
// filter and the top-k but is not a detection:
//   below_score  floor < score <= score_thresh;
//   suppressed   score > score_thresh, removed by NMS: its suppressor is the
//                first kept pair of its (image, class) in visiting order whose
//                IoU with it exceeds the threshold (greedy NMS's own choice);
//   over_cap     kept by NMS but beyond max_detections.
// Of an image's near-misses the first K in visiting order (score descending,
// candidate * C + class ascending) are returned; `exhausted` says there were more.
#pragma once

#include <cmath>
#include <cstdint>

#include "ops/common/box_math.h"
#include "ops/common/nms_order.h"

namespace pyodlog {
namespace common {

constexpr uint8_t kBelowScore = 1;
constexpr uint8_t kSuppressed = 2;
constexpr uint8_t kOverCap = 3;

// The score a pair must exceed to be collected at all: the floor when near-misses
// are wanted below the score threshold, else the score threshold itself.
template <typename T>
PYODLOG_HOST_DEVICE T collect_threshold(T score_thresh, T floor, bool want_near_misses) {
  return (want_near_misses && floor < score_thresh) ? floor : score_thresh;
}

// Whether kept box `k` (visited earlier) suppresses box `b`; its IoU goes to *iou.
template <typename T>
PYODLOG_HOST_DEVICE bool suppresses(const T* k, const T* b, T threshold, T* iou_out) {
  const T v = iou(k[0], k[1], k[2], k[3], box_area(k[0], k[1], k[2], k[3]), b[0], b[1], b[2], b[3],
                  box_area(b[0], b[1], b[2], b[3]));
  *iou_out = v;
  return overlaps(v, threshold);
}

}  // namespace common
}  // namespace pyodlog
