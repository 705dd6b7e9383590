// Fused weight-scope statistics on the GPU: one launch for a whole tensor list.
//
// One block per chunk (apex multi_tensor_apply style). Each block reduces its chunk to
// shifted sums in double, writes (count, mean, M2) to a scratch row, and bumps its
// tensor's counter; the block that finishes a tensor last merges that tensor's chunk
// partials (threadfence-reduction pattern), so no second launch is needed.
#include <cuda_runtime.h>

#include "cuda_check.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/dtypes.h"
#include "fastmerge/moments.h"
#include "launchers.h"

namespace fastmerge::cuda {
namespace {

constexpr int kThreads = 256;

template <int32_t DT>
__device__ void shifted_sums(const void* data, int64_t begin, int64_t length, double shift,
                             double& s1, double& s2) {
  for (int64_t i = threadIdx.x; i < length; i += kThreads) {
    const double d = load_as_double<DT>(data, begin + i) - shift;
    s1 += d;
    s2 += d * d;
  }
}

__device__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block; the result is valid in thread 0.
__device__ double block_sum(double v, double* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? scratch[threadIdx.x] : 0.0;
  if (warp == 0) v = warp_sum(v);
  __syncthreads();
  return v;
}

// Chan-merge of the block's per-thread moments; the result is valid in thread 0.
__device__ Moments block_merge(Moments m, Moments* scratch) {
  scratch[threadIdx.x] = m;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      scratch[threadIdx.x] = chan_merge(scratch[threadIdx.x], scratch[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  return scratch[0];
}

__global__ void __launch_bounds__(kThreads)
    scope_stats_kernel(const int64_t* __restrict__ tensor_table, int64_t num_tensors,
                       const int64_t* __restrict__ chunk_table, int64_t num_chunks,
                       int64_t chunk_size, double* partials, uint32_t* counters, double* out) {
  __shared__ double sum_scratch[kThreads / 32];
  __shared__ Moments merge_scratch[kThreads];
  __shared__ bool finishes_tensor;

  const int64_t c = blockIdx.x;
  const int32_t t = static_cast<int32_t>(chunk_table[c]);
  const int64_t begin = chunk_table[num_chunks + c];
  const int64_t length = chunk_table[2 * num_chunks + c];
  const void* data = reinterpret_cast<const void*>(tensor_table[t]);
  const int32_t dtype = static_cast<int32_t>(tensor_table[num_tensors + t]);
  const int64_t numel = tensor_table[2 * num_tensors + t];
  const int64_t first_chunk = tensor_table[3 * num_tensors + t];

  const double shift = load_any<double>(data, dtype, begin);
  double s1 = 0.0, s2 = 0.0;
  dispatch_dtype(dtype, "scope_stats: dtype", [&](auto tag) {
    shifted_sums<decltype(tag)::code>(data, begin, length, shift, s1, s2);
  });
  s1 = block_sum(s1, sum_scratch);
  s2 = block_sum(s2, sum_scratch);

  const int64_t tensor_chunks = (numel + chunk_size - 1) / chunk_size;
  if (threadIdx.x == 0) {
    const Moments m = moments_from_shifted_sums(static_cast<double>(length), shift, s1, s2);
    partials[3 * c] = m.count;
    partials[3 * c + 1] = m.mean;
    partials[3 * c + 2] = m.m2;
    __threadfence();  // make the partial visible before counting this chunk as done
    const uint32_t done = atomicAdd(&counters[t], 1u) + 1u;
    finishes_tensor = (done == static_cast<uint32_t>(tensor_chunks));
  }
  __syncthreads();
  if (!finishes_tensor) return;

  __threadfence();
  Moments m{0.0, NAN, NAN};
  for (int64_t k = threadIdx.x; k < tensor_chunks; k += kThreads) {
    const volatile double* row = partials + 3 * (first_chunk + k);  // bypass stale L1 lines
    m = chan_merge(m, Moments{row[0], row[1], row[2]});
  }
  m = block_merge(m, merge_scratch);
  if (threadIdx.x == 0) {
    out[t] = m.mean;
    out[num_tensors + t] = population_std(m);
  }
}

}  // namespace

void scope_stats(const int64_t* tensor_table, int64_t num_tensors, const int64_t* chunk_table,
                 int64_t num_chunks, int64_t chunk_size, double* partials, uint32_t* counters,
                 double* out, uintptr_t stream) {
  if (num_chunks == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  scope_stats_kernel<<<static_cast<unsigned>(num_chunks), kThreads, 0, s>>>(
      tensor_table, num_tensors, chunk_table, num_chunks, chunk_size, partials, counters, out);
  check(cudaGetLastError(), "scope_stats launch");
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

}  // namespace fastmerge::cuda
