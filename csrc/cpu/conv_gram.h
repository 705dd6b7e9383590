#pragma once

#include <cstdint>

#include "fastmerge/conv_gram.h"

namespace fastmerge::cpu {

// Upper triangle of Z = B^T B for the combined matrix B = [patches | y] of a convolution
// (fastmerge/conv_gram.h), without materializing the patches: out is float64 rows
// features() x columns() (row-major), and out[i, t] for t >= i holds sum_m B[m, i] B[m, t]
// (entries below the diagonal are unspecified). x: (n, c_in, h, w) and y: (n, c_out,
// h_out, w_out), contiguous, both of `dtype` (kFloat32 or kFloat64); products are summed in
// float64. Parallel over blocks of rows of `out`; each thread gathers its own tiles of
// samples, so the result does not depend on the thread count.
void conv_gram(const void* x, const void* y, int32_t dtype, const ConvGeometry& geometry,
               double* out);

}  // namespace fastmerge::cpu
