#include "ops/cpu/greedy_nms.h"

namespace pyodlog {
namespace cpu {

__attribute__((target_clones("avx2", "default"))) int count_overlaps_f32(
    const float* kx1, const float* ky1, const float* kx2, const float* ky2, const float* karea, int64_t n,
    float x1, float y1, float x2, float y2, float area, float threshold) {
  return count_overlaps<float>(kx1, ky1, kx2, ky2, karea, n, x1, y1, x2, y2, area, threshold);
}

}  // namespace cpu
}  // namespace pyodlog
