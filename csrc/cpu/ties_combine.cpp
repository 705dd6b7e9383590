// The TIES combine on the CPU: trim, sign election and disjoint mean fused into one pass
// that reads the base and the experts once and writes only the output.
//
// Entries are processed in blocks: the trimmed tau of every expert for a block sits in a
// small per-thread buffer (T x kBlock), so each step is a simple vectorizable loop over
// the block. Bit-for-bit the reference: see ties_combine.h for the arithmetic; CMake
// builds this file with -ffp-contract=off so that no multiply-add is fused.
#include "ties_combine.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_loads.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/parallel.h"

namespace fastmerge::cpu {
namespace {

constexpr int64_t kBlock = 512;
// Below this many input elements (base and experts) per thread a second thread does not pay.
constexpr int64_t kMinElementsPerThread = 1 << 18;

// x where c holds, else +0: a bit mask, not a select or a bool-to-float conversion, so
// that compilers vectorize it without AVX-512 mask registers too (no branch per entry).
template <typename C>
__attribute__((always_inline)) inline C keep_if(bool c, C x) {
  using U = typename std::conditional<sizeof(C) == 8, uint64_t, uint32_t>::type;
  U bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits &= U(0) - static_cast<U>(c);
  std::memcpy(&x, &bits, sizeof(bits));
  return x;
}

// Entries [i0, i1); kept: scratch of num_experts * kBlock compute values.
template <int32_t DT, int32_t OUT>
__attribute__((always_inline)) inline void combine_range(
    const void* base, const void* const* experts, int64_t num_experts, int64_t i0, int64_t i1,
    const void* thresholds, double scale, void* out, void* scratch) {
  using E = Element<DT>;
  using S = typename E::storage;
  using C = Compute<DT>;
  using O = Element<OUT>;
  const C* thr = static_cast<const C*>(thresholds);
  const C sc = static_cast<C>(scale);
  C* kept = static_cast<C*>(scratch);
  C b[kBlock], total[kBlock], sum[kBlock], count[kBlock];
  for (int64_t j0 = i0; j0 < i1; j0 += kBlock) {
    const int64_t len = std::min(kBlock, i1 - j0);
    const S* bp = static_cast<const S*>(base) + j0;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      b[j] = load<DT>(bp, j);
      total[j] = C(0);
    }
    for (int64_t t = 0; t < num_experts; ++t) {
      const S* ep = static_cast<const S*>(experts[t]) + j0;
      const C h = thr[t];
      C* k = kept + t * kBlock;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const C tau = load<DT>(ep, j) - b[j];
        const C kj = keep_if(std::fabs(tau) >= h, tau);
        k[j] = kj;
        total[j] += kj;
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      sum[j] = C(0);
      count[j] = C(0);
    }
    for (int64_t t = 0; t < num_experts; ++t) {
      const C* k = kept + t * kBlock;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        // bitwise, not short-circuit, logic: a straight vector loop; adding +0 where the
        // expert does not agree leaves the sum as it is (it is never -0)
        const bool agrees = (total[j] > C(0) & k[j] > C(0)) | (total[j] < C(0) & k[j] < C(0));
        sum[j] += keep_if(agrees, k[j]);
        count[j] += keep_if(agrees, C(1));
      }
    }
    auto* op = static_cast<typename O::storage*>(out) + j0;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      // count 0: the sum is +0 and so is the mean, as in the reference
      const C mean = sum[j] / (count[j] + keep_if(count[j] == C(0), C(1)));
      const C product = sc * mean;
      O::store(op, j, static_cast<typename O::compute>(b[j] + product));
    }
  }
}

using CombineFn = void (*)(const void*, const void* const*, int64_t, int64_t, int64_t,
                           const void*, double, void*, void*);

template <int32_t DT, int32_t OUT>
FM_CPU_CLONES void combine_clone(const void* base, const void* const* experts, int64_t t,
                                 int64_t i0, int64_t i1, const void* thr, double scale, void* out,
                                 void* scratch) {
  combine_range<DT, OUT>(base, experts, t, i0, i1, thr, scale, out, scratch);
}

CombineFn combine_for(int32_t dtype, int32_t out_dtype) {
  return dispatch_dtypes(dtype, "ties_combine: dtype", out_dtype, "ties_combine: out_dtype",
                         [](auto in, auto out) -> CombineFn {
                           return combine_clone<decltype(in)::code, decltype(out)::code>;
                         });
}

}  // namespace

void ties_combine(const void* base, const std::vector<const void*>& experts, int64_t n,
                  int32_t dtype, const void* thresholds, double scale, void* out,
                  int32_t out_dtype) {
  const int64_t num_experts = static_cast<int64_t>(experts.size());
  if (n <= 0 || num_experts == 0) return;
  const CombineFn fn = combine_for(dtype, out_dtype);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<int64_t> prefix(blocks + 1);
  for (int64_t i = 0; i <= blocks; ++i) prefix[i] = std::min(i * kBlock, n) * (num_experts + 1);
  const size_t scratch_bytes = static_cast<size_t>(num_experts * kBlock) * sizeof(double);
  parallel_ranges(blocks, prefix, kMinElementsPerThread, [&](int64_t first, int64_t last) {
    std::vector<double> scratch(scratch_bytes / sizeof(double));  // aligned for either type
    fn(base, experts.data(), num_experts, first * kBlock, std::min(last * kBlock, n), thresholds,
       scale, out, scratch.data());
  });
}

}  // namespace fastmerge::cpu
