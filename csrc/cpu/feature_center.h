#pragma once

#include <cstdint>

namespace fastmerge::cpu {

// The prologue of FeatureStats: out[r, j] = x[r, j] - shift[j], computed and stored in
// out_dtype (kFloat32 or kFloat64; the shift is rounded to it first), and the float64
// column sums of what was stored: sums[j] = sum_r out[r, j], sums[cols + j] =
// sum_r out[r, j]^2. x: rows x cols of dtype (fastmerge::DType), row stride x_row_stride
// elements, columns contiguous; out: row stride out_row_stride. Parallel over blocks of
// rows whose partial sums are added in block order, so the sums do not depend on the
// thread count.
void feature_center(const void* x, int32_t dtype, int64_t rows, int64_t cols,
                    int64_t x_row_stride, const double* shift, void* out, int32_t out_dtype,
                    int64_t out_row_stride, double* sums);

}  // namespace fastmerge::cpu
