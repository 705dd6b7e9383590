#pragma once

#include <cstdint>
#include <vector>

namespace fastmerge::cpu {

// SCE's fused passes over one tensor: tau_t = experts[t][i] - base[i] in the compute type
// C (float32; float64 for kFloat64 inputs). Every operation is rounded on its own (this
// file is built with -ffp-contract=off) and sums over t run in order from +0, so the
// results are bit for bit the reference's (the float64 energies agree to float64
// rounding). base, experts: contiguous n elements of `dtype`. Parallel over blocks of
// entries with the thread pool; nothing depends on the thread count.

// var[i] = (sum_t (tau_t - mean)^2) / T, mean = (sum_t tau_t) / T; var: n values of C.
void sce_variance(const void* base, const std::vector<const void*>& experts, int64_t n,
                  int32_t dtype, void* var);

// sums[t] = sum_i kept_t[i]^2 in float64, kept_t = tau_t where var >= threshold (threshold:
// one C value; every entry when `select` is false), +0 elsewhere.
void sce_energies(const void* base, const std::vector<const void*>& experts, int64_t n,
                  int32_t dtype, bool select, const void* threshold, double* sums);

// out[i] = base[i] + (sum_t w_t m_t kept_t) / max(sum_t w_t m_t, 1e-6), m_t: kept_t > 0
// where sum_t kept_t >= 0, kept_t < 0 elsewhere; weights: T values of C; out: n elements
// of out_dtype.
void sce_combine(const void* base, const std::vector<const void*>& experts, int64_t n,
                 int32_t dtype, bool select, const void* threshold, const void* weights,
                 void* out, int32_t out_dtype);

}  // namespace fastmerge::cpu
