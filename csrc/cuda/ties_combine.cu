// The TIES combine on the GPU: one thread per entry, trim, sign election and disjoint
// mean in registers. The number of experts is a runtime value, so the experts are read
// twice per entry: once for the elected sign, once (from cache) for the agreeing mean.
//
// Bit for bit the reference (csrc/cpu/ties_combine.h describes the arithmetic): the
// explicit _rn intrinsics keep nvcc from fusing the multiply and the add, and make the
// division correctly rounded whatever the compiler flags.
#include <cuda_runtime.h>

#include "cuda_check.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/dtypes.h"
#include "launchers.h"
#include "rounding.cuh"

namespace fastmerge::cuda {
namespace {

constexpr int kThreads = 256;

// Expert t's tau at i where |tau| >= its threshold, else 0.
template <int32_t DT, typename C>
__device__ __forceinline__ C trimmed(const int64_t* expert_addresses, const C* thresholds, int t,
                                     int64_t i, C b) {
  const void* expert = reinterpret_cast<const void*>(expert_addresses[t]);
  const C tau = sub_rn(static_cast<C>(load_as_double<DT>(expert, i)), b);
  return fabs(tau) >= thresholds[t] ? tau : C(0);
}

template <int32_t DT, int32_t OUT, typename C>
__global__ void __launch_bounds__(kThreads)
    ties_combine_kernel(const void* __restrict__ base,
                        const int64_t* __restrict__ expert_addresses, int num_experts, int64_t n,
                        const C* __restrict__ thresholds, double scale, void* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const C sc = static_cast<C>(scale);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const C b = static_cast<C>(load_as_double<DT>(base, i));
    C total = C(0);
    for (int t = 0; t < num_experts; ++t) {
      total = add_rn(total, trimmed<DT, C>(expert_addresses, thresholds, t, i, b));
    }
    C sum = C(0), count = C(0);
    for (int t = 0; t < num_experts; ++t) {
      const C kept = trimmed<DT, C>(expert_addresses, thresholds, t, i, b);
      const bool agrees = total > C(0) ? kept > C(0) : (total < C(0) && kept < C(0));
      sum = add_rn(sum, agrees ? kept : C(0));
      count = add_rn(count, agrees ? C(1) : C(0));
    }
    const C mean = count > C(0) ? div_rn(sum, count) : C(0);
    store_from_double<OUT>(out, i, static_cast<double>(add_rn(b, mul_rn(sc, mean))));
  }
}

template <int32_t DT, int32_t OUT, typename C>
void launch(const void* base, const int64_t* expert_addresses, int64_t num_experts, int64_t n,
            const void* thresholds, double scale, void* out, cudaStream_t stream) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < 65535 * 8 ? wanted : 65535 * 8);
  ties_combine_kernel<DT, OUT, C><<<blocks, kThreads, 0, stream>>>(
      base, expert_addresses, static_cast<int>(num_experts), n,
      static_cast<const C*>(thresholds), scale, out);
}

}  // namespace

void ties_combine(const void* base, const int64_t* expert_addresses, int64_t num_experts,
                  int64_t n, int32_t dtype, const void* thresholds, double scale, void* out,
                  int32_t out_dtype, uintptr_t stream) {
  if (n <= 0 || num_experts <= 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtypes(dtype, "ties_combine: dtype", out_dtype, "ties_combine: out_dtype",
                  [&](auto in, auto o) {
                    launch<decltype(in)::code, decltype(o)::code, typename decltype(in)::compute>(
                        base, expert_addresses, num_experts, n, thresholds, scale, out, s);
                  });
  check(cudaGetLastError(), "ties_combine launch");
}

}  // namespace fastmerge::cuda
