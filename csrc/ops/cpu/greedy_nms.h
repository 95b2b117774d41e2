// Greedy NMS over one group of candidates on the CPU, shared by batched_nms and
// the fused detection post-processing.
//
// A candidate is kept when no already kept candidate of its group overlaps it
// by more than the threshold (suppressed candidates suppress nothing): the
// classic greedy definition. The kept boxes are held as a structure of arrays so
// that each candidate is tested against them in vectorised blocks, and the test
// stops at the first block that suppresses it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "ops/common/box_math.h"
#include "ops/common/near_miss_math.h"
#include "ops/common/nms_order.h"

namespace pyodlog {
namespace cpu {

// A permutation of [0, n) grouping equal categories together (index order kept
// inside a group); bucket_starts receives each group's first position and n.
// The buckets are what GreedyNms suppresses one at a time (in parallel).
std::vector<int64_t> bucket_by_category(const int64_t* category, int64_t n, std::vector<int64_t>& bucket_starts);

// How many of the boxes [0, n) of the kept arrays overlap the candidate by more
// than the threshold. Branch-free with restrict pointers so that the compiler
// vectorises it; the arithmetic is common::iou's.
template <typename T>
inline int count_overlaps(const T* __restrict kx1, const T* __restrict ky1, const T* __restrict kx2,
                          const T* __restrict ky2, const T* __restrict karea, int64_t n, T x1, T y1, T x2, T y2,
                          T area, T threshold) {
  int hits = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T v = common::iou(kx1[j], ky1[j], kx2[j], ky2[j], karea[j], x1, y1, x2, y2, area);
    hits += common::overlaps(v, threshold);
  }
  return hits;
}

// float is the common case: compiled for AVX2 as well as the baseline, picked at
// load time by the CPU it runs on (csrc/ops/cpu/greedy_nms.cpp).
int count_overlaps_f32(const float* kx1, const float* ky1, const float* kx2, const float* ky2,
                       const float* karea, int64_t n, float x1, float y1, float x2, float y2, float area,
                       float threshold);

template <typename T>
inline int count_overlaps_dispatch(const T* kx1, const T* ky1, const T* kx2, const T* ky2, const T* karea,
                                   int64_t n, T x1, T y1, T x2, T y2, T area, T threshold) {
  if constexpr (std::is_same_v<T, float>) {
    return count_overlaps_f32(kx1, ky1, kx2, ky2, karea, n, x1, y1, x2, y2, area, threshold);
  } else {
    return count_overlaps(kx1, ky1, kx2, ky2, karea, n, x1, y1, x2, y2, area, threshold);
  }
}

template <typename T>
class GreedyNms {
 public:
  // Offers the next candidate in visiting order; returns whether it is kept.
  bool offer(T x1, T y1, T x2, T y2, T threshold) {
    const T area = common::box_area(x1, y1, x2, y2);
    const int64_t n = static_cast<int64_t>(kx1_.size());
    // Blocks of kept boxes, highest scores first: a suppressed candidate is
    // usually caught by the first block, so stop there.
    constexpr int64_t kBlock = 32;
    for (int64_t k = 0; k < n; k += kBlock) {
      const int64_t len = std::min(kBlock, n - k);
      if (count_overlaps_dispatch(kx1_.data() + k, ky1_.data() + k, kx2_.data() + k, ky2_.data() + k, karea_.data() + k,
                         len, x1, y1, x2, y2, area, threshold) > 0) {
        return false;
      }
    }
    kx1_.push_back(x1);
    ky1_.push_back(y1);
    kx2_.push_back(x2);
    ky2_.push_back(y2);
    karea_.push_back(area);
    return true;
  }

  // Starts a new group, keeping the allocated capacity.
  void reset() {
    kx1_.clear();
    ky1_.clear();
    kx2_.clear();
    ky2_.clear();
    karea_.clear();
  }

 private:
  std::vector<T> kx1_, ky1_, kx2_, ky2_, karea_;
};

}  // namespace cpu
}  // namespace pyodlog
