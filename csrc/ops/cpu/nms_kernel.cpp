// Batched NMS on the CPU: candidates are bucketed by category, each bucket is
// sorted and suppressed greedily on its own (buckets in parallel), and the kept
// indices are returned in the global visiting order.
#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common/nms_order.h"
#include "ops/cpu/greedy_nms.h"
#include "ops/nms.h"

namespace pyodlog {
namespace cpu {

namespace {

// Sorts positions [first, last) of `order` into visiting order.
template <typename T>
void sort_visiting_order(int64_t* first, int64_t* last, const T* score, std::vector<uint64_t>& keys) {
  if constexpr (std::is_same_v<T, float>) {
    const int64_t n = last - first;
    keys.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      keys[i] = common::visit_key(score[first[i]], static_cast<uint32_t>(first[i]));
    }
    std::sort(keys.begin(), keys.end());
    for (int64_t i = 0; i < n; ++i) {
      first[i] = static_cast<int64_t>(keys[i] & 0xffffffffu);
    }
  } else {
    std::sort(first, last, [&](int64_t a, int64_t b) { return common::visits_before(score[a], a, score[b], b); });
  }
}

template <typename T>
at::Tensor batched_nms_impl(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                            double iou_threshold) {
  const int64_t n = boxes.size(0);
  TORCH_CHECK(n < (int64_t{1} << 32), "batched_nms supports fewer than 2^32 boxes, got ", n);
  const T* box = boxes.data_ptr<T>();
  const T* score = scores.data_ptr<T>();
  const int64_t* category = idxs.data_ptr<int64_t>();
  const T threshold = common::nms_threshold<T>(iou_threshold);

  std::vector<int64_t> bucket_starts;
  std::vector<int64_t> order = bucket_by_category(category, n, bucket_starts);
  const int64_t n_buckets = static_cast<int64_t>(bucket_starts.size()) - 1;
  std::vector<uint8_t> kept(n, 0);

  // Grain: enough buckets per task that a task does real work.
  const int64_t grain = std::max<int64_t>(1, n_buckets * 256 / std::max<int64_t>(n, 1));
  at::parallel_for(0, n_buckets, grain, [&](int64_t begin, int64_t end) {
    GreedyNms<T> nms;
    std::vector<uint64_t> keys;
    for (int64_t bucket = begin; bucket < end; ++bucket) {
      int64_t* first = order.data() + bucket_starts[bucket];
      int64_t* last = order.data() + bucket_starts[bucket + 1];
      sort_visiting_order(first, last, score, keys);
      nms.reset();
      for (const int64_t* it = first; it != last; ++it) {
        const T* b = box + 4 * (*it);
        kept[*it] = nms.offer(b[0], b[1], b[2], b[3], threshold);
      }
    }
  });

  std::vector<int64_t> keep;
  keep.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (kept[i]) {
      keep.push_back(i);
    }
  }
  std::vector<uint64_t> keys;
  sort_visiting_order(keep.data(), keep.data() + keep.size(), score, keys);
  at::Tensor out = at::empty({static_cast<int64_t>(keep.size())}, idxs.options().dtype(at::kLong));
  std::copy(keep.begin(), keep.end(), out.data_ptr<int64_t>());
  return out;
}

at::Tensor batched_nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                           double iou_threshold) {
  check_batched_nms_args(boxes, scores, idxs, iou_threshold);
  if (boxes.size(0) == 0) {
    return at::empty({0}, idxs.options().dtype(at::kLong));
  }
  const at::ScalarType compute = nms_compute_type(boxes.scalar_type());
  const at::Tensor boxes_c = boxes.to(compute).contiguous();
  const at::Tensor scores_c = scores.to(compute).contiguous();
  const at::Tensor idxs_c = idxs.to(at::kLong).contiguous();
  at::Tensor kept;
  AT_DISPATCH_FLOATING_TYPES(compute, "batched_nms_cpu", [&] {
    kept = batched_nms_impl<scalar_t>(boxes_c, scores_c, idxs_c, iou_threshold);
  });
  return kept;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyodlog, CPU, m) {
  m.impl("batched_nms", &batched_nms_cpu);
}

}  // namespace cpu
}  // namespace pyodlog
