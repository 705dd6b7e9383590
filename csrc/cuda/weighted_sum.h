// Host-side entry point of the CUDA weighted sum (plain C++, like launchers.h, so that
// the pybind11 module compiles with the host compiler).
#pragma once

#include <cstdint>

namespace fastmerge::cuda {

// out[i] = sum_t w_t * x_t[i] for i < n (see csrc/cpu/weighted_sum.h for the arithmetic).
// table: device int64 (3, count): row 0 the inputs' data pointers, row 1 their dtype
// codes, row 2 the weights as the bits of float64 values. Accumulated in float32, or
// float64 when `float64`; out: n elements of out_dtype (may be one of the inputs).
void weighted_sum(const int64_t* table, int64_t count, int64_t n, bool float64, void* out,
                  int32_t out_dtype, uintptr_t stream);

}  // namespace fastmerge::cuda
