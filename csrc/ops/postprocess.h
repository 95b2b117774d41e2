#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace pyodlog {

// Settings of postprocess_detections, validated once.
struct PostprocessConfig {
  double score_thresh;
  double iou_thresh;
  int64_t max_detections;
  int64_t first_label;
  double min_size;
  int64_t topk;
  bool topk_per_class;
  bool clip;
};

using PostprocessResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Validates the arguments; returns the number of images.
int64_t check_postprocess_args(const at::Tensor& scores, const at::Tensor& boxes, const at::Tensor& image_index,
                               const at::Tensor& net_sizes, const at::Tensor& orig_sizes,
                               const std::optional<at::Tensor>& topk_group, const PostprocessConfig& config);

// Allocates the padded outputs: boxes [B, D, 4], scores [B, D], labels [B, D]
// (-1 where empty), candidates [B, D] (-1 where empty), counts [B].
PostprocessResult empty_postprocess_result(const at::Tensor& scores, const at::Tensor& boxes, int64_t n_images,
                                           int64_t max_detections);

}  // namespace pyodlog
