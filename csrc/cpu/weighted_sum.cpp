// The weighted sum on the CPU: sum_t w_t * x_t for any number of inputs of any float
// dtypes, one read of each input and one write of the output.
//
// Entries are processed in blocks: the accumulator of a block (kBlock compute values) sits
// on the stack, in L1, while each input's block is added to it, so every step is a simple
// vectorizable loop and the inputs and the output each stream through memory once. The
// input dtype is dispatched per (block, input), outside the inner loops. Bit-for-bit the
// reference: see weighted_sum.h; CMake builds this file with -ffp-contract=off so that no
// multiply-add is fused.
#include "weighted_sum.h"

#include <algorithm>
#include <type_traits>

#include "cpu_loads.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/parallel.h"

namespace fastmerge::cpu {
namespace {

constexpr int64_t kBlock = 1024;
// Below this many elements read and written per thread a second thread does not pay.
constexpr int64_t kMinElementsPerThread = 1 << 17;
// Thread ranges start at multiples of this many elements (whole cache lines of output).
constexpr int64_t kAlign = 64;

template <typename C, int32_t DT>
__attribute__((always_inline)) inline void accumulate(C* acc, const void* x, int64_t j0,
                                                      int64_t len, C w, bool first) {
  using E = Element<DT>;
  const auto* p = static_cast<const typename E::storage*>(x) + j0;
  if (first) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) acc[j] = w * static_cast<C>(E::load(p, j));
  } else {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const C product = w * static_cast<C>(E::load(p, j));
      acc[j] = acc[j] + product;
    }
  }
}

template <typename C, int32_t OUT>
__attribute__((always_inline)) inline void store(void* out, int64_t j0, int64_t len,
                                                 const C* acc) {
  using O = Element<OUT>;
  auto* p = static_cast<typename O::storage*>(out) + j0;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) O::store(p, j, static_cast<typename O::compute>(acc[j]));
}

// Entries [i0, i1) of the sum.
template <typename C>
__attribute__((always_inline)) inline void sum_range(const void* const* inputs,
                                                     const int32_t* dtypes, const C* weights,
                                                     int64_t count, int64_t i0, int64_t i1,
                                                     void* out, int32_t out_dtype) {
  alignas(64) C acc[kBlock];
  for (int64_t j0 = i0; j0 < i1; j0 += kBlock) {
    const int64_t len = std::min(kBlock, i1 - j0);
    for (int64_t t = 0; t < count; ++t) {
      const bool first = t == 0;
      dispatch_dtype(dtypes[t], "weighted_sum: dtypes", [&](auto tag) FM_INLINE_LAMBDA {
        accumulate<C, decltype(tag)::code>(acc, inputs[t], j0, len, weights[t], first);
      });
    }
    dispatch_dtype(out_dtype, "weighted_sum: out_dtype", [&](auto tag) FM_INLINE_LAMBDA {
      store<C, decltype(tag)::code>(out, j0, len, acc);
    });
  }
}

FM_CPU_CLONES void sum_range_f32(const void* const* inputs, const int32_t* dtypes,
                                 const float* weights, int64_t count, int64_t i0, int64_t i1,
                                 void* out, int32_t out_dtype) {
  sum_range<float>(inputs, dtypes, weights, count, i0, i1, out, out_dtype);
}

FM_CPU_CLONES void sum_range_f64(const void* const* inputs, const int32_t* dtypes,
                                 const double* weights, int64_t count, int64_t i0, int64_t i1,
                                 void* out, int32_t out_dtype) {
  sum_range<double>(inputs, dtypes, weights, count, i0, i1, out, out_dtype);
}

template <typename C, typename Fn>
void run(const std::vector<const void*>& inputs, const std::vector<int32_t>& dtypes,
         const std::vector<double>& weights, int64_t n, void* out, int32_t out_dtype, Fn fn) {
  const int64_t count = static_cast<int64_t>(inputs.size());
  std::vector<C> w(weights.begin(), weights.end());  // rounded once, like the reference
  const int64_t work = n * (count + 1);
  const int64_t threads = std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(get_num_threads()),
                            work / kMinElementsPerThread, (n + kAlign - 1) / kAlign}));
  if (threads == 1) {
    fn(inputs.data(), dtypes.data(), w.data(), count, 0, n, out, out_dtype);
    return;
  }
  global_pool().run(static_cast<int>(threads), [&](int p) {
    const int64_t begin = std::min(n, (n * p / threads) / kAlign * kAlign);
    const int64_t end = p + 1 == threads ? n : std::min(n, (n * (p + 1) / threads) / kAlign * kAlign);
    if (begin < end) fn(inputs.data(), dtypes.data(), w.data(), count, begin, end, out, out_dtype);
  });
}

}  // namespace

void weighted_sum(const std::vector<const void*>& inputs, const std::vector<int32_t>& dtypes,
                  const std::vector<double>& weights, int64_t n, bool float64, void* out,
                  int32_t out_dtype) {
  // The blocks dispatch on pool workers: check the codes here.
  for (const int32_t code : dtypes) check_dtype(code, "weighted_sum: dtypes");
  check_dtype(out_dtype, "weighted_sum: out_dtype");
  if (n <= 0 || inputs.empty()) return;
  if (float64) {
    run<double>(inputs, dtypes, weights, n, out, out_dtype, sum_range_f64);
  } else {
    run<float>(inputs, dtypes, weights, n, out, out_dtype, sum_range_f32);
  }
}

}  // namespace fastmerge::cpu
