// postprocess_detections on the CPU: images in parallel; inside an image, the
// (candidate, class) pairs that pass the score filter are collected once, cut
// to the top-k of their group, suppressed per class with the same greedy NMS as
// batched_nms, and the best max_detections written out scaled to the original
// image size.
#include <algorithm>
#include <cstdint>
#include <cmath>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common/box_math.h"
#include "ops/common/near_miss_math.h"
#include "ops/common/nms_order.h"
#include "ops/common/postprocess_math.h"
#include "ops/cpu/greedy_nms.h"
#include "ops/postprocess.h"

namespace pyodlog {
namespace cpu {
namespace {

template <typename T>
struct Pair {
  uint64_t visit;  // visiting order key: score descending, then flat index (row * C + class)
  int64_t group;   // top-k group
  T box[4];        // clipped, in network-input coordinates
  T score;
  int64_t row;
  int64_t label;
};

template <typename T>
uint64_t visit_of(T score, uint32_t flat) {
  if constexpr (std::is_same_v<T, float>) {
    return common::visit_key(score, flat);
  } else {
    return common::visit_key(static_cast<float>(score), flat);
  }
}

template <typename T>
bool visits_before(const Pair<T>& a, const Pair<T>& b) {
  if (a.visit != b.visit) {
    // Keys from float scores order correctly; double scores that round to the
    // same float are settled exactly below.
    if constexpr (std::is_same_v<T, float>) {
      return a.visit < b.visit;
    }
  }
  return common::visits_before(a.score, static_cast<int64_t>(a.visit & 0xffffffffu), b.score,
                               static_cast<int64_t>(b.visit & 0xffffffffu));
}

// Keeps the `topk` keys that visit first (in any order); returns the one of
// them that visits last.
template <typename T, typename S>
uint64_t keep_topk(std::vector<uint64_t>& keys, int64_t topk, const S* scores) {
  if constexpr (std::is_same_v<T, float>) {
    std::nth_element(keys.begin(), keys.begin() + (topk - 1), keys.end());
    keys.resize(topk);
    return keys[topk - 1];
  } else {
    // Keys hold float-rounded scores: rank float64 scores exactly.
    const auto before = [&](uint64_t a, uint64_t b) {
      const int64_t fa = static_cast<int64_t>(a & 0xffffffffu), fb = static_cast<int64_t>(b & 0xffffffffu);
      return common::visits_before(static_cast<T>(scores[fa]), fa, static_cast<T>(scores[fb]), fb);
    };
    std::nth_element(keys.begin(), keys.begin() + (topk - 1), keys.end(), before);
    keys.resize(topk);
    return keys[topk - 1];
  }
}

// The pairs at or below the score threshold (but above the near-miss floor) of a
// collection without top-k: only the best `k` of them (visiting order) can become
// near-misses, so they are held apart and pruned like a top-k (hold_best), so that
// the pairs under the raised floor skip their box check. `seen` counts the pairs
// held (more than k when pruned: the near-miss budget is then exhausted whatever
// the exact count).
//
// Pairs above the score threshold visit before every below pair, and all but max_detections of
// them end up suppressed or over the cap: once more than max_detections + k pairs above the
// threshold are collected, no below pair can be among the first k near-misses (and the budget
// is exhausted), so the scan drops the collector there and filters the rest as it would
// without near-misses.
struct BelowCollector {
  int64_t k = 0;
  std::vector<uint64_t> keys;
  size_t seen = 0;
  size_t close_above = 0;  // dropped once the pairs collected above the threshold exceed this
};

// Holds `key` among `keys`, the best `k` so far (all when k <= 0): past 2k held keys,
// only the best k are kept, and the returned score filter is raised to the worst of
// them. Keys arrive in visiting order among equal scores (rows increase), so a later
// pair of equal score visits after the worst held one: only a strictly higher score
// can still enter.
template <typename T, typename S>
T hold_best(std::vector<uint64_t>& keys, uint64_t key, int64_t k, const S* scores, T cutoff) {
  keys.push_back(key);
  if (k <= 0 || keys.size() < static_cast<size_t>(2 * k)) {
    return cutoff;
  }
  const uint64_t worst = keep_topk<T, S>(keys, k, scores);
  const T worst_score = static_cast<T>(scores[worst & 0xffffffffu]);
  return worst_score > cutoff ? worst_score : cutoff;
}

// Scores scanned per block in collect_group (the bits of a pass mask).
constexpr int64_t kScanBlock = 32;

// Bit i set where scores[i] passes `thresh` (common::passes_score: NaN never does), i < n <= 32.
template <typename T, typename S>
uint32_t pass_mask(const S* scores, int64_t n, T thresh) {
  uint32_t mask = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<S, float> && std::is_same_v<T, float>) {
    if (n == kScanBlock) {  // 8 ordered compares of 4 (cmpgt is false for NaN, as `>` is)
      const __m128 t = _mm_set1_ps(thresh);
      for (int i = 0; i < 8; ++i) {
        const __m128 passes = _mm_cmpgt_ps(_mm_loadu_ps(scores + 4 * i), t);
        mask |= static_cast<uint32_t>(_mm_movemask_ps(passes)) << (4 * i);
      }
      return mask;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    mask |= static_cast<uint32_t>(static_cast<T>(scores[i]) > thresh) << i;
  }
  return mask;
}

// Collects, for the rows of one top-k group, the visiting keys of the pairs that
// pass the score filter (and min_size), keeping only the best `topk` of them
// (all when topk <= 0). Only keys are handled here (8 bytes a pair): a dense
// head passes millions of pairs, and boxes are built for the survivors only.
// With `below`, `score_thresh` is the near-miss floor and the pairs at or below
// `above_thresh` go to `below` instead.
template <typename T, typename S, typename B>
void collect_group(const S* scores, const B* boxes, bool per_class_boxes, int64_t n_classes, int64_t first_label,
                   int64_t last_label, const int64_t* rows_begin, const int64_t* rows_end, T score_thresh,
                   T min_size, bool clip, T net_h, T net_w, int64_t topk, std::vector<uint64_t>& scratch,
                   std::vector<uint64_t>& out, BelowCollector* below = nullptr, T above_thresh = T(0)) {
  scratch.clear();
  T cutoff = score_thresh;
  T below_cutoff = score_thresh;  // with `below`: score_thresh is the floor
  for (const int64_t* r = rows_begin; r != rows_end; ++r) {
    if (below != nullptr && scratch.size() > below->close_above) {
      // No below pair can be a near-miss any more (see BelowCollector): filter as without.
      below->keys.clear();
      below = nullptr;
      cutoff = above_thresh;
    }
    const int64_t row = *r;
    const S* row_scores = scores + row * n_classes;
    // Scores are compared a block at a time with the lowest filter in force, and only those
    // that pass it are visited (the filters only rise while a block is visited, and each pair
    // is checked again against them): most pairs of a trained head fail.
    for (int64_t block = first_label; block < last_label; block += kScanBlock) {
      const int64_t block_end = std::min(block + kScanBlock, last_label);
      for (uint32_t mask = pass_mask(row_scores + block, block_end - block, below != nullptr ? below_cutoff : cutoff);
           mask != 0; mask &= mask - 1) {
        const int64_t c = block + __builtin_ctz(mask);
        const T score = static_cast<T>(row_scores[c]);
        bool is_below = false;
        if (below != nullptr) {
          if (!common::passes_score(score, below_cutoff)) {
            continue;
          }
          is_below = !common::passes_score(score, above_thresh);
        } else if (!common::passes_score(score, cutoff)) {
          continue;
        }
        if (min_size > T(0)) {
          T box[4];
          const B* b = per_class_boxes ? boxes + (row * n_classes + c) * 4 : boxes + row * 4;
          for (int k = 0; k < 4; ++k) {
            box[k] = static_cast<T>(b[k]);
          }
          if (clip) {
            common::clip_box(box, net_w, net_h);
          }
          if (!common::large_enough(box, min_size)) {
            continue;
          }
        }
        const uint64_t key = visit_of(score, static_cast<uint32_t>(row * n_classes + c));
        if (is_below) {
          ++below->seen;
          below_cutoff = hold_best<T, S>(below->keys, key, below->k, scores, below_cutoff);
        } else {
          cutoff = hold_best<T, S>(scratch, key, topk, scores, cutoff);
        }
      }
    }
  }
  if (topk > 0 && static_cast<int64_t>(scratch.size()) > topk) {
    keep_topk<T, S>(scratch, topk, scores);
  }
  out.insert(out.end(), scratch.begin(), scratch.end());
}

// Where one image's near-misses go (postprocess_detections_near_miss), or none.
template <typename S, typename B>
struct NearMissOut {
  int64_t k;
  double floor;
  B* boxes;
  S* scores;
  int64_t* labels;
  int64_t* candidates;
  uint8_t* reason;
  int64_t* suppressed_by;
  float* iou;
  int64_t* count;
  bool* exhausted;
};

template <typename T, typename S, typename B>
void postprocess_image(const S* scores, const B* boxes, bool per_class_boxes, int64_t n_classes,
                       const std::vector<int64_t>& rows, const int64_t* topk_group, T net_h, T net_w, float ratio_h,
                       float ratio_w, const PostprocessConfig& config, B* out_boxes, S* out_scores,
                       int64_t* out_labels, int64_t* out_candidates, int64_t* out_count,
                       const NearMissOut<S, B>* nm = nullptr) {
  const T score_thresh = static_cast<T>(config.score_thresh);
  const T min_size = static_cast<T>(config.min_size);
  const bool near_misses = nm != nullptr && nm->k > 0;
  // With near-misses, pairs are collected down to the floor; the top-k ranks
  // them among all of those (a pair's rank depends only on the pairs above it,
  // so the pairs above score_thresh keep the ranks they would have without).
  const T collect_thresh = common::collect_threshold(score_thresh, static_cast<T>(near_misses ? nm->floor : 0.0),
                                                     near_misses);

  // Rows grouped by their top-k group (one group when there is no top-k).
  std::vector<int64_t> grouped_rows = rows;
  std::vector<int64_t> group_starts{0, static_cast<int64_t>(rows.size())};
  if (config.topk > 0 && topk_group != nullptr && !rows.empty()) {
    std::vector<int64_t> row_group(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) {
      row_group[i] = topk_group[rows[i]];
    }
    const std::vector<int64_t> order = bucket_by_category(row_group.data(), static_cast<int64_t>(rows.size()), group_starts);
    for (size_t i = 0; i < rows.size(); ++i) {
      grouped_rows[i] = rows[order[i]];
    }
  }
  std::vector<uint64_t> keys, scratch;
  const int64_t topk = config.topk > 0 ? config.topk : 0;
  // Without top-k, the pairs below score_thresh are held apart while collecting (a pair's
  // fate does not depend on them); with top-k they are ranked with the others first.
  BelowCollector below_collector;
  below_collector.k = near_misses ? nm->k : 0;
  below_collector.close_above = static_cast<size_t>(config.max_detections) + static_cast<size_t>(below_collector.k);
  BelowCollector* below_sink = near_misses && topk == 0 ? &below_collector : nullptr;
  if (below_sink != nullptr) {
    below_collector.keys.reserve(static_cast<size_t>(2 * nm->k));  // hold_best holds at most 2k
  }
  for (size_t g = 0; g + 1 < group_starts.size(); ++g) {
    const int64_t* begin = grouped_rows.data() + group_starts[g];
    const int64_t* end = grouped_rows.data() + group_starts[g + 1];
    // Per class only when there is a top-k to take per class: without one the classes collect
    // alike, and one pass over the rows keeps the flat index rising, which the below
    // collector's pruning needs (a pair tied with the worst held one visits after it).
    if (config.topk_per_class && topk > 0) {
      for (int64_t c = config.first_label; c < n_classes; ++c) {
        collect_group<T, S, B>(scores, boxes, per_class_boxes, n_classes, c, c + 1, begin, end, collect_thresh,
                               min_size, config.clip, net_h, net_w, topk, scratch, keys, below_sink, score_thresh);
      }
    } else {
      collect_group<T, S, B>(scores, boxes, per_class_boxes, n_classes, config.first_label, n_classes, begin, end,
                             collect_thresh, min_size, config.clip, net_h, net_w, topk, scratch, keys, below_sink,
                             score_thresh);
    }
  }

  // With near-misses, the pairs at or below score_thresh are set aside (they take no part in
  // NMS); only the best K of them can be near-misses, so only those become pairs.
  std::vector<uint64_t> below_keys;
  size_t n_below = 0;
  if (below_sink != nullptr) {
    below_keys = std::move(below_collector.keys);
    n_below = below_collector.seen;
    if (static_cast<int64_t>(below_keys.size()) > nm->k) {
      keep_topk<T, S>(below_keys, nm->k, scores);
    }
  } else if (near_misses) {
    const auto above_end = std::partition(keys.begin(), keys.end(), [&](uint64_t key) {
      return common::passes_score(static_cast<T>(scores[key & 0xffffffffu]), score_thresh);
    });
    below_keys.assign(above_end, keys.end());
    keys.erase(above_end, keys.end());
    n_below = below_keys.size();
    if (static_cast<int64_t>(below_keys.size()) > nm->k) {
      keep_topk<T, S>(below_keys, nm->k, scores);
    }
  }

  // The survivors, with their clipped boxes.
  const auto make_pair = [&](uint64_t key) {
    Pair<T> p;
    const int64_t flat = static_cast<int64_t>(key & 0xffffffffu);
    p.visit = key;
    p.row = flat / n_classes;
    p.label = flat % n_classes;
    p.score = static_cast<T>(scores[flat]);
    p.group = 0;
    const B* b = per_class_boxes ? boxes + flat * 4 : boxes + p.row * 4;
    for (int k = 0; k < 4; ++k) {
      p.box[k] = static_cast<T>(b[k]);
    }
    if (config.clip) {
      common::clip_box(p.box, net_w, net_h);
    }
    return p;
  };
  std::vector<Pair<T>> pairs(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    pairs[i] = make_pair(keys[i]);
  }
  std::vector<Pair<T>> below(below_keys.size());
  for (size_t i = 0; i < below_keys.size(); ++i) {
    below[i] = make_pair(below_keys[i]);
  }

  // Per-class greedy NMS. The pairs are bucketed by class (a counting sort),
  // and the classes -- independent of each other -- are sorted by visiting
  // order and suppressed in parallel: inside a batch's parallel loop over
  // images this runs serially, but a single image (the latency-bound case)
  // uses every thread. Kept pairs are compacted class by class, as a serial
  // pass over the (class, visit)-sorted pairs would leave them.
  const int64_t n_labels = n_classes;
  std::vector<int64_t> label_starts(n_labels + 1, 0);
  for (const Pair<T>& p : pairs) {
    ++label_starts[p.label + 1];
  }
  for (int64_t c = 0; c < n_labels; ++c) {
    label_starts[c + 1] += label_starts[c];
  }
  std::vector<Pair<T>> by_label(pairs.size());
  {
    std::vector<int64_t> cursor(label_starts.begin(), label_starts.end() - 1);
    for (const Pair<T>& p : pairs) {
      by_label[cursor[p.label]++] = p;
    }
  }
  const T threshold = common::nms_threshold<T>(config.iou_thresh);
  std::vector<char> kept(by_label.size(), 0);
  // Small workloads stay on the calling thread (a parallel region costs microseconds).
  const int64_t grain = by_label.size() < 4096 ? n_labels : 1;
  at::parallel_for(0, n_labels, grain, [&](int64_t c_begin, int64_t c_end) {
    GreedyNms<T> nms;
    for (int64_t c = c_begin; c < c_end; ++c) {
      auto first = by_label.begin() + label_starts[c], last = by_label.begin() + label_starts[c + 1];
      if (first == last) {
        continue;
      }
      std::sort(first, last, visits_before<T>);
      nms.reset();
      for (auto it = first; it != last; ++it) {
        const T* b = it->box;
        kept[it - by_label.begin()] = nms.offer(b[0], b[1], b[2], b[3], threshold) ? 1 : 0;
      }
    }
  });
  // The kept pairs, ranked as 16-byte references (visiting key, by_label position): the first
  // max_detections are the detections, the next K (with near-misses) the over_cap candidates;
  // only those are ordered (selection, then a sort of max_detections + K references).
  struct Ref {
    uint64_t visit;
    int64_t at;
  };
  std::vector<Ref> ranked;
  ranked.reserve(by_label.size());
  for (size_t i = 0; i < by_label.size(); ++i) {
    if (kept[i]) {
      ranked.push_back({by_label[i].visit, static_cast<int64_t>(i)});
    }
  }
  const size_t n_kept = ranked.size();
  const auto rank_before = [&](const Ref& a, const Ref& b) {
    if constexpr (std::is_same_v<T, float>) {
      return a.visit < b.visit;  // float keys order exactly
    } else {
      return visits_before<T>(by_label[a.at], by_label[b.at]);
    }
  };
  const size_t n_out = std::min<size_t>(n_kept, static_cast<size_t>(config.max_detections));
  const size_t n_ranked = std::min<size_t>(n_kept, n_out + (near_misses ? static_cast<size_t>(nm->k) : 0));
  if (n_ranked < n_kept && n_ranked > 0) {
    std::nth_element(ranked.begin(), ranked.begin() + (n_ranked - 1), ranked.end(), rank_before);
  }
  std::sort(ranked.begin(), ranked.begin() + n_ranked, rank_before);
  pairs.resize(n_ranked);
  for (size_t i = 0; i < n_ranked; ++i) {
    pairs[i] = by_label[ranked[i].at];
    pairs[i].group = ranked[i].at;  // where it came from (a suppressor's row)
  }
  for (size_t i = 0; i < n_out; ++i) {
    const Pair<T>& p = pairs[i];
    B in[4];
    for (int k = 0; k < 4; ++k) {
      in[k] = static_cast<B>(p.box[k]);
    }
    common::scale_box(in, out_boxes + 4 * i, ratio_w, ratio_h, /*clip=*/false, 0.0f, 0.0f);
    out_scores[i] = static_cast<S>(p.score);
    out_labels[i] = p.label;
    out_candidates[i] = p.row;
  }
  *out_count = static_cast<int64_t>(n_out);
  if (!near_misses) {
    return;
  }

  // Near-misses: every pair that is not a detection, the first K in visiting order. Each reason
  // contributes its own first K (any of the first K overall is among them), picked and ranked as
  // 16-byte references (visiting key, reason, position), the pairs themselves never moved.
  const size_t k = static_cast<size_t>(nm->k);
  struct MissRef {
    uint64_t visit;
    uint32_t at;  // position in below / by_label / pairs, by reason
    uint8_t reason;
  };
  const auto pair_of = [&](const MissRef& m) -> const Pair<T>& {
    return m.reason == common::kBelowScore ? below[m.at] : m.reason == common::kSuppressed ? by_label[m.at] : pairs[m.at];
  };
  const auto ref_before = [&](const MissRef& a, const MissRef& b) {
    if constexpr (std::is_same_v<T, float>) {
      return a.visit < b.visit;  // float keys order exactly
    } else {
      return visits_before<T>(pair_of(a), pair_of(b));
    }
  };
  std::vector<MissRef> misses;
  misses.reserve(below.size() + 2 * k);
  for (size_t i = 0; i < below.size(); ++i) {
    misses.push_back({below[i].visit, static_cast<uint32_t>(i), common::kBelowScore});
  }
  // Holds the first k refs offered (a max-heap on the visiting order: its front visits last);
  // returns false when `r` visits after all of them (it cannot enter).
  const auto offer = [&](std::vector<MissRef>& heap, const MissRef& r) {
    if (heap.size() < k) {
      heap.push_back(r);
      std::push_heap(heap.begin(), heap.end(), ref_before);
      return true;
    }
    if (!ref_before(r, heap.front())) {
      return false;
    }
    std::pop_heap(heap.begin(), heap.end(), ref_before);
    heap.back() = r;
    std::push_heap(heap.begin(), heap.end(), ref_before);
    return true;
  };
  // Over the cap: the first K of the kept pairs after the detections, ranked above. They seed
  // the heap, so that a suppressed pair must visit before them to enter (one comparison for
  // most classes).
  std::vector<MissRef> held;
  held.reserve(k);
  for (size_t i = n_out; i < pairs.size(); ++i) {
    held.push_back({pairs[i].visit, static_cast<uint32_t>(i), common::kOverCap});
  }
  std::make_heap(held.begin(), held.end(), ref_before);
  // Suppressed: the first K of the pairs NMS removed. A class's pairs lie in visiting order,
  // so once one of them cannot enter, none of the class's later ones can.
  const size_t n_suppressed = by_label.size() - n_kept;
  for (int64_t c = 0; c < n_labels && n_suppressed > 0; ++c) {
    for (int64_t i = label_starts[c]; i < label_starts[c + 1]; ++i) {
      if (!kept[i] && !offer(held, {by_label[i].visit, static_cast<uint32_t>(i), common::kSuppressed})) {
        break;
      }
    }
  }
  misses.insert(misses.end(), held.begin(), held.end());
  const size_t n_over_cap = n_kept - n_out;
  // Every near-miss, counted (a dropped below collector stopped counting its pairs: the above
  // ones alone then exceed K).
  const size_t n_misses = n_below + n_suppressed + n_over_cap;
  const size_t n_nm = std::min<size_t>(misses.size(), k);
  if (n_nm < misses.size()) {
    std::nth_element(misses.begin(), misses.begin() + n_nm, misses.end(), ref_before);
  }
  std::sort(misses.begin(), misses.begin() + n_nm, ref_before);

  // A suppressed pair's suppressor: the first kept pair of its class, in visiting order, that
  // overlaps it beyond the threshold (kept before it, so greedy NMS's own), found for the
  // near-misses only, with the CUDA kernel's arithmetic (common::suppresses); its detection row
  // (-1 when it was itself cut by max_detections).
  std::vector<int64_t> detection_row;
  for (size_t i = 0; i < n_nm; ++i) {
    const MissRef& m = misses[i];
    const Pair<T>& p = pair_of(m);
    int64_t by = -1;
    float by_iou = NAN;
    if (m.reason == common::kSuppressed) {
      if (detection_row.empty()) {
        detection_row.assign(by_label.size(), -1);  // by_label position -> detection row
        for (size_t d = 0; d < n_out; ++d) {
          detection_row[pairs[d].group] = static_cast<int64_t>(d);
        }
      }
      T v = T(0);
      for (int64_t j = label_starts[p.label]; j < static_cast<int64_t>(m.at); ++j) {  // kept before it
        if (kept[j] && common::suppresses(by_label[j].box, p.box, threshold, &v)) {
          by = detection_row[j];
          by_iou = static_cast<float>(v);
          break;
        }
      }
    }
    B in[4];
    for (int c = 0; c < 4; ++c) {
      in[c] = static_cast<B>(p.box[c]);
    }
    common::scale_box(in, nm->boxes + 4 * i, ratio_w, ratio_h, /*clip=*/false, 0.0f, 0.0f);
    nm->scores[i] = static_cast<S>(p.score);
    nm->labels[i] = p.label;
    nm->candidates[i] = p.row;
    nm->reason[i] = m.reason;
    nm->suppressed_by[i] = by;
    nm->iou[i] = by_iou;
  }
  *nm->count = static_cast<int64_t>(n_nm);
  *nm->exhausted = n_misses > n_nm;
}

PostprocessNearMissResult postprocess_cpu(const at::Tensor& scores, const at::Tensor& boxes,
                                          const at::Tensor& image_index, const at::Tensor& net_sizes,
                                          const at::Tensor& orig_sizes, const PostprocessConfig& config,
                                          int64_t near_miss, double near_miss_floor,
                                          const std::optional<at::Tensor>& topk_group) {
  const int64_t n_images =
      check_postprocess_args(scores, boxes, image_index, net_sizes, orig_sizes, topk_group, config);
  check_near_miss_args(near_miss, near_miss_floor);
  auto result = empty_postprocess_result(scores, boxes, n_images, config.max_detections);
  auto misses = empty_near_miss_result(scores, boxes, n_images, near_miss);
  auto& [out_boxes, out_scores, out_labels, out_candidates, out_counts] = result;
  auto& [nm_boxes, nm_scores, nm_labels, nm_candidates, nm_reason, nm_by, nm_iou, nm_counts, nm_exhausted] = misses;
  if (n_images == 0 || (config.max_detections == 0 && near_miss == 0) || scores.size(0) == 0) {
    return join_results(result, misses);
  }
  const int64_t max_detections = config.max_detections;
  const at::Tensor net = net_sizes.to(at::kFloat).contiguous();
  const at::Tensor orig = orig_sizes.to(at::kFloat).contiguous();
  const at::Tensor image = image_index.to(at::kLong).contiguous();
  const at::Tensor group = topk_group.has_value() ? topk_group->to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor scores_c = scores.contiguous();
  const at::Tensor boxes_c = boxes.contiguous();
  const int64_t n = scores.size(0), n_classes = scores.size(1);

  const int64_t* img = image.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(img[i] >= 0 && img[i] < n_images, "image_index[", i, "] = ", img[i], " is out of range for ",
                n_images, " images");
  }
  const float* net_hw = net.data_ptr<float>();
  const float* orig_hw = orig.data_ptr<float>();
  for (int64_t b = 0; b < n_images; ++b) {
    TORCH_CHECK(net_hw[2 * b] > 0 && net_hw[2 * b + 1] > 0 && orig_hw[2 * b] > 0 && orig_hw[2 * b + 1] > 0,
                "image sizes must be positive, got net_sizes[", b, "] = (", net_hw[2 * b], ", ", net_hw[2 * b + 1],
                ") and orig_sizes[", b, "] = (", orig_hw[2 * b], ", ", orig_hw[2 * b + 1], ")");
  }
  std::vector<int64_t> starts;
  const std::vector<int64_t> by_image = bucket_by_category(img, n, starts);
  // Rows of each image, in row order (empty images have no bucket).
  std::vector<std::vector<int64_t>> rows(n_images);
  for (size_t s = 0; s + 1 < starts.size(); ++s) {
    const int64_t b = img[by_image[starts[s]]];
    rows[b].assign(by_image.begin() + starts[s], by_image.begin() + starts[s + 1]);
  }
  const int64_t* group_ptr = group.defined() ? group.data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "postprocess_detections_cpu", [&] {
    using S = scalar_t;  // scores and boxes share a dtype (checked)
    const bool as_double = scores.scalar_type() == at::kDouble;
    at::parallel_for(0, n_images, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const float rh = common::size_ratio(orig_hw[2 * b], net_hw[2 * b]);
        const float rw = common::size_ratio(orig_hw[2 * b + 1], net_hw[2 * b + 1]);
        NearMissOut<S, S> nm{near_miss,
                             near_miss_floor,
                             nm_boxes.data_ptr<S>() + b * near_miss * 4,
                             nm_scores.data_ptr<S>() + b * near_miss,
                             nm_labels.data_ptr<int64_t>() + b * near_miss,
                             nm_candidates.data_ptr<int64_t>() + b * near_miss,
                             nm_reason.data_ptr<uint8_t>() + b * near_miss,
                             nm_by.data_ptr<int64_t>() + b * near_miss,
                             nm_iou.data_ptr<float>() + b * near_miss,
                             nm_counts.data_ptr<int64_t>() + b,
                             nm_exhausted.data_ptr<bool>() + b};
        auto run = [&](auto compute_tag) {
          using T = decltype(compute_tag);
          postprocess_image<T, S, S>(
              scores_c.data_ptr<S>(), boxes_c.data_ptr<S>(), boxes.dim() == 3, n_classes, rows[b], group_ptr,
              static_cast<T>(net_hw[2 * b]), static_cast<T>(net_hw[2 * b + 1]), rh, rw, config,
              out_boxes.data_ptr<S>() + b * max_detections * 4, out_scores.data_ptr<S>() + b * max_detections,
              out_labels.data_ptr<int64_t>() + b * max_detections,
              out_candidates.data_ptr<int64_t>() + b * max_detections, out_counts.data_ptr<int64_t>() + b,
              near_miss > 0 ? &nm : nullptr);
        };
        if (as_double) {
          run(double{});
        } else {
          run(float{});
        }
      }
    });
  });
  return join_results(result, misses);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyodlog, CPU, m) {
  m.impl("postprocess_detections", &postprocess_detections_op<postprocess_cpu>);
  m.impl("postprocess_detections_near_miss", &postprocess_detections_near_miss_op<postprocess_cpu>);
}

}  // namespace cpu
}  // namespace pyodlog
