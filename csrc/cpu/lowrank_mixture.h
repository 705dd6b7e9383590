#pragma once

#include <cstdint>

#include "fastmerge/dtypes.h"

namespace fastmerge::cpu {

// The gating step of the routed low-rank mixture, in place on the down-projection
// z = x V_all^T: z[m, t * rank + k] *= gates[(m / tokens) * gate_row_stride + t] for
// m < rows, t < tasks, k < rank. z: rows x (tasks * rank) of dtype (kFloat32/kFloat64;
// the op computes half inputs in float32), row stride z_row_stride elements, columns
// contiguous; gates: the same dtype, one row per sample of `tokens` consecutive rows,
// columns contiguous. Parallel over rows.
void lowrank_gate_scale(void* z, int32_t dtype, int64_t rows, int64_t tasks, int64_t rank,
                        int64_t z_row_stride, const void* gates, int64_t gate_row_stride,
                        int64_t tokens);

// The gather and scatter of the routed (top-k) path, by blocks of `tokens` rows (one
// sample's tokens) of `cols` contiguous elements of dtype (kFloat32/kFloat64):
//   gather:      dst[b * tokens + i] = src[index[b] * tokens + i]
//   scatter-add: dst[index[b] * tokens + i] += src[b * tokens + i]
// for b < count, i < tokens; row strides in elements. The indices of a scatter-add must be
// distinct (each task holds a sample once), so blocks are added in parallel.
void lowrank_gather_rows(void* dst, int64_t dst_row_stride, const void* src,
                         int64_t src_row_stride, const int64_t* index, int64_t count,
                         int64_t tokens, int64_t cols, int32_t dtype);
void lowrank_scatter_add_rows(void* dst, int64_t dst_row_stride, const void* src,
                              int64_t src_row_stride, const int64_t* index, int64_t count,
                              int64_t tokens, int64_t cols, int32_t dtype);

}  // namespace fastmerge::cpu
