// TIES trim thresholds on the GPU: a radix selection over the bits of |tau|, 11 bits per
// pass from the top (3 passes for float32 keys, 6 for float64), all on the stream.
//
// A pass is one histogram launch over (block, expert): each block counts, in a
// shared-memory histogram of 2,048 bins, the current digit of the keys whose higher
// digits equal the expert's prefix so far, and adds its non-zero bins to the global
// histogram with atomics. A one-thread-per-expert launch then finds the digit holding the
// k-th largest key, appends it to the prefix and keeps the rank left inside it; no host
// synchronization. After the last pass the prefix is the threshold's bit pattern.
// Past 65,535 experts (grid.y's limit) each block walks the experts y, y + gridDim.y, ....
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/dtypes.h"
#include "launchers.h"

namespace fastmerge::cuda {
namespace {

constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr int kThreads = 512;
// Blocks per expert: enough to fill a GPU several times over, few enough global atomics.
constexpr int64_t kMaxBlocksPerExpert = 256;
constexpr int64_t kMaxGridY = 65535;

// |tau|'s bits as an order-preserving unsigned key (the sign bit cleared).
__device__ __forceinline__ uint64_t magnitude_key(float tau) {
  return __float_as_uint(tau) & 0x7fffffffu;
}
__device__ __forceinline__ uint64_t magnitude_key(double tau) {
  return static_cast<uint64_t>(__double_as_longlong(tau)) & 0x7fffffffffffffffull;
}

template <int32_t DT, typename C>
__global__ void __launch_bounds__(kThreads)
    magnitude_histogram_kernel(const void* __restrict__ base,
                               const int64_t* __restrict__ expert_addresses,
                               int64_t num_experts, int64_t n, int shift,
                               const uint64_t* __restrict__ prefix,
                               uint32_t* __restrict__ hist) {
  __shared__ uint32_t counts[kBins];
  for (int64_t t = blockIdx.y; t < num_experts; t += gridDim.y) {
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) counts[i] = 0;
    __syncthreads();
    const void* expert = reinterpret_cast<const void*>(expert_addresses[t]);
    const uint64_t wanted = prefix[t];
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += stride) {
      const C b = static_cast<C>(load_as_double<DT>(base, i));
      const C e = static_cast<C>(load_as_double<DT>(expert, i));
      const uint64_t top = magnitude_key(e - b) >> shift;
      if ((top >> kDigitBits) == wanted) atomicAdd(&counts[top & (kBins - 1)], 1u);
    }
    __syncthreads();
    uint32_t* out = hist + t * kBins;
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
      if (counts[i] != 0) atomicAdd(&out[i], counts[i]);
    }
    __syncthreads();  // the next expert zeroes `counts` only after every thread added it
  }
}

// Every expert starts with an empty prefix and the whole rank k.
__global__ void start_kernel(int64_t num_experts, int64_t k, uint64_t* __restrict__ prefix,
                             int64_t* __restrict__ rank) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= num_experts) return;
  prefix[t] = 0;
  rank[t] = k;
}

// Per expert: the digit holding the rank-th largest key, scanning the bins from the top.
__global__ void select_digit_kernel(const uint32_t* __restrict__ hist, int64_t num_experts,
                                    uint64_t* __restrict__ prefix, int64_t* __restrict__ rank) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= num_experts) return;
  const uint32_t* h = hist + t * kBins;
  int64_t left = rank[t];
  int digit = kBins - 1;
  for (; digit > 0; --digit) {
    if (h[digit] >= left) break;
    left -= h[digit];
  }
  rank[t] = left;
  prefix[t] = (prefix[t] << kDigitBits) | static_cast<uint64_t>(digit);
}

template <typename C>
__global__ void write_threshold_kernel(const uint64_t* __restrict__ prefix, int64_t num_experts,
                                       C* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= num_experts) return;
  if constexpr (sizeof(C) == 4) {
    out[t] = __uint_as_float(static_cast<uint32_t>(prefix[t]));
  } else {
    out[t] = __longlong_as_double(static_cast<long long>(prefix[t]));
  }
}

template <int32_t DT, typename C>
void select(const void* base, const int64_t* expert_addresses, int64_t num_experts, int64_t n,
            int64_t k, void* out, uint32_t* hist, uint64_t* prefix, int64_t* rank,
            cudaStream_t stream) {
  // Digit offsets from the top: float32 keys have 31 bits, float64 keys 63.
  static const int kShifts32[] = {22, 11, 0};
  static const int kShifts64[] = {55, 44, 33, 22, 11, 0};
  const int* shifts = sizeof(C) == 4 ? kShifts32 : kShifts64;
  const int passes = sizeof(C) == 4 ? 3 : 6;
  const int64_t wanted_blocks = (n + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(
      wanted_blocks < kMaxBlocksPerExpert ? wanted_blocks : kMaxBlocksPerExpert);
  const unsigned small = static_cast<unsigned>((num_experts + 127) / 128);
  const unsigned expert_blocks =
      static_cast<unsigned>(num_experts < kMaxGridY ? num_experts : kMaxGridY);
  start_kernel<<<small, 128, 0, stream>>>(num_experts, k, prefix, rank);
  for (int p = 0; p < passes; ++p) {
    check(cudaMemsetAsync(hist, 0, num_experts * kBins * sizeof(uint32_t), stream),
          "memset histogram");
    magnitude_histogram_kernel<DT, C><<<dim3(blocks, expert_blocks), kThreads, 0, stream>>>(
        base, expert_addresses, num_experts, n, shifts[p], prefix, hist);
    select_digit_kernel<<<small, 128, 0, stream>>>(hist, num_experts, prefix, rank);
  }
  write_threshold_kernel<C><<<small, 128, 0, stream>>>(prefix, num_experts, static_cast<C*>(out));
}

}  // namespace

void magnitude_threshold(const void* base, const int64_t* expert_addresses, int64_t num_experts,
                         int64_t n, int32_t dtype, int64_t k, void* out, uint32_t* hist,
                         uint64_t* prefix, int64_t* rank, uintptr_t stream) {
  if (num_experts <= 0 || n <= 0 || k < 1 || k > n) return;
  // The histograms count in 32 bits (the caller allocates them): past 2**32 - 1 entries
  // one bin could wrap, and the selected digit would be wrong without any error.
  if (n > static_cast<int64_t>(UINT32_MAX)) {
    throw std::invalid_argument(
        "magnitude_threshold: " + std::to_string(n) +
        " entries per expert exceed the CUDA kernel's 32-bit histogram counts (at most "
        "4294967295); use the triton backend (64-bit counts) or split the tensor");
  }
  auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, "magnitude_threshold: dtype", [&](auto tag) {
    select<decltype(tag)::code, typename decltype(tag)::compute>(
        base, expert_addresses, num_experts, n, k, out, hist, prefix, rank, s);
  });
  check(cudaGetLastError(), "magnitude_threshold launch");
}

}  // namespace fastmerge::cuda
