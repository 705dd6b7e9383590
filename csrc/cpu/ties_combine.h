#pragma once

#include <cstdint>
#include <vector>

namespace fastmerge::cpu {

// The TIES merge of one tensor in one pass: per entry i, tau_t = experts[t][i] - base[i],
// kept_t = |tau_t| >= thresholds[t] ? tau_t : 0, s = sum_t kept_t, and out[i] =
// base[i] + scale * mean of the kept_t with the sign of s (0 where none, or s == 0).
// Compute type float32 (float64 for kFloat64 inputs); sums over t in order from 0;
// mean = sum / count; the multiply and add rounded separately (this file is built with
// -ffp-contract=off). base, experts: contiguous n elements of `dtype`; thresholds:
// the compute type, one per expert; out: n elements of `out_dtype`.
void ties_combine(const void* base, const std::vector<const void*>& experts, int64_t n,
                  int32_t dtype, const void* thresholds, double scale, void* out,
                  int32_t out_dtype);

}  // namespace fastmerge::cpu
