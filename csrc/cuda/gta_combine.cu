// The generalized task arithmetic combine on the GPU: one thread per entry, band trim,
// hashed random keep, rescale, weights, sign election and normalization in registers.
//
// With consensus the weighted deltas are needed twice (for the elected sign, then for
// the counted sums). Up to kRegisterExperts experts they stay in registers (an unrolled
// loop over a fixed-size array), so every input is read once; with more experts the
// second pass recomputes them, reading the experts again (from cache), as ties_combine.cu.
//
// Bit for bit the reference (csrc/cpu/gta_combine.h describes the arithmetic): the
// explicit _rn intrinsics keep nvcc from fusing a multiply and an add, and make the
// division correctly rounded whatever the compiler flags.
#include <cuda_runtime.h>

#include "cuda_check.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/dtypes.h"
#include "fastmerge/keep_hash.h"
#include "launchers.h"
#include "rounding.cuh"

namespace fastmerge::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRegisterExperts = 8;

template <typename C>
struct Params {
  const int64_t* expert_addresses;
  const C* weights;  // then lower, upper, scales: T values each
  const int64_t* random;  // nullptr, or 2 x T: key bits, keep_below
  int num_experts;
  int64_t offset;
};

// Expert t's weighted delta at i: w_t * (kept ? tau * s_t : +0).
template <int32_t DT, typename C>
__device__ __forceinline__ C weighted_delta(const Params<C>& p, int t, int64_t i, C b) {
  const int num = p.num_experts;
  const void* expert = reinterpret_cast<const void*>(p.expert_addresses[t]);
  const C tau = sub_rn(static_cast<C>(load_as_double<DT>(expert, i)), b);
  const C mag = fabs(tau);
  bool kept = (mag >= p.weights[num + t]) & (mag <= p.weights[2 * num + t]);
  if (p.random != nullptr) {
    kept = kept & random_keep(static_cast<uint64_t>(p.random[t]),
                              static_cast<uint64_t>(p.offset + i), p.random[num + t]);
  }
  const C d = kept ? mul_rn(tau, p.weights[3 * num + t]) : C(0);
  return mul_rn(p.weights[t], d);
}

// Whether a weighted delta counts under the elected sign of `total`.
template <typename C>
__device__ __forceinline__ bool counted(C total, C wd, bool zero_positive) {
  const bool up = total > C(0) || (zero_positive && total == C(0));
  const bool down = total < C(0) || (zero_positive && total != total);
  return (up && wd > C(0)) || (down && wd < C(0));
}

// REGISTERS: kRegisterExperts (num_experts <= it, deltas kept in registers) or 0.
template <int32_t DT, int32_t OUT, typename C, int REGISTERS>
__global__ void __launch_bounds__(kThreads)
    gta_combine_kernel(const void* __restrict__ base, Params<C> p, int64_t n, bool consensus,
                       bool zero_positive, bool normalize, double lam, void* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const C lam_c = static_cast<C>(lam);
  const int num = p.num_experts;
  C fixed_divisor = C(0);  // without consensus: the sum of the weights, 1 where tiny
  for (int t = 0; t < num; ++t) fixed_divisor = add_rn(fixed_divisor, p.weights[t]);
  if (fabs(fixed_divisor) < static_cast<C>(1e-8)) fixed_divisor = C(1);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const C b = static_cast<C>(load_as_double<DT>(base, i));
    C total = C(0);
    C kept[REGISTERS > 0 ? REGISTERS : 1];
    if constexpr (REGISTERS > 0) {
#pragma unroll
      for (int t = 0; t < REGISTERS; ++t) {
        if (t < num) {
          kept[t] = weighted_delta<DT, C>(p, t, i, b);
          total = add_rn(total, kept[t]);
        }
      }
    } else {
      for (int t = 0; t < num; ++t) total = add_rn(total, weighted_delta<DT, C>(p, t, i, b));
    }
    C mixed = total, divisor = fixed_divisor;
    if (consensus) {
      mixed = C(0);
      divisor = C(0);
      if constexpr (REGISTERS > 0) {
#pragma unroll
        for (int t = 0; t < REGISTERS; ++t) {
          if (t < num && counted(total, kept[t], zero_positive)) {
            mixed = add_rn(mixed, kept[t]);
            divisor = add_rn(divisor, p.weights[t]);
          }
        }
      } else {
        for (int t = 0; t < num; ++t) {
          const C wd = weighted_delta<DT, C>(p, t, i, b);
          if (counted(total, wd, zero_positive)) {
            mixed = add_rn(mixed, wd);
            divisor = add_rn(divisor, p.weights[t]);
          }
        }
      }
      if (divisor == C(0)) divisor = C(1);
    }
    if (normalize) mixed = div_rn(mixed, divisor);
    store_from_double<OUT>(out, i, static_cast<double>(add_rn(b, mul_rn(lam_c, mixed))));
  }
}

template <int32_t DT, int32_t OUT, typename C>
void launch(const void* base, const Params<C>& p, int64_t n, bool consensus, bool zero_positive,
            bool normalize, double lam, void* out, cudaStream_t stream) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < 65535 * 8 ? wanted : 65535 * 8);
  if (consensus && p.num_experts <= kRegisterExperts) {
    gta_combine_kernel<DT, OUT, C, kRegisterExperts><<<blocks, kThreads, 0, stream>>>(
        base, p, n, consensus, zero_positive, normalize, lam, out);
  } else {
    gta_combine_kernel<DT, OUT, C, 0><<<blocks, kThreads, 0, stream>>>(
        base, p, n, consensus, zero_positive, normalize, lam, out);
  }
}

}  // namespace

void gta_combine(const void* base, const int64_t* expert_addresses, int64_t num_experts,
                 int64_t n, int32_t dtype, const void* params, const int64_t* random,
                 int64_t offset, bool consensus, bool drop_zero_sum, bool normalize, double lam,
                 void* out, int32_t out_dtype, uintptr_t stream) {
  if (n <= 0 || num_experts <= 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtypes(dtype, "gta_combine: dtype", out_dtype, "gta_combine: out_dtype",
                  [&](auto in, auto o) {
                    using C = typename decltype(in)::compute;
                    const Params<C> p{expert_addresses, static_cast<const C*>(params), random,
                                      static_cast<int>(num_experts), offset};
                    launch<decltype(in)::code, decltype(o)::code, C>(
                        base, p, n, consensus, !drop_zero_sum, normalize, lam, out, s);
                  });
  check(cudaGetLastError(), "gta_combine launch");
}

}  // namespace fastmerge::cuda
