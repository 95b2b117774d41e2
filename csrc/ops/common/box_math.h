// Box arithmetic shared by the CPU and CUDA kernels.
//
// Every decision a kernel makes about a box (clip, scale, IoU above a threshold)
// goes through these helpers, so the CPU tests exercise the exact arithmetic the
// GPU runs. The CUDA sources are compiled with --fmad=false, so both devices
// round identically.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PYODLOG_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Host code inlines them as the device code does: the CPU kernels call them per pair in their
// scan loops, where GCC otherwise leaves e.g. clip_box as a call.
#define PYODLOG_HOST_DEVICE inline __attribute__((always_inline))
#else
#define PYODLOG_HOST_DEVICE inline
#endif

namespace pyodlog {
namespace common {

// std::max / std::min semantics (the first argument wins when a comparison is
// false, e.g. with NaN): the same choices torchvision's CPU NMS makes.
template <typename T>
PYODLOG_HOST_DEVICE T max_first(T a, T b) {
  return a < b ? b : a;
}
template <typename T>
PYODLOG_HOST_DEVICE T min_first(T a, T b) {
  return b < a ? b : a;
}

// torch.clamp semantics: NaN stays NaN.
template <typename T>
PYODLOG_HOST_DEVICE T clamp_keep_nan(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

template <typename T>
PYODLOG_HOST_DEVICE T box_area(T x1, T y1, T x2, T y2) {
  return (x2 - x1) * (y2 - y1);
}

// Intersection over union of box `a` (the higher-scoring, already kept box)
// with box `b`, written exactly as torchvision's CPU NMS computes it so the same
// pairs cross the threshold. A NaN anywhere yields NaN, which never exceeds a
// threshold: such a box neither suppresses nor is suppressed.
template <typename T>
PYODLOG_HOST_DEVICE T iou(
    T ax1, T ay1, T ax2, T ay2, T area_a,
    T bx1, T by1, T bx2, T by2, T area_b) {
  const T xx1 = max_first(ax1, bx1);
  const T yy1 = max_first(ay1, by1);
  const T xx2 = min_first(ax2, bx2);
  const T yy2 = min_first(ay2, by2);
  const T w = max_first(T(0), xx2 - xx1);
  const T h = max_first(T(0), yy2 - yy1);
  const T inter = w * h;
  return inter / (area_a + area_b - inter);
}

// The float that `iou > threshold` must exceed so that a float comparison gives
// the same answer as comparing with the double threshold (what torchvision's CPU
// NMS does): the largest float not above the threshold.
inline float float_threshold_below(double threshold) {
  float t = static_cast<float>(threshold);
  if (static_cast<double>(t) > threshold) {
    t = std::nextafter(t, -INFINITY);
  }
  return t;
}

// Ratio new/old of one side, in float32 as torchvision's resize_boxes computes it.
PYODLOG_HOST_DEVICE float size_ratio(float to_size, float from_size) {
  return to_size / from_size;
}

// Scale one xyxy box by (ratio_w, ratio_h) and optionally clip it to [0, w] x [0, h].
template <typename T>
PYODLOG_HOST_DEVICE void scale_box(
    const T* in, T* out, float ratio_w, float ratio_h, bool clip, float w, float h) {
  float x1 = static_cast<float>(in[0]) * ratio_w;
  float y1 = static_cast<float>(in[1]) * ratio_h;
  float x2 = static_cast<float>(in[2]) * ratio_w;
  float y2 = static_cast<float>(in[3]) * ratio_h;
  if (clip) {
    x1 = clamp_keep_nan(x1, 0.0f, w);
    y1 = clamp_keep_nan(y1, 0.0f, h);
    x2 = clamp_keep_nan(x2, 0.0f, w);
    y2 = clamp_keep_nan(y2, 0.0f, h);
  }
  out[0] = static_cast<T>(x1);
  out[1] = static_cast<T>(y1);
  out[2] = static_cast<T>(x2);
  out[3] = static_cast<T>(y2);
}

}  // namespace common
}  // namespace pyodlog
