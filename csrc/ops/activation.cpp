// The activation of the post-processing operators: they may take raw class logits
// and activate only the rows that can hold a pair above the threshold (on the
// CPU), each score computed exactly as torch computes it.
//
// torch's float sigmoid on the CPU takes a vectorised path for every element of
// a contiguous run except its last (< 2 vectors) ones, which take a scalar path
// that differs from it in the last bit for a few percent of inputs; which
// elements those are depends on how the tensor is laid out and split between
// threads. The scores here are always the vectorised path's (the run is padded
// to whole vectors and cut into whole-vector blocks, one per thread): the value
// the detection heads compute for all but those last elements of their own runs.
#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include "ops/common/activation_math.h"
#include "ops/common/checks.h"
#include "ops/postprocess.h"

namespace pyodlog {

Activation parse_activation(c10::string_view name, const std::optional<at::Tensor>& centerness) {
  Activation a;
  if (name == "none") {
    a = Activation::kNone;
  } else if (name == "sigmoid") {
    a = Activation::kSigmoid;
  } else if (name == "sigmoid_centerness") {
    a = Activation::kSigmoidCenterness;
  } else {
    TORCH_CHECK(false, "activation must be 'none' (scores already activated), 'sigmoid' or 'sigmoid_centerness', got '",
                std::string(name), "'");
  }
  TORCH_CHECK(centerness.has_value() == (a == Activation::kSigmoidCenterness),
              a == Activation::kSigmoidCenterness
                  ? "activation 'sigmoid_centerness' needs centerness (one logit per row of scores)"
                  : "centerness is only used with activation 'sigmoid_centerness'; pass None");
  return a;
}

namespace {

constexpr int64_t kPad = 64;  // whole double vectors of every width and dtype

int64_t padded_size(int64_t n) {
  return (n + kPad - 1) / kPad * kPad;
}

// dst = sigmoid(src), 1-D, numel a multiple of kPad (dst may be src): torch's vectorised path for
// every element. One block per thread, each a multiple of kPad, run inside the parallel region
// (where torch runs an operator on the calling thread, so that no block is split again and no
// element falls in a scalar tail); with one thread, one block (torch does not split it either).
void sigmoid_blocks(const at::Tensor& src, const at::Tensor& dst) {
  const int64_t n = src.numel();
  if (n == 0) {
    return;
  }
  const int64_t threads = at::get_num_threads();
  if (threads <= 1) {
    at::Tensor o = dst;
    at::sigmoid_out(o, src);
    return;
  }
  const int64_t block = std::max(kPad, padded_size((n + threads - 1) / threads));
  const int64_t n_blocks = (n + block - 1) / block;
  // The workers take the caller's thread-local state (inference mode: `dst` may be an inference
  // tensor).
  const at::ThreadLocalState caller;
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * block, len = std::min(block, n - start);
      at::Tensor o = dst.narrow(0, start, len);
      at::sigmoid_out(o, src.narrow(0, start, len));
    }
  });
}

// Every element through torch's vectorised sigmoid (on the CPU: the run padded to whole vectors
// and cut into single-thread blocks).
at::Tensor vector_sigmoid(const at::Tensor& x) {
  if (!x.is_cpu()) {
    return at::sigmoid(x);
  }
  const at::Tensor in = x.contiguous().view(-1);
  const int64_t n = in.numel(), n_full = n / kPad * kPad;
  at::Tensor out = at::empty({padded_size(n)}, x.options());
  if (n_full > 0) {
    sigmoid_blocks(in.narrow(0, 0, n_full), out.narrow(0, 0, n_full));
  }
  if (n > n_full) {
    at::Tensor tail = at::zeros({kPad}, x.options());
    tail.narrow(0, 0, n - n_full).copy_(in.narrow(0, n_full, n - n_full));
    sigmoid_blocks(tail, out.narrow(0, n_full, kPad));
  }
  return out.narrow(0, 0, n).view(x.sizes());
}

