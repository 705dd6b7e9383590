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

#define FM_COMBINE_CLONE(NAME, DT, OUT)                                                       \
  FM_CPU_CLONES void NAME(const void* base, const void* const* experts, int64_t t,           \
                          int64_t i0, int64_t i1, const void* thr, double scale, void* out,  \
                          void* scratch) {                                                    \
    combine_range<DT, OUT>(base, experts, t, i0, i1, thr, scale, out, scratch);              \
  }
#define FM_COMBINE_CLONES(SUFFIX, DT)                        \
  FM_COMBINE_CLONE(combine_##SUFFIX##_f16, DT, kFloat16)     \
  FM_COMBINE_CLONE(combine_##SUFFIX##_bf16, DT, kBFloat16)   \
  FM_COMBINE_CLONE(combine_##SUFFIX##_f32, DT, kFloat32)     \
  FM_COMBINE_CLONE(combine_##SUFFIX##_f64, DT, kFloat64)
FM_COMBINE_CLONES(f16, kFloat16)
FM_COMBINE_CLONES(bf16, kBFloat16)
FM_COMBINE_CLONES(f32, kFloat32)
FM_COMBINE_CLONES(f64, kFloat64)
#undef FM_COMBINE_CLONES
#undef FM_COMBINE_CLONE

CombineFn combine_for(int32_t dtype, int32_t out_dtype) {
  static const CombineFn table[4][4] = {
      {combine_f16_f16, combine_f16_bf16, combine_f16_f32, combine_f16_f64},
      {combine_bf16_f16, combine_bf16_bf16, combine_bf16_f32, combine_bf16_f64},
      {combine_f32_f16, combine_f32_bf16, combine_f32_f32, combine_f32_f64},
      {combine_f64_f16, combine_f64_bf16, combine_f64_f32, combine_f64_f64},
  };
  return table[dtype][out_dtype];
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
