#pragma once

#include <cstdint>
#include <vector>

namespace fastmerge::cpu {

// Mean, population std and element count of each contiguous buffer, in float64.
// dtypes holds fastmerge::DType codes. Empty buffers give count 0 and NaN mean/std.
void scope_stats(const std::vector<const void*>& data, const std::vector<int64_t>& numels,
                 const std::vector<int32_t>& dtypes, double* out_mean, double* out_std,
                 double* out_count);

}  // namespace fastmerge::cpu
