// SCE's passes on the CPU: the variance across the models, the energies of the selected
// deltas, and the sign election with the weighted mean, each one pass that reads the base
// and the experts once (tau is recomputed, never stored) and writes only its result.
//
// Entries are processed in blocks of kBlock: tau of every expert for a block sits in a
// small per-thread buffer (T x kBlock), so each step is a straight vectorizable loop. Built
// with -ffp-contract=off: every operation rounded on its own, as in the reference.
#include "sce_combine.h"

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
// Partial sums of the energies per block (a multiple of every vector width).
constexpr int64_t kLanes = 16;
// Below this many input elements (base and experts) per thread a second thread does not pay.
constexpr int64_t kMinElementsPerThread = 1 << 18;

// x where c holds, else +0 (a bit mask: vectorizes without mask registers).
template <typename C>
__attribute__((always_inline)) inline C keep_if(bool c, C x) {
  using U = typename std::conditional<sizeof(C) == 8, uint64_t, uint32_t>::type;
  U bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits &= U(0) - static_cast<U>(c);
  std::memcpy(&x, &bits, sizeof(bits));
  return x;
}

// The block [j0, j0 + len): tau[t * kBlock + j] for every expert, b[j], and, when `var`
// is given, the variance of every entry.
template <int32_t DT>
__attribute__((always_inline)) inline void load_block(const void* base, const void* const* experts,
                                                      int64_t num_experts, int64_t j0, int64_t len,
                                                      Compute<DT>* b, Compute<DT>* tau,
                                                      Compute<DT>* var) {
  using S = typename Element<DT>::storage;
  using C = Compute<DT>;
  const S* bp = static_cast<const S*>(base) + j0;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) b[j] = load<DT>(bp, j);
  for (int64_t t = 0; t < num_experts; ++t) {
    const S* ep = static_cast<const S*>(experts[t]) + j0;
    C* k = tau + t * kBlock;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) k[j] = load<DT>(ep, j) - b[j];
  }
  if (var == nullptr) return;
  const C count = static_cast<C>(num_experts);
  C mean[kBlock];
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) mean[j] = C(0);
  for (int64_t t = 0; t < num_experts; ++t) {
    const C* k = tau + t * kBlock;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) mean[j] += k[j];
  }
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    mean[j] = mean[j] / count;
    var[j] = C(0);
  }
  for (int64_t t = 0; t < num_experts; ++t) {
    const C* k = tau + t * kBlock;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const C d = k[j] - mean[j];
      var[j] += d * d;
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) var[j] = var[j] / count;
}

// Zero every expert's tau where the variance is below the threshold.
template <typename C>
__attribute__((always_inline)) inline void select_block(int64_t num_experts, int64_t len,
                                                        const C* var, C threshold, C* tau) {
  for (int64_t t = 0; t < num_experts; ++t) {
    C* k = tau + t * kBlock;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) k[j] = keep_if(var[j] >= threshold, k[j]);
  }
}

struct Args {
  const void* base;
  const void* const* experts;
  int64_t num_experts;
  bool select;
  const void* threshold;
  const void* weights;
  void* out;
  double* sums;  // energies: num_experts per block
};

template <int32_t DT>
FM_CPU_CLONES void variance_clone(const Args& a, int64_t i0, int64_t i1, void* scratch) {
  using C = Compute<DT>;
  C* tau = static_cast<C*>(scratch);
  C b[kBlock];
  for (int64_t j0 = i0; j0 < i1; j0 += kBlock) {
    const int64_t len = std::min(kBlock, i1 - j0);
    load_block<DT>(a.base, a.experts, a.num_experts, j0, len, b, tau,
                   static_cast<C*>(a.out) + j0);
  }
}

template <int32_t DT>
FM_CPU_CLONES void energies_clone(const Args& a, int64_t i0, int64_t i1, void* scratch) {
  using C = Compute<DT>;
  C* tau = static_cast<C*>(scratch);
  C b[kBlock], var[kBlock];
  const C thr = a.select ? *static_cast<const C*>(a.threshold) : C(0);
  for (int64_t j0 = i0; j0 < i1; j0 += kBlock) {
    const int64_t len = std::min(kBlock, i1 - j0);
    load_block<DT>(a.base, a.experts, a.num_experts, j0, len, b, tau, a.select ? var : nullptr);
    if (a.select) select_block<C>(a.num_experts, len, var, thr, tau);
    double* sums = a.sums + (j0 / kBlock) * a.num_experts;
    for (int64_t t = 0; t < a.num_experts; ++t) {
      const C* k = tau + t * kBlock;
      // kLanes partial sums, lane l taking the entries j = l (mod kLanes), then added in
      // lane order: a vertical vector loop, the same order on every instruction set
      double lane[kLanes] = {};
      int64_t j = 0;
      for (; j + kLanes <= len; j += kLanes) {
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) {
          const double x = static_cast<double>(k[j + l]);
          lane[l] += x * x;
        }
      }
      for (int64_t l = 0; j < len; ++j, ++l) {
        const double x = static_cast<double>(k[j]);
        lane[l] += x * x;
      }
      double s = 0.0;
      for (int64_t l = 0; l < kLanes; ++l) s += lane[l];
      sums[t] = s;
    }
  }
}

