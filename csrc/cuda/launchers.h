// Host-side entry points of the CUDA kernels (plain C++; no CUDA or torch types), so
// the pybind11 module compiles with the host compiler. Pointers are device pointers;
// `stream` is a cudaStream_t passed as an integer (0 = the legacy default stream).
#pragma once

#include <cstdint>

namespace fastmerge::cuda {

// Tensor table (int64, 4 x T rows): address, dtype code, numel, first chunk index.
// Chunk table (int64, 3 x C rows): tensor index, begin, length.
// partials: float64 C x 3 scratch; counters: uint32 T, zeroed by the caller.
// out: float64 3 x T (mean, std, count); rows 0 and 1 are written for non-empty tensors.
void scope_stats(const int64_t* tensor_table, int64_t num_tensors, const int64_t* chunk_table,
                 int64_t num_chunks, int64_t chunk_size, double* partials, uint32_t* counters,
                 double* out, uintptr_t stream);

// out_t = alpha_t + beta_t * (x_t - mean_t). Tensor table (int64, 4 x T rows): input
// address, output address, dtype code, unused; coefficients: float64 3 x T (mean, alpha, beta).
void scope_grad(const int64_t* tensor_table, int64_t num_tensors, const int64_t* chunk_table,
                int64_t num_chunks, const double* coefficients, uintptr_t stream);

// Solves `batch` oriented problems (rows <= cols, minimize) of float64 costs. Workspaces
// per problem: dual float64 (rows + 3 cols), index_work int64 (2 cols), flags uint8
// (rows). col4row: int64 (batch, rows) output; status: int32 (batch,), 0 solved,
// 1 infeasible.
void linear_assignment(const double* cost, int64_t batch, int64_t rows, int64_t cols,
                       double* dual, int64_t* index_work, uint8_t* flags, int64_t* col4row,
                       int32_t* status, uintptr_t stream);

// FeatureStats prologue: out = x - shift in out_dtype (kFloat32/kFloat64), x: rows x cols
// of dtype with row stride x_row_stride (columns contiguous), out: row stride
// out_row_stride. The rows are cut into `splits` ranges; partials: float64
// (splits, 2, cols), each split's column sums of out and of out^2.
void feature_center(const void* x, int32_t dtype, int64_t rows, int64_t cols,
                    int64_t x_row_stride, const double* shift, void* out, int32_t out_dtype,
                    int64_t out_row_stride, int64_t splits, double* partials, uintptr_t stream);

// Feature-matching cost `kind` (fastmerge::FeatureCostKind) of every (row, col) unit pair
// from float64 shifted moments of `count` samples; out: float64 rows x cols.
void feature_cost(const double* cross, int64_t rows, int64_t cols, const double* sum_a,
                  const double* sum_b, const double* sumsq_a, const double* sumsq_b,
                  const double* shift_a, const double* shift_b, double count, int32_t kind,
                  double* out, uintptr_t stream);

// Upper triangle of Z = B^T B, B = [patches | y] of a convolution (fastmerge/conv_gram.h),
// without materializing the patches; x, y: contiguous device buffers of dtype
// (kFloat32/kFloat64); geometry: HOST array of the 16 ConvGeometry fields; out: float64
// features x columns, zeroed and then summed into (entries below the diagonal unspecified).
void conv_gram(const void* x, const void* y, int32_t dtype, const int64_t* geometry,
               double* out, uintptr_t stream);

int device_count();

}  // namespace fastmerge::cuda
