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

// The gated low-rank part of lowrank_mixture. x: rows x d_in, contiguous, of dtype; us
// (tasks, d_out, rank), vs (tasks, rank, d_in), gates (rows / tokens, tasks): contiguous,
// of dtype. down: scratch rows x (tasks * rank); y: rows x d_out holding x W^T + b; both
// float, or double for kFloat64. Writes down[m, t r + k] = g[m / tokens, t] (x[m] . vs[t, k])
// and adds down U_all^T to y, skipping (row tile, task) pairs whose gates are all zero.
void lowrank_mixture(const void* x, int32_t dtype, int64_t rows, int64_t d_in, int64_t d_out,
                     int64_t tasks, int64_t rank, int64_t tokens, const void* us, const void* vs,
                     const void* gates, void* down, void* y, uintptr_t stream);

// TIES trim thresholds: out[t] = k-th largest |expert_t - base| (float32, float64 for
// kFloat64 inputs). expert_addresses: device int64 (T,) of data pointers; inputs: n
// contiguous elements of dtype; workspaces: hist uint32 (T, 2048), prefix uint64 (T),
// rank int64 (T).
void magnitude_threshold(const void* base, const int64_t* expert_addresses, int64_t num_experts,
                         int64_t n, int32_t dtype, int64_t k, void* out, uint32_t* hist,
                         uint64_t* prefix, int64_t* rank, uintptr_t stream);

// TIES combine of one tensor (see csrc/cpu/ties_combine.h): thresholds in the compute
// type (float32, float64 for kFloat64 inputs), out: n elements of out_dtype.
void ties_combine(const void* base, const int64_t* expert_addresses, int64_t num_experts,
                  int64_t n, int32_t dtype, const void* thresholds, double scale, void* out,
                  int32_t out_dtype, uintptr_t stream);

// Generalized task arithmetic of one tensor (see csrc/cpu/gta_combine.h): params in the
// compute type (float32, float64 for kFloat64 inputs), 4 x T rows (weights, lower, upper,
// scales); random: nullptr or int64 2 x T rows (key bits, keep_below); all device
// pointers; out: n elements of out_dtype.
void gta_combine(const void* base, const int64_t* expert_addresses, int64_t num_experts,
                 int64_t n, int32_t dtype, const void* params, const int64_t* random,
                 int64_t offset, bool consensus, bool drop_zero_sum, bool normalize, double lam,
                 void* out, int32_t out_dtype, uintptr_t stream);

int device_count();

// CUDA versions as 1000 * major + 10 * minor: the toolkit the module was built with, and
// the newest the installed driver supports (0 when there is no driver). See version.cpp.
int runtime_version();
int driver_version();

}  // namespace fastmerge::cuda