template <int32_t DT, int32_t OUT>
FM_CPU_CLONES void combine_clone(const Args& a, int64_t i0, int64_t i1, void* scratch) {
  using C = Compute<DT>;
  using O = Element<OUT>;
  C* tau = static_cast<C*>(scratch);
  C b[kBlock], var[kBlock], total[kBlock], merged[kBlock], divisor[kBlock];
  const C thr = a.select ? *static_cast<const C*>(a.threshold) : C(0);
  const C* w = static_cast<const C*>(a.weights);
  const C floor = static_cast<C>(1e-6);
  for (int64_t j0 = i0; j0 < i1; j0 += kBlock) {
    const int64_t len = std::min(kBlock, i1 - j0);
    load_block<DT>(a.base, a.experts, a.num_experts, j0, len, b, tau, a.select ? var : nullptr);
    if (a.select) select_block<C>(a.num_experts, len, var, thr, tau);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      total[j] = C(0);
      merged[j] = C(0);
      divisor[j] = C(0);
    }
    for (int64_t t = 0; t < a.num_experts; ++t) {
      const C* k = tau + t * kBlock;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) total[j] += k[j];
    }
    for (int64_t t = 0; t < a.num_experts; ++t) {
      const C* k = tau + t * kBlock;
      const C wt = w[t];
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        // positive: total >= 0 (a NaN total is not); bitwise logic, a straight vector loop
        const bool positive = total[j] >= C(0);
        const bool agrees = (positive & (k[j] > C(0))) | (!positive & (k[j] < C(0)));
        merged[j] += keep_if(agrees, wt * k[j]);
        divisor[j] += keep_if(agrees, wt);
      }
    }
    auto* op = static_cast<typename O::storage*>(a.out) + j0;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const C d = divisor[j] < floor ? floor : divisor[j];
      const C q = merged[j] / d;
      O::store(op, j, static_cast<typename O::compute>(q + b[j]));
    }
  }
}

using BlockFn = void (*)(const Args&, int64_t, int64_t, void*);

void run_blocks(const Args& a, int64_t n, BlockFn fn) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<int64_t> prefix(blocks + 1);
  for (int64_t i = 0; i <= blocks; ++i) prefix[i] = std::min(i * kBlock, n) * (a.num_experts + 1);
  parallel_ranges(blocks, prefix, kMinElementsPerThread, [&](int64_t first, int64_t last) {
    std::vector<double> scratch(static_cast<size_t>(a.num_experts * kBlock));  // either type
    fn(a, first * kBlock, std::min(last * kBlock, n), scratch.data());
  });
}

}  // namespace

void sce_variance(const void* base, const std::vector<const void*>& experts, int64_t n,
                  int32_t dtype, void* var) {
  const BlockFn fn = dispatch_dtype(dtype, "sce_variance: dtype", [](auto tag) -> BlockFn {
    return variance_clone<decltype(tag)::code>;
  });
  if (n <= 0 || experts.empty()) return;
  run_blocks(Args{base, experts.data(), static_cast<int64_t>(experts.size()), false, nullptr,
                  nullptr, var, nullptr},
             n, fn);
}

void sce_energies(const void* base, const std::vector<const void*>& experts, int64_t n,
                  int32_t dtype, bool select, const void* threshold, double* sums) {
  const BlockFn fn = dispatch_dtype(dtype, "sce_energies: dtype", [](auto tag) -> BlockFn {
    return energies_clone<decltype(tag)::code>;
  });
  const int64_t num_experts = static_cast<int64_t>(experts.size());
  std::fill(sums, sums + num_experts, 0.0);
  if (n <= 0 || num_experts == 0) return;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<size_t>(blocks * num_experts));
  run_blocks(Args{base, experts.data(), num_experts, select, threshold, nullptr, nullptr,
                  partial.data()},
             n, fn);
  for (int64_t i = 0; i < blocks; ++i)  // the blocks in order: independent of the threads
    for (int64_t t = 0; t < num_experts; ++t) sums[t] += partial[i * num_experts + t];
}

void sce_combine(const void* base, const std::vector<const void*>& experts, int64_t n,
                 int32_t dtype, bool select, const void* threshold, const void* weights,
                 void* out, int32_t out_dtype) {
  const BlockFn fn = dispatch_dtypes(dtype, "sce_combine: dtype", out_dtype,
                                     "sce_combine: out_dtype", [](auto in, auto o) -> BlockFn {
                                       return combine_clone<decltype(in)::code,
                                                            decltype(o)::code>;
                                     });
  if (n <= 0 || experts.empty()) return;
  run_blocks(Args{base, experts.data(), static_cast<int64_t>(experts.size()), select, threshold,
                  weights, out, nullptr},
             n, fn);
}

}  // namespace fastmerge::cpu
