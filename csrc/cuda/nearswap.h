// Host-side entry point of the CUDA nearswap (plain C++, like launchers.h, so that the
// pybind11 module compiles with the host compiler).
#pragma once

#include <cstdint>

namespace fastmerge::cuda {

// out[i] = w * b[i] + (1 - w) * a[i], w = clamp(t / max(|a[i] - b[i]|, 1e-6), 0, 1), for
// i < n (see csrc/cpu/nearswap.h for the arithmetic). a, b: device pointers of dtype codes
// a_dtype, b_dtype; in float32, or float64 when `float64`; out: n elements of out_dtype
// (may be a or b).
void nearswap(const void* a, int32_t a_dtype, const void* b, int32_t b_dtype, double t,
              int64_t n, bool float64, void* out, int32_t out_dtype, uintptr_t stream);

}  // namespace fastmerge::cuda
