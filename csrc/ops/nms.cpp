// batched_nms: non-maximum suppression within each category (idxs), returning
// the kept indices by score descending, ties by index ascending.
#include "ops/nms.h"

#include <cmath>

#include <torch/library.h>

#include "ops/common/checks.h"

namespace pyodlog {

void check_batched_nms_args(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs, double iou_threshold) {
  checks::boxes_nx4(boxes);
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0),
              "scores must have shape [", boxes.size(0), "] (one per box), got ", scores.sizes());
  checks::floating(scores, "scores");
  checks::index_n(idxs, boxes.size(0), "idxs");
  checks::same_device(boxes, scores, "boxes", "scores");
  checks::same_device(boxes, idxs, "boxes", "idxs");
  TORCH_CHECK(!std::isnan(iou_threshold), "iou_threshold must be a number, got NaN");
}

}  // namespace pyodlog

TORCH_LIBRARY_FRAGMENT(pyodlog, m) {
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
}
