// The generalized task arithmetic combine on the CPU: band trim, hashed random keep,
// rescale, weights, sign election and normalization fused into one pass that reads the
// base and the experts once and writes only the output.
//
// Same structure as ties_combine.cpp: entries are processed in blocks; with consensus the
// weighted deltas of every expert for a block sit in a small per-thread buffer
// (T x kBlock), so each step is a simple vectorizable loop over the block. Bit for bit
// the reference: see gta_combine.h for the arithmetic; CMake builds this file with
// -ffp-contract=off so that no multiply-add is fused.
#include "gta_combine.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_loads.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/keep_hash.h"
#include "fastmerge/parallel.h"

namespace fastmerge::cpu {
namespace {

constexpr int64_t kBlock = 512;
// Below this many input elements (base and experts) per thread a second thread does not pay.
constexpr int64_t kMinElementsPerThread = 1 << 18;

// The unsigned integer of a compute type's size: bit masks of the random test.
template <typename C>
using Bits = typename std::conditional<sizeof(C) == 8, uint64_t, uint32_t>::type;

// x where the mask's bits are all set, +0 where they are clear: a bit mask, not a select,
// so that the loops vectorize without AVX-512 mask registers too.
template <typename C>
__attribute__((always_inline)) inline C and_bits(Bits<C> mask, C x) {
  Bits<C> bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits &= mask;
  std::memcpy(&x, &bits, sizeof(bits));
  return x;
}

template <typename C>
__attribute__((always_inline)) inline Bits<C> mask_of(bool c) {
  return Bits<C>(0) - static_cast<Bits<C>>(c);
}

// x where c holds, else +0.
template <typename C>
__attribute__((always_inline)) inline C keep_if(bool c, C x) {
  return and_bits<C>(mask_of<C>(c), x);
}

struct Args {
  const void* base;
  const void* const* experts;
  int64_t num_experts;
  const void* params;     // compute type, 4 x T: weights, lower, upper, scales
  const int64_t* random;  // nullptr, or 2 x T: key bits, keep_below
  int64_t offset;
  bool consensus;
  bool drop_zero_sum;
  bool normalize;
  double lam;
  double divisor;  // without consensus: sum of the weights (1 where tiny), exact in C
  void* out;
};

// One expert over a block: total += w * (kept ? tau * s : 0), and the weighted delta kept
// in `store` when STORE (for the consensus pass).
template <int32_t DT, bool HASHED, bool STORE>
__attribute__((always_inline)) inline void expert_pass(
    const typename Element<DT>::storage* ep, const Compute<DT>* b, int64_t len,
    Compute<DT> w, Compute<DT> lo, Compute<DT> hi, Compute<DT> s,
    const Bits<Compute<DT>>* pass, Compute<DT>* total, Compute<DT>* store) {
  using C = Compute<DT>;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const C tau = load<DT>(ep, j) - b[j];
    const C mag = std::fabs(tau);
    const C product = tau * s;
    C d = keep_if((mag >= lo) & (mag <= hi), product);
    if constexpr (HASHED) d = and_bits<C>(pass[j], d);
    const C wd = w * d;
    total[j] += wd;
    if constexpr (STORE) store[j] = wd;
  }
}

template <int32_t DT, bool HASHED>
__attribute__((always_inline)) inline void expert_pass_for(
    bool store, const typename Element<DT>::storage* ep, const Compute<DT>* b, int64_t len,
    Compute<DT> w, Compute<DT> lo, Compute<DT> hi, Compute<DT> s,
    const Bits<Compute<DT>>* pass, Compute<DT>* total, Compute<DT>* to) {
  if (store) {
    expert_pass<DT, HASHED, true>(ep, b, len, w, lo, hi, s, pass, total, to);
  } else {
    expert_pass<DT, HASHED, false>(ep, b, len, w, lo, hi, s, pass, total, to);
  }
}

// Entries [i0, i1); scratch: num_experts * kBlock compute values (with consensus).
template <int32_t DT, int32_t OUT>
__attribute__((always_inline)) inline void combine_range(const Args& a, int64_t i0, int64_t i1,
                                                         void* scratch) {
  using S = typename Element<DT>::storage;
  using C = Compute<DT>;
  using U = Bits<C>;
  using O = Element<OUT>;
  const int64_t num_experts = a.num_experts;
  const C* weights = static_cast<const C*>(a.params);
  const C* lower = weights + num_experts;
  const C* upper = weights + 2 * num_experts;
  const C* scales = weights + 3 * num_experts;
  const C lam = static_cast<C>(a.lam);
  const C fixed_divisor = static_cast<C>(a.divisor);
  const bool zero_positive = !a.drop_zero_sum;
  C* weighted = static_cast<C*>(scratch);
  C b[kBlock], total[kBlock], mixed[kBlock], divisor[kBlock];
  U pass[kBlock];
  for (int64_t j0 = i0; j0 < i1; j0 += kBlock) {
    const int64_t len = std::min(kBlock, i1 - j0);
    const S* bp = static_cast<const S*>(a.base) + j0;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      b[j] = load<DT>(bp, j);
      total[j] = C(0);
    }
    for (int64_t t = 0; t < num_experts; ++t) {
      const S* ep = static_cast<const S*>(a.experts[t]) + j0;
      C* to = a.consensus ? weighted + t * kBlock : nullptr;
      const bool hashed = a.random != nullptr && a.random[num_experts + t] < kKeepAll;
      if (hashed) {
        const uint64_t key = static_cast<uint64_t>(a.random[t]);
        const int64_t below = a.random[num_experts + t];
        const uint64_t first = static_cast<uint64_t>(a.offset + j0);
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          pass[j] = mask_of<C>(random_keep(key, first + static_cast<uint64_t>(j), below));
        }
        expert_pass_for<DT, true>(a.consensus, ep, b, len, weights[t], lower[t], upper[t],
                                  scales[t], pass, total, to);
      } else {
        expert_pass_for<DT, false>(a.consensus, ep, b, len, weights[t], lower[t], upper[t],
                                   scales[t], pass, total, to);
      }
    }
    const C* sum = total;
    if (a.consensus) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        mixed[j] = C(0);
        divisor[j] = C(0);
      }
      for (int64_t t = 0; t < num_experts; ++t) {
        const C* k = weighted + t * kBlock;
        const C w = weights[t];
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          // bitwise, not short-circuit, logic: a straight vector loop; adding +0 where the
          // expert does not count leaves the sums as they are (they are never -0)
          const C s = total[j];
          const bool up = (s > C(0)) | (zero_positive & (s == C(0)));
          const bool down = (s < C(0)) | (zero_positive & (s != s));
          const bool counted = (up & (k[j] > C(0))) | (down & (k[j] < C(0)));
          mixed[j] += keep_if(counted, k[j]);
          divisor[j] += keep_if(counted, w);
        }
      }
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        divisor[j] += keep_if(divisor[j] == C(0), C(1));  // 0 -> 1, others unchanged
      }
      sum = mixed;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) divisor[j] = fixed_divisor;
    }
    auto* op = static_cast<typename O::storage*>(a.out) + j0;
    if (a.normalize) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const C product = lam * (sum[j] / divisor[j]);
        O::store(op, j, static_cast<typename O::compute>(b[j] + product));
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const C product = lam * sum[j];
        O::store(op, j, static_cast<typename O::compute>(b[j] + product));
      }
    }
  }
}