// The activated scores of logit rows [R, C] (centerness [R] with sigmoid_centerness).
at::Tensor activate(const at::Tensor& logits, Activation a, const at::Tensor& centerness) {
  at::Tensor s = vector_sigmoid(logits);
  if (a == Activation::kSigmoidCenterness) {
    s = at::sqrt(s * vector_sigmoid(centerness).unsqueeze(1));
  }
  return s;
}

void check_activation_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& centerness) {
  TORCH_CHECK(logits.dim() == 2, "scores must have shape [N, C] (one row of class logits per candidate), got ",
              logits.sizes());
  checks::floating(logits, "scores");
  if (centerness.has_value()) {
    TORCH_CHECK(centerness->numel() == logits.size(0) && (centerness->dim() == 1 ||
                                                          (centerness->dim() == 2 && centerness->size(1) == 1)),
                "centerness must have shape [", logits.size(0), "] or [", logits.size(0),
                ", 1] (one logit per row of scores), got ", centerness->sizes());
    TORCH_CHECK(centerness->scalar_type() == logits.scalar_type(), "centerness and scores must have the same dtype, got ",
                centerness->scalar_type(), " and ", logits.scalar_type());
    checks::same_device(logits, *centerness, "scores", "centerness");
  }
}

// CPU: the rows with a logit above the row's bound (one read of the logits, nothing
// activated; a row stops being read at its first logit above), in row order.
template <typename S, typename T>
std::vector<int64_t> live_rows_cpu(const S* logits, const S* centerness, int64_t n, int64_t c, int64_t first_label,
                                   double lower) {
  std::vector<char> live(n, 0);
  const T fixed = static_cast<T>(std::is_same_v<T, float> ? common::float_at_most(common::logit_of(lower))
                                                           : common::logit_of(lower));
  constexpr int64_t kChunk = 16;  // read in vector-sized chunks, stopping at the first hit
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T bound = fixed;
      if (centerness != nullptr) {
        const double b = common::centerness_logit_bound(lower, static_cast<double>(centerness[r]));
        bound = static_cast<T>(std::is_same_v<T, float> ? common::float_at_most(b) : b);
      }
      const S* row = logits + r * c;
      bool any = false;
      int64_t k = first_label;
      for (; !any && k + kChunk <= c; k += kChunk) {
        bool hit = false;
        for (int64_t j = 0; j < kChunk; ++j) {
          hit |= common::may_pass(static_cast<T>(row[k + j]), bound);
        }
        any = hit;
      }
      for (; !any && k < c; ++k) {
        any = common::may_pass(static_cast<T>(row[k]), bound);
      }
      live[r] = any ? 1 : 0;
    }
  });
  std::vector<int64_t> rows;
  for (int64_t r = 0; r < n; ++r) {
    if (live[r]) {
      rows.push_back(r);
    }
  }
  return rows;
}

