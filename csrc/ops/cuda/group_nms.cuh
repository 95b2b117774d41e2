// Greedy NMS over groups of candidates on the GPU, shared by batched_nms and the
// fused detection post-processing. The decisions are those of the CPU kernel
// (csrc/ops/cpu/greedy_nms.h): same visiting order, same IoU arithmetic
// (common::iou, compiled with --fmad=false), same threshold comparison.
//
// Candidates arrive sorted by (group, visiting order). One warp owns a group: it
// takes 32 candidates at a time, each lane tests its candidate against every box
// the group has kept so far, then the warp settles the 32 among themselves in
// order with warp shuffles. No host synchronisation, one launch for all groups.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include "ops/common/box_math.h"
#include "ops/common/nms_order.h"

namespace pyodlog {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// sorted_boxes: [n, 4] in sorted order; group: [n] group id per sorted position
// (positions with group == skip_group take no part); kept: [n] uint8 output.
// kept_scratch: [n] int32 scratch holding each group's kept positions.
template <typename T>
__global__ void group_nms_kernel(const T* __restrict__ sorted_boxes, const int64_t* __restrict__ group,
                                 int64_t n, T threshold, int64_t skip_group, uint8_t* __restrict__ kept,
                                 int32_t* __restrict__ kept_scratch) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_grid = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t start = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; start < n;
       start += warps_per_grid) {
    const int64_t g = group[start];
    // Only the warp at a group's first position works on it.
    if (g == skip_group || (start > 0 && group[start - 1] == g)) {
      continue;
    }
    int32_t n_kept = 0;
    int32_t* group_kept = kept_scratch + start;
    for (int64_t tile = start;; tile += 32) {
      const int64_t c = tile + lane;
      const bool in_group = c < n && group[c] == g;
      if (__ballot_sync(kFullMask, in_group) == 0u) {
        break;
      }
      T x1 = 0, y1 = 0, x2 = 0, y2 = 0;
      if (in_group) {
        x1 = sorted_boxes[4 * c];
        y1 = sorted_boxes[4 * c + 1];
        x2 = sorted_boxes[4 * c + 2];
        y2 = sorted_boxes[4 * c + 3];
      }
      const T area = common::box_area(x1, y1, x2, y2);
      bool alive = in_group;
      // Against everything kept before this tile.
      for (int32_t k = 0; k < n_kept && __any_sync(kFullMask, alive); ++k) {
        const T* kb = sorted_boxes + 4 * static_cast<int64_t>(group_kept[k]);
        const T v = common::iou(kb[0], kb[1], kb[2], kb[3], common::box_area(kb[0], kb[1], kb[2], kb[3]),
                                x1, y1, x2, y2, area);
        alive = alive && !common::overlaps(v, threshold);
      }
      // Within the tile, in order: a lane still alive at its turn is kept and
      // suppresses the lanes after it.
      unsigned alive_mask = __ballot_sync(kFullMask, alive);
      for (int l = 0; l < 32; ++l) {
        if (!((alive_mask >> l) & 1u)) {
          continue;
        }
        const T lx1 = __shfl_sync(kFullMask, x1, l);
        const T ly1 = __shfl_sync(kFullMask, y1, l);
        const T lx2 = __shfl_sync(kFullMask, x2, l);
        const T ly2 = __shfl_sync(kFullMask, y2, l);
        const T larea = __shfl_sync(kFullMask, area, l);
        if (lane > l && alive) {
          alive = !common::overlaps(common::iou(lx1, ly1, lx2, ly2, larea, x1, y1, x2, y2, area), threshold);
        }
        alive_mask = __ballot_sync(kFullMask, alive);
      }
      if (in_group) {
        kept[c] = alive ? 1 : 0;
      }
      if (alive) {
        group_kept[n_kept + __popc(alive_mask & ((1u << lane) - 1u))] = static_cast<int32_t>(c);
      }
      n_kept += __popc(alive_mask);
      __syncwarp();
    }
  }
}

// Runs group_nms_kernel on the current stream. sorted_boxes: [n, 4] contiguous of
// type T; group: [n] int64. Returns kept flags [n] uint8 in sorted positions.
template <typename T>
at::Tensor launch_group_nms(const at::Tensor& sorted_boxes, const at::Tensor& group, double iou_threshold,
                            int64_t skip_group) {
  const int64_t n = sorted_boxes.size(0);
  at::Tensor kept = at::zeros({n}, sorted_boxes.options().dtype(at::kByte));
  if (n == 0) {
    return kept;
  }
  TORCH_CHECK(n < (int64_t{1} << 31), "group NMS supports fewer than 2^31 candidates, got ", n);
  at::Tensor scratch = at::empty({n}, sorted_boxes.options().dtype(at::kInt));
  const int threads = 256;
  const int64_t warps_needed = n;
  const int64_t blocks = std::min<int64_t>((warps_needed * 32 + threads - 1) / threads, 65535);
  group_nms_kernel<T><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      sorted_boxes.data_ptr<T>(), group.data_ptr<int64_t>(), n, common::nms_threshold<T>(iou_threshold),
      skip_group, kept.data_ptr<uint8_t>(), scratch.data_ptr<int32_t>());
  AT_CUDA_CHECK(cudaGetLastError());
  return kept;
}

// Sorts candidates for NMS without leaving the device: returns the permutation
// ordering them by (key ascending, score descending with NaN first, index
// ascending). Two stable sorts: by score, then by key. `by_score_out`, when
// given, receives the first one (the visiting order over all keys).
inline at::Tensor sort_by_key_then_score(const at::Tensor& key, const at::Tensor& score,
                                         at::Tensor* by_score_out = nullptr) {
  const at::Tensor by_score = std::get<1>(score.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  const at::Tensor by_key = std::get<1>(key.index_select(0, by_score).sort(/*stable=*/true, 0, false));
  if (by_score_out != nullptr) {
    *by_score_out = by_score;
  }
  return by_score.index_select(0, by_key);
}

}  // namespace cuda
}  // namespace pyodlog
