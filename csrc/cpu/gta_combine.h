#pragma once

#include <cstdint>
#include <vector>

namespace fastmerge::cpu {

// Generalized task arithmetic of one tensor in one pass (fastmerge.ops.gta_combine).
// Per entry i, with C the compute type (float32, float64 for kFloat64 inputs) and every
// operation rounded to C (this file is built with -ffp-contract=off):
//   tau_t = experts[t][i] - base[i]
//   kept_t = |tau_t| >= lower[t] && |tau_t| <= upper[t] && random_keep_t(offset + i)
//   wd_t = weights[t] * (kept_t ? tau_t * scales[t] : +0)
//   total = sum_t wd_t (from +0, t = 0..T-1 in order)
// consensus: up = total > 0 || (!drop_zero_sum && total == 0), down = total < 0 ||
//   (!drop_zero_sum && total is NaN); wd_t counts where (up && wd_t > 0) || (down &&
//   wd_t < 0); mixed = sum of counted wd_t, divisor = sum of counted weights[t] (1 where 0).
// else: mixed = total, divisor = sum_t weights[t] (1 where |divisor| < C(1e-8)).
//   out[i] = base[i] + lam * (normalize ? mixed / divisor : mixed), in out_dtype.
// base, experts: contiguous n elements of `dtype`; params: C, 4 x T rows (weights, lower,
// upper, scales); random: nullptr (no random test), or int64 2 x T rows (key_t as bits,
// keep_below_t; see fastmerge/keep_hash.h); out: n elements of `out_dtype`.
void gta_combine(const void* base, const std::vector<const void*>& experts, int64_t n,
                 int32_t dtype, const void* params, const int64_t* random, int64_t offset,
                 bool consensus, bool drop_zero_sum, bool normalize, double lam, void* out,
                 int32_t out_dtype);

}  // namespace fastmerge::cpu
