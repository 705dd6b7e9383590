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

int device_count();

}  // namespace fastmerge::cuda
