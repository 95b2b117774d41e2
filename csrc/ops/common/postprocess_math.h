// Per-candidate decisions of postprocess_detections, shared by the CPU and CUDA
// kernels: whether a (candidate, class) pair passes the score filter, its box
// clipped to the network input, and whether that box is large enough.
#pragma once

#include "ops/common/box_math.h"

namespace pyodlog {
namespace common {

// The detection heads compare `scores > score_thresh` on float32 tensors, where
// the Python threshold becomes a float32 scalar.
template <typename T>
PYODLOG_HOST_DEVICE bool passes_score(T score, T score_thresh) {
  return score > score_thresh;
}

// Clips an xyxy box to [0, w] x [0, h] as torchvision's clip_boxes_to_image (NaN stays NaN).
template <typename T>
PYODLOG_HOST_DEVICE void clip_box(T* b, T w, T h) {
  b[0] = clamp_keep_nan(b[0], T(0), w);
  b[1] = clamp_keep_nan(b[1], T(0), h);
  b[2] = clamp_keep_nan(b[2], T(0), w);
  b[3] = clamp_keep_nan(b[3], T(0), h);
}

// torchvision's remove_small_boxes: both sides at least min_size. min_size <= 0 keeps all.
template <typename T>
PYODLOG_HOST_DEVICE bool large_enough(const T* b, T min_size) {
  if (!(min_size > T(0))) {
    return true;
  }
  return (b[2] - b[0]) >= min_size && (b[3] - b[1]) >= min_size;
}

}  // namespace common
}  // namespace pyodlog
