// postprocess_detections on the GPU, for the whole batch in one sequence of
// launches: no per-image or per-class loop. The decisions go through the same
// helpers as the CPU kernel (common::passes_score, clip_box, large_enough, the
// group NMS of batched_nms, scale_box).
//
// Host synchronisations: the number of (candidate, class) pairs that pass the
// score filter, which sizes the working arrays (as torchvision's own
// post-processing does on every image), and with a top-k the number it keeps.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/common/box_math.h"
#include "ops/common/near_miss_math.h"
#include "ops/common/postprocess_math.h"
#include "ops/cuda/group_nms.cuh"
#include "ops/postprocess.h"

namespace pyodlog {
namespace cuda {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

// Clips each box (of a passing pair, or of a candidate row when the boxes are class-agnostic)
// to its network input and checks its size. A row of an image index outside [0, n_images) is
// never admitted (and its size never read): only rows with a passing pair are checked on the
// CPU, where such an index is refused.
template <typename T>
__global__ void admit_pairs_kernel(T* __restrict__ box, const int64_t* __restrict__ image, const float* __restrict__ net,
                                   int64_t n_images, int64_t n_pairs, bool clip, T min_size,
                                   bool* __restrict__ admitted) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < n_pairs;
       p += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    T* b = box + 4 * p;
    const int64_t i = image[p];
    if (i < 0 || i >= n_images) {
      admitted[p] = false;
      continue;
    }
    if (clip) {
      common::clip_box(b, static_cast<T>(net[2 * i + 1]), static_cast<T>(net[2 * i]));
    }
    admitted[p] = common::large_enough(b, min_size);
  }
}

// Rank of each sorted position inside its run of equal keys (keys ascending): its position
// minus the first position of its run. Runs are numbered by a scan of the run-start flags
// (a device-wide scan, as PyTorch's cumsum makes it), each run's first position written by the
// one thread that starts it, then read back per position: a few streaming passes. (PyTorch's
// CUDA cummax of one long row is a single-block scan: 345 ms for the ~11 M pairs of one
// RetinaNet call at 800 px on an H200; a binary search per position, 27 dependent loads
// each, came next.)
__global__ void run_start_kernel(const int64_t* __restrict__ key, int64_t n, int64_t* __restrict__ starts) {
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < n;
       q += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    starts[q] = (q == 0 || key[q] != key[q - 1]) ? 1 : 0;
  }
}

__global__ void run_first_kernel(const int64_t* __restrict__ starts, const int64_t* __restrict__ run, int64_t n,
                                 int64_t* __restrict__ first) {
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < n;
       q += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    if (starts[q]) {
      first[run[q]] = q;
    }
  }
}

__global__ void rank_in_run_kernel(const int64_t* __restrict__ run, const int64_t* __restrict__ first, int64_t n,
                                   int64_t* __restrict__ rank) {
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < n;
       q += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    rank[q] = q - first[run[q]];
  }
}

