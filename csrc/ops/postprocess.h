#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <c10/util/string_view.h>
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

// The near-misses of postprocess_detections_near_miss, padded to K per image:
// boxes [B, K, 4], scores [B, K], labels [B, K] (-1), candidates [B, K] (-1),
// reason [B, K] uint8 (0), suppressed_by [B, K] int64 (-1), suppressor_iou
// [B, K] float32 (NaN), counts [B] int64, exhausted [B] bool.
using NearMissResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor>;

void check_near_miss_args(int64_t near_miss, double near_miss_floor);

NearMissResult empty_near_miss_result(const at::Tensor& scores, const at::Tensor& boxes, int64_t n_images,
                                      int64_t near_miss);

using PostprocessNearMissResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline PostprocessNearMissResult join_results(PostprocessResult d, NearMissResult m) {
  return std::tuple_cat(std::move(d), std::move(m));
}

// One device's post-processing, detections and near-misses (near_miss = 0: none).
using PostprocessImpl = PostprocessNearMissResult (*)(const at::Tensor& scores, const at::Tensor& boxes,
                                                      const at::Tensor& image_index, const at::Tensor& net_sizes,
                                                      const at::Tensor& orig_sizes, const PostprocessConfig& config,
                                                      int64_t near_miss, double near_miss_floor,
                                                      const std::optional<at::Tensor>& topk_group);

// How the operators' `scores` argument becomes class scores (the `activation` argument):
//   "none"                scores are already activated (as before);
//   "sigmoid"             raw logits, score = sigmoid(logit) (RetinaNet);
//   "sigmoid_centerness"  raw logits and one `centerness` logit per row,
//                         score = sqrt(sigmoid(logit) * sigmoid(centerness)) (FCOS).
enum class Activation { kNone, kSigmoid, kSigmoidCenterness };

Activation parse_activation(c10::string_view name, const std::optional<at::Tensor>& centerness);

// The rows of `logits` [N, C] that may hold a pair (class >= first_label) whose activated score
// exceeds `thresh`, and those rows' activated scores [R, C]: a superset of the rows that do (a
// safe margin in logit space decides which rows are skipped), each score computed exactly as
// torch computes the activation (ops/common/activation_math.h).
std::tuple<at::Tensor, at::Tensor> activated_rows(const at::Tensor& logits, c10::string_view activation,
                                                  double thresh, int64_t first_label,
                                                  const std::optional<at::Tensor>& centerness);

// `thresh` as torch compares a tensor of `scores_dtype` with it: rounded to float16 or bfloat16
// for those dtypes (then exact in float32), unchanged otherwise.
double compared_threshold(double thresh, at::ScalarType scores_dtype);

// A device's implementation behind the activation (and the thresholds rounded as
// compared_threshold says for the scores' dtype): on the CPU only the rows activated_rows keeps
// are activated and post-processed (the candidates mapped back to rows of `scores`); elsewhere
// the whole tensor is activated with torch's own kernels first (no host synchronisation).
PostprocessNearMissResult postprocess_activated(PostprocessImpl impl, const at::Tensor& scores,
                                                const at::Tensor& boxes, const at::Tensor& image_index,
                                                const at::Tensor& net_sizes, const at::Tensor& orig_sizes,
                                                const PostprocessConfig& config, int64_t near_miss,
                                                double near_miss_floor, const std::optional<at::Tensor>& topk_group,
                                                c10::string_view activation,
                                                const std::optional<at::Tensor>& centerness);

// The operators' entry points (their schema's argument order) over a device's implementation:
// m.impl("postprocess_detections", &postprocess_detections_op<postprocess_cpu>).
template <PostprocessImpl Impl>
PostprocessResult postprocess_detections_op(const at::Tensor& scores, const at::Tensor& boxes,
                                            const at::Tensor& image_index, const at::Tensor& net_sizes,
                                            const at::Tensor& orig_sizes, double score_thresh, double iou_thresh,
                                            int64_t max_detections, int64_t first_label, double min_size,
                                            int64_t topk, const std::optional<at::Tensor>& topk_group,
                                            bool topk_per_class, bool clip, c10::string_view activation,
                                            const std::optional<at::Tensor>& centerness) {
  const PostprocessConfig config{score_thresh, iou_thresh, max_detections, first_label,
                                 min_size,     topk,       topk_per_class, clip};
  auto all = postprocess_activated(Impl, scores, boxes, image_index, net_sizes, orig_sizes, config, 0, 0.0,
                                   topk_group, activation, centerness);
  return {std::get<0>(all), std::get<1>(all), std::get<2>(all), std::get<3>(all), std::get<4>(all)};
}

template <PostprocessImpl Impl>
PostprocessNearMissResult postprocess_detections_near_miss_op(
    const at::Tensor& scores, const at::Tensor& boxes, const at::Tensor& image_index, const at::Tensor& net_sizes,
    const at::Tensor& orig_sizes, double score_thresh, double iou_thresh, int64_t max_detections, int64_t near_miss,
    double near_miss_floor, int64_t first_label, double min_size, int64_t topk,
    const std::optional<at::Tensor>& topk_group, bool topk_per_class, bool clip, c10::string_view activation,
    const std::optional<at::Tensor>& centerness) {
  const PostprocessConfig config{score_thresh, iou_thresh, max_detections, first_label,
                                 min_size,     topk,       topk_per_class, clip};
  return postprocess_activated(Impl, scores, boxes, image_index, net_sizes, orig_sizes, config, near_miss,
                               near_miss_floor, topk_group, activation, centerness);
}

}  // namespace pyodlog
