// Fused backward of scope-based penalties on the GPU: one launch writes
// out_t = alpha_t + beta_t * (x_t - mean_t) for every tensor of the list.
#include <cuda_runtime.h>

#include "cuda_check.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/dtypes.h"
#include "launchers.h"

namespace fastmerge::cuda {
namespace {

constexpr int kThreads = 256;

template <int32_t DT, typename C>
__device__ void affine_chunk(const void* x, void* out, int64_t begin, int64_t length, C mean,
                             C alpha, C beta) {
  for (int64_t i = threadIdx.x; i < length; i += kThreads) {
    const C v = static_cast<C>(load_as_double<DT>(x, begin + i));
    store_from_double<DT>(out, begin + i, static_cast<double>(alpha + beta * (v - mean)));
  }
}

__global__ void __launch_bounds__(kThreads)
    scope_grad_kernel(const int64_t* __restrict__ tensor_table, int64_t num_tensors,
                      const int64_t* __restrict__ chunk_table, int64_t num_chunks,
                      const double* __restrict__ coefficients) {
  const int64_t c = blockIdx.x;
  const int32_t t = static_cast<int32_t>(chunk_table[c]);
  const int64_t begin = chunk_table[num_chunks + c];
  const int64_t length = chunk_table[2 * num_chunks + c];
  const void* x = reinterpret_cast<const void*>(tensor_table[t]);
  void* out = reinterpret_cast<void*>(tensor_table[num_tensors + t]);
  const int32_t dtype = static_cast<int32_t>(tensor_table[2 * num_tensors + t]);
  const double mean = coefficients[t];
  const double alpha = coefficients[num_tensors + t];
  const double beta = coefficients[2 * num_tensors + t];
  // Reduced precisions compute in float32, float64 in double (as on the CPU).
  dispatch_dtype(dtype, "scope_grad: dtype", [&](auto tag) {
    using C = typename decltype(tag)::compute;
    affine_chunk<decltype(tag)::code, C>(x, out, begin, length, mean, alpha, beta);
  });
}

}  // namespace

void scope_grad(const int64_t* tensor_table, int64_t num_tensors, const int64_t* chunk_table,
                int64_t num_chunks, const double* coefficients, uintptr_t stream) {
  if (num_chunks == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  scope_grad_kernel<<<static_cast<unsigned>(num_chunks), kThreads, 0, s>>>(
      tensor_table, num_tensors, chunk_table, num_chunks, coefficients);
  check(cudaGetLastError(), "scope_grad launch");
}

}  // namespace fastmerge::cuda