// The sigmoid of rows `rows` of `logits` [N, C] (contiguous, CPU): the rows copied side by side
// into a buffer padded to whole vectors, activated in place. Returns [R, C].
at::Tensor sigmoid_of_rows(const at::Tensor& logits, const std::vector<int64_t>& rows) {
  const int64_t r_count = static_cast<int64_t>(rows.size()), c = logits.size(1);
  const int64_t n = r_count * c;
  at::Tensor buf = at::empty({padded_size(n)}, logits.options());
  const size_t row_bytes = static_cast<size_t>(c) * logits.element_size();
  const char* src = static_cast<const char*>(logits.data_ptr());
  char* dst = static_cast<char*>(buf.data_ptr());
  at::parallel_for(0, r_count, 512, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(dst + i * row_bytes, src + rows[i] * row_bytes, row_bytes);
    }
  });
  if (buf.numel() > n) {
    buf.narrow(0, n, buf.numel() - n).zero_();
  }
  sigmoid_blocks(buf, buf);
  return buf.narrow(0, 0, n).view({r_count, c});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> activated_rows(const at::Tensor& logits, c10::string_view activation,
                                                  double thresh, int64_t first_label,
                                                  const std::optional<at::Tensor>& centerness) {
  const Activation a = parse_activation(activation, centerness);
  check_activation_inputs(logits, centerness);
  TORCH_CHECK(!std::isnan(thresh), "thresh must be a number, got NaN");
  TORCH_CHECK(first_label >= 0, "first_label must be >= 0, got ", first_label);
  const int64_t n = logits.size(0), c = logits.size(1);
  const auto index_options = logits.options().dtype(at::kLong);
  const at::Tensor ctr = centerness.has_value() ? centerness->reshape(-1).contiguous() : at::Tensor();
  if (a == Activation::kNone) {
    // Scores already: the rows with a score above the threshold, exactly.
    const at::Tensor pairs = logits.narrow(1, std::min(first_label, c), c - std::min(first_label, c));
    const at::Tensor rows =
        pairs.size(1) ? (pairs > thresh).any(1).nonzero().squeeze(1) : at::empty({0}, index_options);
    return {rows, logits.index_select(0, rows)};
  }
  const double lower = common::activated_lower_bound(thresh);
  at::Tensor rows;
  if (!(lower > 0.0)) {
    rows = at::arange(n, index_options);  // every score may pass
  } else if (logits.is_cpu()) {
    const at::Tensor l = logits.contiguous();
    std::vector<int64_t> live;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.scalar_type(), "activated_rows_cpu", [&] {
      const scalar_t* ctr_ptr = ctr.defined() ? ctr.data_ptr<scalar_t>() : nullptr;
      if constexpr (std::is_same_v<scalar_t, double>) {
        live = live_rows_cpu<scalar_t, double>(l.data_ptr<scalar_t>(), ctr_ptr, n, c, first_label, lower);
      } else {
        live = live_rows_cpu<scalar_t, float>(l.data_ptr<scalar_t>(), ctr_ptr, n, c, first_label, lower);
      }
    });
    rows = at::tensor(live, index_options);
    if (static_cast<int64_t>(live.size()) < n) {
      at::Tensor scores = sigmoid_of_rows(l, live);
      if (a == Activation::kSigmoidCenterness) {
        scores = at::sqrt(scores * vector_sigmoid(ctr.index_select(0, rows)).unsqueeze(1));
      }
      return {rows, scores};
    }
  } else {
    // Other devices: exact scores of every pair (torch's kernels), the rows holding one above.
    const at::Tensor s = activate(logits, a, ctr);
    const int64_t f = std::min(first_label, c);
    const at::Tensor pairs = s.narrow(1, f, c - f);
    rows = pairs.size(1) ? (pairs > thresh).any(1).nonzero().squeeze(1) : at::empty({0}, index_options);
    return {rows, s.index_select(0, rows)};
  }
  const bool all = rows.size(0) == n;
  const at::Tensor picked = all ? logits : logits.index_select(0, rows);
  const at::Tensor picked_ctr = !ctr.defined() ? ctr : (all ? ctr : ctr.index_select(0, rows));
  return {rows, activate(picked, a, picked_ctr)};
}

double compared_threshold(double thresh, at::ScalarType scores_dtype) {
  // torch compares a tensor with a Python float in the tensor's dtype: the float is rounded to it
  // first (c10::Half / c10::BFloat16 from the float, as torch converts the scalar).
  switch (scores_dtype) {
    case at::kHalf:
      return static_cast<float>(c10::Half(static_cast<float>(thresh)));
    case at::kBFloat16:
      return static_cast<float>(c10::BFloat16(static_cast<float>(thresh)));
    default:
      return thresh;
  }
}

