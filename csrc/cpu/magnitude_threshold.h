#pragma once

#include <cstdint>
#include <vector>

namespace fastmerge::cpu {

// The TIES trim threshold of one tensor for every expert: out[t] = the k-th largest
// |experts[t][i] - base[i]| over i < n, with tau formed in float32 (float64 for kFloat64
// inputs). base and every expert: contiguous buffers of n elements of `dtype`
// (fastmerge::DType); out: float32 (float64 for kFloat64) of experts.size() entries;
// 1 <= k <= n. Exact: a histogram pass over the top bits of |tau| picks each expert's
// bin, a second pass gathers that bin's keys, and nth_element picks among them. Parallel
// over equal ranges of n with the thread pool; the result does not depend on it.
void magnitude_threshold(const void* base, const std::vector<const void*>& experts, int64_t n,
                         int32_t dtype, int64_t k, void* out);

}  // namespace fastmerge::cpu