using CombineFn = void (*)(const Args&, int64_t, int64_t, void*);

template <int32_t DT, int32_t OUT>
FM_CPU_CLONES void combine_clone(const Args& a, int64_t i0, int64_t i1, void* scratch) {
  combine_range<DT, OUT>(a, i0, i1, scratch);
}

// Sum of the weights from 0 in order, in C; 1 where its magnitude is below C(1e-8).
template <typename C>
double weight_sum(const void* params, int64_t num_experts) {
  const C* w = static_cast<const C*>(params);
  C sum = C(0);
  for (int64_t t = 0; t < num_experts; ++t) sum = sum + w[t];
  if (std::fabs(sum) < static_cast<C>(1e-8)) sum = C(1);
  return static_cast<double>(sum);
}

}  // namespace

void gta_combine(const void* base, const std::vector<const void*>& experts, int64_t n,
                 int32_t dtype, const void* params, const int64_t* random, int64_t offset,
                 bool consensus, bool drop_zero_sum, bool normalize, double lam, void* out,
                 int32_t out_dtype) {
  const int64_t num_experts = static_cast<int64_t>(experts.size());
  if (n <= 0 || num_experts == 0) return;
  Args args{base,   experts.data(), num_experts, params, random, offset, consensus,
            drop_zero_sum, normalize, lam, 0.0, out};
  args.divisor = dispatch_dtype(dtype, "gta_combine: dtype", [&](auto in) {
    return weight_sum<typename decltype(in)::compute>(params, num_experts);
  });
  const CombineFn fn = dispatch_dtypes(dtype, "gta_combine: dtype", out_dtype,
                                       "gta_combine: out_dtype",
                                       [](auto in, auto out) -> CombineFn {
                                         return combine_clone<decltype(in)::code,
                                                              decltype(out)::code>;
                                       });
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<int64_t> prefix(blocks + 1);
  for (int64_t i = 0; i <= blocks; ++i) prefix[i] = std::min(i * kBlock, n) * (num_experts + 1);
  const size_t scratch_values = consensus ? static_cast<size_t>(num_experts * kBlock) : 0;
  parallel_ranges(blocks, prefix, kMinElementsPerThread, [&](int64_t first, int64_t last) {
    std::vector<double> scratch(scratch_values);  // aligned for either type
    fn(args, first * kBlock, std::min(last * kBlock, n), scratch.data());
  });
}

}  // namespace fastmerge::cpu