PostprocessNearMissResult postprocess_activated(PostprocessImpl impl, const at::Tensor& scores,
                                                const at::Tensor& boxes, const at::Tensor& image_index,
                                                const at::Tensor& net_sizes, const at::Tensor& orig_sizes,
                                                const PostprocessConfig& requested, int64_t near_miss,
                                                double requested_floor, const std::optional<at::Tensor>& topk_group,
                                                c10::string_view activation,
                                                const std::optional<at::Tensor>& centerness) {
  // Scores of a narrower dtype than float32 are compared with the thresholds as torchvision's heads
  // compare them (`scores > score_thresh` on a float16 or bfloat16 tensor): with the thresholds
  // rounded to that dtype. The kernels compare in float32, where those values are exact.
  PostprocessConfig config = requested;
  config.score_thresh = compared_threshold(requested.score_thresh, scores.scalar_type());
  const double near_miss_floor = compared_threshold(requested_floor, scores.scalar_type());
  const Activation a = parse_activation(activation, centerness);
  if (a == Activation::kNone) {
    return impl(scores, boxes, image_index, net_sizes, orig_sizes, config, near_miss, near_miss_floor, topk_group);
  }
  check_activation_inputs(scores, centerness);
  const int64_t n_images =
      check_postprocess_args(scores, boxes, image_index, net_sizes, orig_sizes, topk_group, config);
  check_near_miss_args(near_miss, near_miss_floor);
  const at::Tensor ctr = centerness.has_value() ? centerness->reshape(-1) : at::Tensor();
  if (!scores.is_cpu()) {
    // No host synchronisation here: every pair activated by torch's own kernel, then the device's pass.
    return impl(activate(scores, a, ctr), boxes, image_index, net_sizes, orig_sizes, config, near_miss,
                near_miss_floor, topk_group);
  }
  const int64_t n = scores.size(0);
  if (n > 0) {
    // The rows left out are never read again: their image index is checked here.
    const auto [lo, hi] = at::aminmax(image_index);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < n_images, "image_index holds ",
                lo.item<int64_t>(), "..", hi.item<int64_t>(), ", out of range for ", n_images, " images");
  }
  // A pair is collected when its score passes the collect threshold (the floor with near-misses).
  const double thresh = near_miss > 0 && near_miss_floor < config.score_thresh ? near_miss_floor : config.score_thresh;
  auto [rows, act] = activated_rows(scores, activation, thresh, config.first_label, centerness);
  if (rows.size(0) == n) {
    return impl(act, boxes, image_index, net_sizes, orig_sizes, config, near_miss, near_miss_floor, topk_group);
  }
  const std::optional<at::Tensor> group =
      topk_group.has_value() ? std::optional<at::Tensor>(topk_group->index_select(0, rows)) : std::nullopt;
  auto out = impl(act, boxes.index_select(0, rows), image_index.index_select(0, rows), net_sizes, orig_sizes,
                  config, near_miss, near_miss_floor, group);
  // Candidates of the kept rows -> rows of `scores`.
  const auto to_rows = [&](at::Tensor& candidates) {
    if (rows.size(0) == 0 || candidates.numel() == 0) {
      return;
    }
    const at::Tensor at_row = rows.index_select(0, candidates.clamp_min(0).reshape(-1)).view(candidates.sizes());
    candidates = at::where(candidates >= 0, at_row, candidates);
  };
  to_rows(std::get<3>(out));
  to_rows(std::get<8>(out));
  return out;
}

}  // namespace pyodlog

TORCH_LIBRARY_FRAGMENT(pyodlog, m) {
  // The rows of raw class logits that may hold a pair scoring above `thresh` once activated
  // (a superset: a margin in logit space), and those rows' scores, each as torch computes it.
  m.def(
      "activated_rows(Tensor logits, str activation, float thresh, int first_label=0, Tensor? centerness=None) "
      "-> (Tensor rows, Tensor scores)");
}

TORCH_LIBRARY_IMPL(pyodlog, CPU, m) {
  m.impl("activated_rows", &pyodlog::activated_rows);
}
