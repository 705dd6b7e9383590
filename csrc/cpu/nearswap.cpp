// The nearswap on the CPU: w = clamp(t / max(|a - b|, 1e-6), 0, 1), w * b + (1 - w) * a,
// one read of each input and one write of the output.
//
// Entries are processed in blocks of kBlock: a block of a and a block of b are widened to
// the compute type into two stack buffers (in L1), the formula runs over them in one
// simple vectorizable loop, and the result block is narrowed into out; so the inputs and
// the output each stream through memory once, and out may be a or b itself (a block is
// read whole before it is written). The dtypes are dispatched per block, outside the inner
// loops, and the clamps are bit-mask selects, so the formula loop vectorizes on AVX2 and
// AVX-512 (and on baseline x86-64 in float32; its float64 loop stays scalar there: SSE2
// has no 64-bit lane masks from a bool). Bit-for-bit the reference: see nearswap.h; CMake
// builds this file with -ffp-contract=off so that no multiply-add is fused.
#include "nearswap.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "bit_select.h"
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
__attribute__((always_inline)) inline void widen(C* dst, const void* x, int64_t j0,
                                                 int64_t len) {
  const auto* p = static_cast<const typename Element<DT>::storage*>(x) + j0;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<C>(load<DT>(p, j));
}

template <typename C>
__attribute__((always_inline)) inline void widen_any(C* dst, const void* x, int32_t dtype,
                                                     int64_t j0, int64_t len) {
  dispatch_dtype(dtype, "nearswap: dtype", [&](auto tag) FM_INLINE_LAMBDA {
    widen<C, decltype(tag)::code>(dst, x, j0, len);
  });
}

// r[j] = nearswap(x[j], y[j]); r may be x.
template <typename C>
__attribute__((always_inline)) inline void formula(C* r, const C* x, const C* y, int64_t len,
                                                   C t) {
  const C eps = static_cast<C>(1e-6);
  const C zero = C(0);
  const C one = C(1);
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const C a = x[j];
    const C b = y[j];
    C d = std::fabs(a - b);
    d = pick(d < eps, eps, d);  // a NaN fails every comparison and stays
    C w = t / d;
    w = pick(w < zero, zero, w);  // -0 is not < 0: it stays, as in torch.clamp
    w = pick(w > one, one, w);
    const C wb = w * b;
    const C wa = (one - w) * a;
    r[j] = wb + wa;
  }
}

template <typename C, int32_t OUT>
__attribute__((always_inline)) inline void store(void* out, int64_t j0, int64_t len,
                                                 const C* r) {
  using O = Element<OUT>;
  auto* p = static_cast<typename O::storage*>(out) + j0;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) O::store(p, j, static_cast<typename O::compute>(r[j]));
}

// Entries [i0, i1).
template <typename C>
__attribute__((always_inline)) inline void nearswap_range(const void* a, int32_t a_dtype,
                                                          const void* b, int32_t b_dtype, C t,
                                                          int64_t i0, int64_t i1, void* out,
                                                          int32_t out_dtype) {
  alignas(64) C x[kBlock];
  alignas(64) C y[kBlock];
  for (int64_t j0 = i0; j0 < i1; j0 += kBlock) {
    const int64_t len = std::min(kBlock, i1 - j0);
    widen_any<C>(x, a, a_dtype, j0, len);
    widen_any<C>(y, b, b_dtype, j0, len);
    formula<C>(x, x, y, len, t);
    dispatch_dtype(out_dtype, "nearswap: out_dtype", [&](auto tag) FM_INLINE_LAMBDA {
      store<C, decltype(tag)::code>(out, j0, len, x);
    });
  }
}

FM_CPU_CLONES void nearswap_range_f32(const void* a, int32_t a_dtype, const void* b,
                                      int32_t b_dtype, float t, int64_t i0, int64_t i1,
                                      void* out, int32_t out_dtype) {
  nearswap_range<float>(a, a_dtype, b, b_dtype, t, i0, i1, out, out_dtype);
}

FM_CPU_CLONES void nearswap_range_f64(const void* a, int32_t a_dtype, const void* b,
                                      int32_t b_dtype, double t, int64_t i0, int64_t i1,
                                      void* out, int32_t out_dtype) {
  nearswap_range<double>(a, a_dtype, b, b_dtype, t, i0, i1, out, out_dtype);
}

template <typename C, typename Fn>
void run(const void* a, int32_t a_dtype, const void* b, int32_t b_dtype, double t, int64_t n,
         void* out, int32_t out_dtype, Fn fn) {
  const C tc = static_cast<C>(t);  // rounded once, like the reference
  const int64_t work = n * 3;      // two inputs read, one output written
  const int64_t threads = std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(get_num_threads()),
                            work / kMinElementsPerThread, (n + kAlign - 1) / kAlign}));
  if (threads == 1) {
    fn(a, a_dtype, b, b_dtype, tc, 0, n, out, out_dtype);
    return;
  }
  global_pool().run(static_cast<int>(threads), [&](int p) {
    const int64_t begin = std::min(n, (n * p / threads) / kAlign * kAlign);
    const int64_t end =
        p + 1 == threads ? n : std::min(n, (n * (p + 1) / threads) / kAlign * kAlign);
    if (begin < end) fn(a, a_dtype, b, b_dtype, tc, begin, end, out, out_dtype);
  });
}

}  // namespace

void nearswap(const void* a, int32_t a_dtype, const void* b, int32_t b_dtype, double t,
              int64_t n, bool float64, void* out, int32_t out_dtype) {
  // The blocks dispatch on pool workers: check the codes here.
  check_dtype(a_dtype, "nearswap: a_dtype");
  check_dtype(b_dtype, "nearswap: b_dtype");
  check_dtype(out_dtype, "nearswap: out_dtype");
  if (n <= 0) return;
  if (float64) {
    run<double>(a, a_dtype, b, b_dtype, t, n, out, out_dtype, nearswap_range_f64);
  } else {
    run<float>(a, a_dtype, b, b_dtype, t, n, out, out_dtype, nearswap_range_f32);
  }
}

}  // namespace fastmerge::cpu
