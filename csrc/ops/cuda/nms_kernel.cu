// Batched NMS on the GPU: one launch sequence for all categories and images,
// no host synchronisation until the kept count sizes the returned tensor.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/cuda/group_nms.cuh"
#include "ops/nms.h"

namespace pyodlog {
namespace cuda {
namespace {

at::Tensor batched_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                            double iou_threshold) {
  check_batched_nms_args(boxes, scores, idxs, iou_threshold);
  const c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) {
    return at::empty({0}, idxs.options().dtype(at::kLong));
  }
  const at::ScalarType compute = nms_compute_type(boxes.scalar_type());
  const at::Tensor scores_c = scores.to(compute);
  const at::Tensor category = idxs.to(at::kLong);
  // Grouped by category for the suppression itself, and the visiting order overall (what the
  // result is ordered by).
  at::Tensor by_score;
  const at::Tensor order = sort_by_key_then_score(category, scores_c, &by_score);
  const at::Tensor sorted_boxes = boxes.index_select(0, order).to(compute).contiguous();
  const at::Tensor sorted_category = category.index_select(0, order).contiguous();
  at::Tensor kept_sorted;
  AT_DISPATCH_FLOATING_TYPES(compute, "batched_nms_cuda", [&] {
    kept_sorted = launch_group_nms<scalar_t>(sorted_boxes, sorted_category, iou_threshold, INT64_MIN);
  });
  // Back to input indices, then read them off in the visiting order.
  at::Tensor kept = at::zeros({n}, kept_sorted.options());
  kept.index_copy_(0, order, kept_sorted);
  const at::Tensor kept_in_order = kept.index_select(0, by_score).to(at::kBool);
  // The one synchronisation: the result's length depends on the data.
  return by_score.masked_select(kept_in_order);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyodlog, CUDA, m) {
  m.impl("batched_nms", &batched_nms_cuda);
}

}  // namespace cuda
}  // namespace pyodlog