inline at::Tensor rank_in_runs(const at::Tensor& sorted_key) {
  const at::Tensor key = sorted_key.contiguous();
  const int64_t n = key.size(0);
  at::Tensor rank = at::empty_like(key);
  if (n == 0) {
    return rank;
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor starts = at::empty_like(key);
  run_start_kernel<<<blocks_for(n), kThreads, 0, stream>>>(key.data_ptr<int64_t>(), n, starts.data_ptr<int64_t>());
  AT_CUDA_CHECK(cudaGetLastError());
  const at::Tensor run = starts.cumsum(0).sub_(1);  // the run of each position, from 0
  at::Tensor first = at::empty_like(key);           // the first position of each run (runs <= n)
  run_first_kernel<<<blocks_for(n), kThreads, 0, stream>>>(starts.data_ptr<int64_t>(), run.data_ptr<int64_t>(), n,
                                                           first.data_ptr<int64_t>());
  AT_CUDA_CHECK(cudaGetLastError());
  rank_in_run_kernel<<<blocks_for(n), kThreads, 0, stream>>>(run.data_ptr<int64_t>(), first.data_ptr<int64_t>(), n,
                                                             rank.data_ptr<int64_t>());
  AT_CUDA_CHECK(cudaGetLastError());
  return rank;
}

template <typename T, typename S>
__global__ void write_detections_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ rank,
                                        const int64_t* __restrict__ key, int64_t none_key, int64_t n_pairs,
                                        int64_t max_detections, const T* __restrict__ box, const T* __restrict__ score,
                                        const int64_t* __restrict__ image, const int64_t* __restrict__ row,
                                        const int64_t* __restrict__ label, const float* __restrict__ net,
                                        const float* __restrict__ orig, S* __restrict__ out_boxes,
                                        S* __restrict__ out_scores, int64_t* __restrict__ out_labels,
                                        int64_t* __restrict__ out_candidates,
                                        unsigned long long* __restrict__ out_counts) {
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < n_pairs;
       q += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    if (key[q] == none_key || rank[q] >= max_detections) {
      continue;
    }
    const int64_t p = order[q];
    const int64_t i = image[p];
    const int64_t slot = i * max_detections + rank[q];
    S in[4];
    for (int k = 0; k < 4; ++k) {
      in[k] = static_cast<S>(box[4 * p + k]);
    }
    common::scale_box(in, out_boxes + 4 * slot, common::size_ratio(orig[2 * i + 1], net[2 * i + 1]),
                      common::size_ratio(orig[2 * i], net[2 * i]), /*clip=*/false, 0.0f, 0.0f);
    out_scores[slot] = static_cast<S>(score[p]);
    out_labels[slot] = label[p];
    out_candidates[slot] = row[p];
    atomicAdd(out_counts + i, 1ull);
  }
}

// For each pair NMS suppressed (sorted NMS positions, `offset` its rank in its
// group): the first kept pair of its group in visiting order that suppresses it
// (common::suppresses, as the CPU kernel's greedy pass decides), as a pair index.
template <typename T>
__global__ void suppressor_kernel(const T* __restrict__ sorted_box, const int64_t* __restrict__ sorted_group,
                                  const int64_t* __restrict__ offset, const uint8_t* __restrict__ kept_sorted,
                                  const int64_t* __restrict__ order, int64_t none_key, int64_t n, T threshold,
                                  int64_t* __restrict__ suppressor, float* __restrict__ suppressor_iou) {
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < n;
       q += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    if (sorted_group[q] == none_key || kept_sorted[q]) {
      continue;
    }
    const int64_t p = order[q];
    for (int64_t j = q - offset[q]; j < q; ++j) {
      T v;
      if (kept_sorted[j] && common::suppresses(sorted_box + 4 * j, sorted_box + 4 * q, threshold, &v)) {
        suppressor[p] = order[j];
        suppressor_iou[p] = static_cast<float>(v);
        break;
      }
    }
  }
}

template <typename T, typename S>
__global__ void write_near_misses_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ rank,
                                         const int64_t* __restrict__ key, int64_t none_key, int64_t n_pairs,
                                         int64_t k, const T* __restrict__ box, const T* __restrict__ score,
                                         const int64_t* __restrict__ image, const int64_t* __restrict__ row,
                                         const int64_t* __restrict__ label, const uint8_t* __restrict__ reason,
                                         const int64_t* __restrict__ suppressor,
                                         const float* __restrict__ suppressor_iou,
                                         const int64_t* __restrict__ detection_row, const float* __restrict__ net,
                                         const float* __restrict__ orig, S* __restrict__ out_boxes,
                                         S* __restrict__ out_scores, int64_t* __restrict__ out_labels,
                                         int64_t* __restrict__ out_candidates, uint8_t* __restrict__ out_reason,
                                         int64_t* __restrict__ out_by, float* __restrict__ out_iou) {
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < n_pairs;
       q += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    if (key[q] == none_key || rank[q] >= k) {
      continue;
    }
    const int64_t p = order[q];
    const int64_t i = image[p];
    const int64_t slot = i * k + rank[q];
    S in[4];
    for (int c = 0; c < 4; ++c) {
      in[c] = static_cast<S>(box[4 * p + c]);
    }
    common::scale_box(in, out_boxes + 4 * slot, common::size_ratio(orig[2 * i + 1], net[2 * i + 1]),
                      common::size_ratio(orig[2 * i], net[2 * i]), /*clip=*/false, 0.0f, 0.0f);
    out_scores[slot] = static_cast<S>(score[p]);
    out_labels[slot] = label[p];
    out_candidates[slot] = row[p];
    out_reason[slot] = reason[p];
    if (reason[p] == common::kSuppressed) {
      out_by[slot] = suppressor[p] >= 0 ? detection_row[suppressor[p]] : -1;
      out_iou[slot] = suppressor_iou[p];
    }
  }
}

