// postprocess_detections: the whole post-processing of a detection head for a
// batch of images in one call (score filter, optional top-k, clipping, small-box
// removal, per-class NMS, the best max_detections per image, scaling to the
// original image sizes), returning which candidate each detection came from.
#include "ops/postprocess.h"

#include <cmath>

#include <torch/library.h>

#include "ops/common/checks.h"

namespace pyodlog {

int64_t check_postprocess_args(const at::Tensor& scores, const at::Tensor& boxes, const at::Tensor& image_index,
                               const at::Tensor& net_sizes, const at::Tensor& orig_sizes,
                               const std::optional<at::Tensor>& topk_group, const PostprocessConfig& config) {
  TORCH_CHECK(scores.dim() == 2, "scores must have shape [N, C] (one row of class scores per candidate), got ",
              scores.sizes());
  checks::floating(scores, "scores");
  const int64_t n = scores.size(0), c = scores.size(1);
  TORCH_CHECK((boxes.dim() == 2 && boxes.size(0) == n && boxes.size(1) == 4) ||
                  (boxes.dim() == 3 && boxes.size(0) == n && boxes.size(1) == c && boxes.size(2) == 4),
              "boxes must have shape [", n, ", 4] (one box per candidate) or [", n, ", ", c,
              ", 4] (one box per candidate and class), got ", boxes.sizes());
  TORCH_CHECK(boxes.scalar_type() == scores.scalar_type(), "boxes and scores must have the same dtype, got ",
              boxes.scalar_type(), " and ", scores.scalar_type());
  checks::index_n(image_index, n, "image_index");
  checks::sizes_bx2(net_sizes, "net_sizes");
  checks::sizes_bx2(orig_sizes, "orig_sizes");
  TORCH_CHECK(net_sizes.size(0) == orig_sizes.size(0), "net_sizes and orig_sizes must describe the same images, got ",
              net_sizes.size(0), " and ", orig_sizes.size(0), " rows");
  for (const auto* t : {&boxes, &image_index, &net_sizes, &orig_sizes}) {
    checks::same_device(scores, *t, "scores", "every other tensor argument");
  }
  if (topk_group.has_value()) {
    checks::index_n(*topk_group, n, "topk_group");
    checks::same_device(scores, *topk_group, "scores", "topk_group");
  }
  TORCH_CHECK(n * std::max<int64_t>(c, 1) < (int64_t{1} << 32),
              "postprocess_detections supports fewer than 2^32 candidate-class pairs, got ", n, " x ", c);
  TORCH_CHECK(!std::isnan(config.score_thresh), "score_thresh must be a number, got NaN");
  TORCH_CHECK(!std::isnan(config.iou_thresh), "iou_thresh must be a number, got NaN");
  TORCH_CHECK(config.max_detections >= 0, "max_detections must be >= 0, got ", config.max_detections);
  TORCH_CHECK(config.first_label >= 0, "first_label must be >= 0, got ", config.first_label);
  TORCH_CHECK(!std::isnan(config.min_size), "min_size must be a number, got NaN");
  return net_sizes.size(0);
}

PostprocessResult empty_postprocess_result(const at::Tensor& scores, const at::Tensor& boxes, int64_t n_images,
                                           int64_t max_detections) {
  const auto index_options = scores.options().dtype(at::kLong);
  return {at::zeros({n_images, max_detections, 4}, boxes.options()),
          at::zeros({n_images, max_detections}, scores.options()),
          at::full({n_images, max_detections}, -1, index_options),
          at::full({n_images, max_detections}, -1, index_options),
          at::zeros({n_images}, index_options)};
}

void check_near_miss_args(int64_t near_miss, double near_miss_floor) {
  TORCH_CHECK(near_miss >= 0, "near_miss must be >= 0 (near-misses kept per image), got ", near_miss);
  TORCH_CHECK(!std::isnan(near_miss_floor), "near_miss_floor must be a number, got NaN");
}

NearMissResult empty_near_miss_result(const at::Tensor& scores, const at::Tensor& boxes, int64_t n_images,
                                      int64_t near_miss) {
  const auto index_options = scores.options().dtype(at::kLong);
  return {at::zeros({n_images, near_miss, 4}, boxes.options()),
          at::zeros({n_images, near_miss}, scores.options()),
          at::full({n_images, near_miss}, -1, index_options),
          at::full({n_images, near_miss}, -1, index_options),
          at::zeros({n_images, near_miss}, scores.options().dtype(at::kByte)),
          at::full({n_images, near_miss}, -1, index_options),
          at::full({n_images, near_miss}, NAN, scores.options().dtype(at::kFloat)),
          at::zeros({n_images}, index_options),
          at::zeros({n_images}, scores.options().dtype(at::kBool))};
}

}  // namespace pyodlog

TORCH_LIBRARY_FRAGMENT(pyodlog, m) {
  m.def(
      "postprocess_detections(Tensor scores, Tensor boxes, Tensor image_index, Tensor net_sizes, "
      "Tensor orig_sizes, float score_thresh, float iou_thresh, int max_detections, int first_label=0, "
      "float min_size=0., int topk=-1, Tensor? topk_group=None, bool topk_per_class=False, bool clip=True, "
      "str activation=\"none\", Tensor? centerness=None) "
      "-> (Tensor boxes, Tensor scores, Tensor labels, Tensor candidates, Tensor counts)");
  // The same pass, also returning up to `near_miss` near-misses per image (see
  // ops/common/near_miss_math.h): below_score (above near_miss_floor),
  // suppressed (with the detection row that suppressed it and their IoU),
  // over_cap.
  // Both take raw logits with `activation` (see ops/activation.cpp): "sigmoid", or
  // "sigmoid_centerness" with one centerness logit per row; "none": scores already activated.
  m.def(
      "postprocess_detections_near_miss(Tensor scores, Tensor boxes, Tensor image_index, Tensor net_sizes, "
      "Tensor orig_sizes, float score_thresh, float iou_thresh, int max_detections, int near_miss, "
      "float near_miss_floor, int first_label=0, float min_size=0., int topk=-1, Tensor? topk_group=None, "
      "bool topk_per_class=False, bool clip=True, str activation=\"none\", Tensor? centerness=None) "
      "-> (Tensor boxes, Tensor scores, Tensor labels, Tensor candidates, Tensor counts, Tensor nm_boxes, "
      "Tensor nm_scores, Tensor nm_labels, Tensor nm_candidates, Tensor nm_reason, Tensor nm_suppressed_by, "
      "Tensor nm_suppressor_iou, Tensor nm_counts, Tensor nm_exhausted)");
}
