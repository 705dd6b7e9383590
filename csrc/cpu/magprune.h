#pragma once

#include <cstdint>

namespace fastmerge::cpu {

// DELLA's MAGPRUNE of tau = expert - base (n elements each, dtypes fastmerge::DType), in
// one pass: rows of `width` entries at stride `inner` (n = outer * width * inner; row
// (i, k) holds entries i * width * inner + j * inner + k, j < width). Per row the entry of
// ascending |tau| rank r (ties by j, every NaN above +inf, -0 == +0) at flat index e is
// kept iff (mix64(key + (offset + e + 1) * kGolden) >> 11) < below + r * step
// (fastmerge/keep_hash.h). out (n elements of out_dtype) gets the kept tau, +0 elsewhere;
// norms[0] = sum |tau|, norms[1] = sum of the kept |tau| (float64: per row in a fixed
// order, then the rows in order). tau in float32, or float64 when `float64`. out may be
// base or expert (same dtype, same address). Parallel over rows with the thread pool; the
// result does not depend on the thread count. width < 2^31.
void magprune(const void* base, int32_t base_dtype, const void* expert, int32_t expert_dtype,
              int64_t n, int64_t width, int64_t inner, bool float64, int64_t key,
              int64_t below, int64_t step, int64_t offset, void* out, int32_t out_dtype,
              double* norms);

}  // namespace fastmerge::cpu