PostprocessNearMissResult postprocess_cuda(const at::Tensor& scores, const at::Tensor& boxes,
                                           const at::Tensor& image_index, const at::Tensor& net_sizes,
                                           const at::Tensor& orig_sizes, const PostprocessConfig& config,
                                           int64_t near_miss, double near_miss_floor,
                                           const std::optional<at::Tensor>& topk_group) {
  const int64_t n_images =
      check_postprocess_args(scores, boxes, image_index, net_sizes, orig_sizes, topk_group, config);
  check_near_miss_args(near_miss, near_miss_floor);
  const c10::cuda::CUDAGuard guard(scores.device());
  auto result = empty_postprocess_result(scores, boxes, n_images, config.max_detections);
  auto misses = empty_near_miss_result(scores, boxes, n_images, near_miss);
  const int64_t n_classes = scores.size(1);
  const int64_t max_detections = config.max_detections, first_label = config.first_label, topk = config.topk;
  const double score_thresh = config.score_thresh, iou_thresh = config.iou_thresh;
  if (n_images == 0 || (max_detections == 0 && near_miss == 0) || scores.size(0) == 0 ||
      first_label >= n_classes) {
    return join_results(result, misses);
  }
  auto& [out_boxes, out_scores, out_labels, out_candidates, out_counts] = result;
  auto& [nm_boxes, nm_scores, nm_labels, nm_candidates, nm_reason, nm_by, nm_iou, nm_counts, nm_exhausted] = misses;
  const bool want = near_miss > 0;
  const at::ScalarType compute = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor net = net_sizes.to(at::kFloat).contiguous();
  const at::Tensor orig = orig_sizes.to(at::kFloat).contiguous();
  const at::Tensor image_of_row = image_index.to(at::kLong);
  const int64_t n_fg = n_classes - first_label;

  // Pairs above the score threshold (with near-misses: above the floor), in
  // (row, class) order. The first host sync (a top-k adds the second, below).
  const at::Tensor fg_scores = scores.narrow(1, first_label, n_fg).to(compute);
  const double collect = want && near_miss_floor < score_thresh ? near_miss_floor : score_thresh;
  const at::Tensor pair = fg_scores.reshape({-1}).gt(at::Scalar(collect)).nonzero().squeeze(1);
  int64_t n_pairs = pair.size(0);
  if (n_pairs == 0) {
    return join_results(result, misses);
  }
  at::Tensor row = pair.div(n_fg, "floor");
  at::Tensor label = pair.remainder(n_fg).add_(first_label);
  at::Tensor score = fg_scores.reshape({-1}).index_select(0, pair);
  at::Tensor image = image_of_row.index_select(0, row);
  const auto stream = at::cuda::getCurrentCUDAStream();
  // Clipped and checked per candidate row when the boxes are class-agnostic (the same values as
  // per pair: one box serves all of a row's classes), per pair otherwise. A row's boxes are
  // gathered for its pairs only once the top-k has cut the pairs down.
  const bool per_class_boxes = boxes.dim() == 3;
  at::Tensor box = per_class_boxes ? boxes.to(compute).index({row, label}).contiguous()
                                   : boxes.to(compute, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
  const int64_t n_boxes = box.size(0);
  const at::Tensor box_image = per_class_boxes ? image : image_of_row.contiguous();
  at::Tensor admitted = at::empty({n_boxes}, scores.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(compute, "admit_pairs", [&] {
    admit_pairs_kernel<scalar_t><<<blocks_for(n_boxes), kThreads, 0, stream>>>(
        box.data_ptr<scalar_t>(), box_image.data_ptr<int64_t>(), net.data_ptr<float>(), n_images, n_boxes, config.clip,
        static_cast<scalar_t>(config.min_size), admitted.data_ptr<bool>());
  });
  AT_CUDA_CHECK(cudaGetLastError());
  if (!per_class_boxes) {
    admitted = admitted.index_select(0, row);
  }
  const int64_t none = std::numeric_limits<int64_t>::max();
  const at::Tensor none_t = at::full({}, none, row.options());

  // Top-k of each group: rank inside the group in visiting order.
  if (topk > 0) {
    at::Tensor group = topk_group.has_value() ? topk_group->to(at::kLong).index_select(0, row) : image;
    if (config.topk_per_class) {
      group = group * n_classes + label;
    }
    group = at::where(admitted, group, none_t);
    const at::Tensor order = sort_by_key_then_score(group, score);
    const at::Tensor in_topk = rank_in_runs(group.index_select(0, order)).lt(topk);
    at::Tensor keep = at::empty_like(admitted);
    keep.index_copy_(0, order, in_topk);
    admitted = admitted.logical_and(keep);
    // A pair the top-k cut is neither a detection nor a near-miss: from here on only the
    // admitted pairs take part (at most topk per group; a second host sync, which turns every
    // later sort over all the pairs above the floor, millions for a dense head with a low
    // threshold, into one over those few).
    const at::Tensor live = admitted.nonzero().squeeze(1);
    if (live.size(0) < n_pairs) {
      row = row.index_select(0, live);
      label = label.index_select(0, live);
      score = score.index_select(0, live);
      image = image.index_select(0, live);
      if (per_class_boxes) {
        box = box.index_select(0, live);
      }
      n_pairs = live.size(0);
      admitted = at::ones({n_pairs}, admitted.options());
      if (n_pairs == 0) {
        return join_results(result, misses);
      }
    }
  }
  if (!per_class_boxes) {
    box = box.index_select(0, row);
  }
  box = box.contiguous();
  // Pairs at or below score_thresh (collected for near-misses only) take no part in NMS.
  const at::Tensor above = want ? score.gt(at::Scalar(score_thresh)) : at::ones_like(admitted);
  const at::Tensor in_nms = admitted.logical_and(above);

  // NMS per (image, class).
  const at::Tensor nms_group = at::where(in_nms, image * n_classes + label, none_t);
  const at::Tensor nms_order = sort_by_key_then_score(nms_group, score);
  const at::Tensor sorted_box = box.index_select(0, nms_order).contiguous();
  const at::Tensor sorted_group = nms_group.index_select(0, nms_order).contiguous();
  at::Tensor kept_sorted;
  AT_DISPATCH_FLOATING_TYPES(compute, "group_nms", [&] {
    kept_sorted = launch_group_nms<scalar_t>(sorted_box, sorted_group, iou_thresh, none);
  });
  at::Tensor kept = at::zeros_like(kept_sorted);
  kept.index_copy_(0, nms_order, kept_sorted);

  // The best max_detections of each image.
  const at::Tensor final_key = at::where(kept.to(at::kBool), image, none_t);
  const at::Tensor final_order = sort_by_key_then_score(final_key, score);
  const at::Tensor sorted_key = final_key.index_select(0, final_order).contiguous();
  const at::Tensor rank = rank_in_runs(sorted_key).contiguous();
  at::Tensor counts = at::zeros({n_images}, out_counts.options());
  if (max_detections > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "write_detections", [&] {
      using S = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(compute, "write_detections_compute", [&] {
        write_detections_kernel<scalar_t, S><<<blocks_for(n_pairs), kThreads, 0, stream>>>(
            final_order.data_ptr<int64_t>(), rank.data_ptr<int64_t>(), sorted_key.data_ptr<int64_t>(), none, n_pairs,
            max_detections, box.data_ptr<scalar_t>(), score.data_ptr<scalar_t>(), image.data_ptr<int64_t>(),
            row.data_ptr<int64_t>(), label.data_ptr<int64_t>(), net.data_ptr<float>(), orig.data_ptr<float>(),
            out_boxes.data_ptr<S>(), out_scores.data_ptr<S>(), out_labels.data_ptr<int64_t>(),
            out_candidates.data_ptr<int64_t>(), reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
      });
    });
    AT_CUDA_CHECK(cudaGetLastError());
  }
  out_counts.copy_(counts);
  if (!want) {
    return join_results(result, misses);
  }

  // Near-misses: below_score, suppressed (with the kept pair that did it), over_cap.
  const at::Tensor is_kept_sorted = sorted_key.ne(none);
  const at::Tensor minus_one = at::full({}, -1, rank.options());
  at::Tensor detection_row = at::empty_like(rank);  // per pair: its detection row, or -1
  detection_row.index_copy_(0, final_order,
                            at::where(is_kept_sorted.logical_and(rank.lt(max_detections)), rank, minus_one));
  at::Tensor over_cap = at::empty_like(admitted);
  over_cap.index_copy_(0, final_order, is_kept_sorted.logical_and(rank.ge(max_detections)));
  at::Tensor suppressor = at::full({n_pairs}, -1, rank.options());
  at::Tensor suppressor_iou = at::full({n_pairs}, NAN, scores.options().dtype(at::kFloat));
  const at::Tensor group_offset = rank_in_runs(sorted_group).contiguous();
  AT_DISPATCH_FLOATING_TYPES(compute, "suppressors", [&] {
    suppressor_kernel<scalar_t><<<blocks_for(n_pairs), kThreads, 0, stream>>>(
        sorted_box.data_ptr<scalar_t>(), sorted_group.data_ptr<int64_t>(), group_offset.data_ptr<int64_t>(),
        kept_sorted.data_ptr<uint8_t>(), nms_order.data_ptr<int64_t>(), none, n_pairs,
        common::nms_threshold<scalar_t>(iou_thresh), suppressor.data_ptr<int64_t>(),
        suppressor_iou.data_ptr<float>());
  });
  AT_CUDA_CHECK(cudaGetLastError());
  const at::Tensor suppressed = in_nms.logical_and(kept.to(at::kBool).logical_not());
  const auto byte = [&](int v) { return at::full({}, v, admitted.options().dtype(at::kByte)); };
  const at::Tensor reason = at::where(
      admitted.logical_and(above.logical_not()), byte(common::kBelowScore),
      at::where(suppressed, byte(common::kSuppressed), at::where(over_cap, byte(common::kOverCap), byte(0))));
  const at::Tensor is_miss = reason.ne(0);
  const at::Tensor nm_key = at::where(is_miss, image, none_t);
  const at::Tensor nm_order = sort_by_key_then_score(nm_key, score);
  const at::Tensor nm_sorted_key = nm_key.index_select(0, nm_order).contiguous();
  const at::Tensor nm_rank = rank_in_runs(nm_sorted_key).contiguous();
  const at::Tensor totals = at::zeros({n_images}, rank.options()).index_add_(0, image, is_miss.to(at::kLong));
  nm_counts.copy_(totals.clamp_max(near_miss));
  nm_exhausted.copy_(totals.gt(near_miss));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "write_near_misses", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(compute, "write_near_misses_compute", [&] {
      write_near_misses_kernel<scalar_t, S><<<blocks_for(n_pairs), kThreads, 0, stream>>>(
          nm_order.data_ptr<int64_t>(), nm_rank.data_ptr<int64_t>(), nm_sorted_key.data_ptr<int64_t>(), none,
          n_pairs, near_miss, box.data_ptr<scalar_t>(), score.data_ptr<scalar_t>(), image.data_ptr<int64_t>(),
          row.data_ptr<int64_t>(), label.data_ptr<int64_t>(), reason.data_ptr<uint8_t>(),
          suppressor.data_ptr<int64_t>(), suppressor_iou.data_ptr<float>(), detection_row.data_ptr<int64_t>(),
          net.data_ptr<float>(), orig.data_ptr<float>(), nm_boxes.data_ptr<S>(), nm_scores.data_ptr<S>(),
          nm_labels.data_ptr<int64_t>(), nm_candidates.data_ptr<int64_t>(), nm_reason.data_ptr<uint8_t>(),
          nm_by.data_ptr<int64_t>(), nm_iou.data_ptr<float>());
    });
  });
  AT_CUDA_CHECK(cudaGetLastError());
  return join_results(result, misses);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyodlog, CUDA, m) {
  m.impl("postprocess_detections", &postprocess_detections_op<postprocess_cuda>);
  m.impl("postprocess_detections_near_miss", &postprocess_detections_near_miss_op<postprocess_cuda>);
  m.impl("activated_rows", &activated_rows);  // torch's own activation, then the rows above (ops/activation.cpp)
}

}  // namespace cuda
}  // namespace pyodlog
