// Element loads and stores for the CPU kernels. Kept apart from fastmerge/dtypes.h
// so that the compiler's native _Float16 can be used on the host: with F16C enabled
// (the x86-64-v3/v4 clones) it becomes one vector conversion instead of bit tricks.
#pragma once

#include <cstring>
#include <type_traits>

#include "fastmerge/dispatch.h"
#include "fastmerge/dtypes.h"

namespace fastmerge::cpu {

template <int32_t DT>
struct Element;

template <>
struct Element<kFloat32> {
  using storage = float;
  using compute = float;
  static inline double load(const storage* p, int64_t i) { return p[i]; }
  static inline void store(storage* p, int64_t i, compute v) { p[i] = v; }
};

template <>
struct Element<kFloat64> {
  using storage = double;
  using compute = double;
  static inline double load(const storage* p, int64_t i) { return p[i]; }
  static inline void store(storage* p, int64_t i, compute v) { p[i] = v; }
};

template <>
struct Element<kBFloat16> {
  using storage = uint16_t;
  using compute = float;
  static inline double load(const storage* p, int64_t i) { return bfloat16_to_float(p[i]); }
  static inline void store(storage* p, int64_t i, compute v) { p[i] = float_to_bfloat16(v); }
};

template <>
struct Element<kFloat16> {
#if defined(__FLT16_MAX__)
  using storage = _Float16;
  using compute = float;
  static inline double load(const storage* p, int64_t i) { return static_cast<float>(p[i]); }
  static inline void store(storage* p, int64_t i, compute v) { p[i] = static_cast<_Float16>(v); }
#else
  using storage = uint16_t;
  using compute = float;
  static inline double load(const storage* p, int64_t i) { return half_to_float(p[i]); }
  static inline void store(storage* p, int64_t i, compute v) { p[i] = float_to_half(v); }
#endif
};

// The compute type of the fused elementwise kernels (the dispatch tag's): float32 for the
// half types and float32, double for float64.
template <int32_t DT>
using Compute = typename DTypeTag<DT>::compute;

// Element j of a buffer of DT in the compute type, widened exactly without a detour
// through double, so that the kernels' loops vectorize on every instruction set the
// files are built for.
template <int32_t DT>
__attribute__((always_inline)) inline Compute<DT> load(const typename Element<DT>::storage* p,
                                                       int64_t j) {
  if constexpr (DT == kBFloat16) {
    const uint32_t bits = static_cast<uint32_t>(p[j]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  } else if constexpr (DT == kFloat16) {
    return static_cast<float>(Element<DT>::load(p, j));
  } else {
    return p[j];
  }
}

}  // namespace fastmerge::cpu

// Hot loops are compiled for several x86 levels and picked at load time, so one
// wheel runs everywhere and still uses AVX2/AVX-512 where the machine has them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FM_CPU_CLONES
#endif
