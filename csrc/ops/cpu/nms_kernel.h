#pragma once
#include <cstdint>
#include <vector>

namespace pyodlog {
namespace cpu {

// A permutation of [0, n) grouping equal categories together (index order kept
// inside a group); bucket_starts receives each group's first position and n.
std::vector<int64_t> bucket_by_category(const int64_t* category, int64_t n, std::vector<int64_t>& bucket_starts);

}  // namespace cpu
}  // namespace pyodlog
