#pragma once

#include <cstdint>

namespace fastmerge::cpu {

// The nearswap of a and b (n elements each, dtypes fastmerge::DType), in one pass: every
// input is read once and out (n elements of out_dtype) is written once. Per entry, in
// float32, or float64 when `float64` (t and 1e-6 rounded to that type, the inputs
// converted exactly), every step rounded separately (this file is built with
// -ffp-contract=off):
//   d = |a - b|; d = d < 1e-6 ? 1e-6 : d; w = t / d; w = w < 0 ? 0 : w; w = w > 1 ? 1 : w;
//   out = (w * b) + ((1 - w) * a), rounded to out_dtype once (half types via float32).
// A NaN passes through every comparison. out may be a or b (same dtype, same address).
// Parallel over equal ranges of n with the thread pool; the result does not depend on the
// thread count.
void nearswap(const void* a, int32_t a_dtype, const void* b, int32_t b_dtype, double t,
              int64_t n, bool float64, void* out, int32_t out_dtype);

}  // namespace fastmerge::cpu
