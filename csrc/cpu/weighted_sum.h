#pragma once

#include <cstdint>
#include <vector>

namespace fastmerge::cpu {

// out[i] = sum_t weights[t] * inputs[t][i] for i < n, in one pass: every input is read
// once (each in its own dtype, fastmerge::DType) and out is written once (n elements of
// out_dtype). Accumulated in float32, or float64 when `float64`; weights are rounded to
// that type; the sum starts from w_0 * x_0 and adds w_t * x_t for t = 1, 2, ... in order,
// products and sums rounded separately (this file is built with -ffp-contract=off).
// out may be one of the inputs (same dtype, same address). Parallel over equal ranges of
// n with the thread pool; the result does not depend on the thread count.
void weighted_sum(const std::vector<const void*>& inputs, const std::vector<int32_t>& dtypes,
                  const std::vector<double>& weights, int64_t n, bool float64, void* out,
                  int32_t out_dtype);

}  // namespace fastmerge::cpu
