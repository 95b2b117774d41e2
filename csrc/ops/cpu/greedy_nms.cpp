#include "ops/cpu/greedy_nms.h"

#include <algorithm>
#include <numeric>
#include <vector>

namespace pyodlog {
namespace cpu {

__attribute__((target_clones("avx2", "default"))) int count_overlaps_f32(
    const float* kx1, const float* ky1, const float* kx2, const float* ky2, const float* karea, int64_t n,
    float x1, float y1, float x2, float y2, float area, float threshold) {
  return count_overlaps<float>(kx1, ky1, kx2, ky2, karea, n, x1, y1, x2, y2, area, threshold);
}


std::vector<int64_t> bucket_by_category(const int64_t* category, int64_t n, std::vector<int64_t>& bucket_starts) {
  std::vector<int64_t> order(n);
  bucket_starts.clear();
  if (n == 0) {
    bucket_starts.push_back(0);
    return order;
  }
  const auto [lo_it, hi_it] = std::minmax_element(category, category + n);
  const int64_t lo = *lo_it, hi = *hi_it;
  // Counting sort when the categories are a compact range (the usual class ids);
  // a stable comparison sort otherwise. Both keep index order within a bucket.
  const uint64_t range = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo) + 1;
  if (range <= static_cast<uint64_t>(std::max<int64_t>(4 * n, 1 << 16))) {
    std::vector<int64_t> count(range + 1, 0);
    for (int64_t i = 0; i < n; ++i) {
      ++count[category[i] - lo + 1];
    }
    for (uint64_t c = 0; c < range; ++c) {
      if (count[c + 1] > 0) {
        bucket_starts.push_back(count[c]);
      }
      count[c + 1] += count[c];
    }
    for (int64_t i = 0; i < n; ++i) {
      order[count[category[i] - lo]++] = i;
    }
  } else {
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return category[a] < category[b]; });
    for (int64_t p = 0; p < n; ++p) {
      if (p == 0 || category[order[p]] != category[order[p - 1]]) {
        bucket_starts.push_back(p);
      }
    }
  }
  bucket_starts.push_back(n);
  return order;
}

}  // namespace cpu
}  // namespace pyodlog
