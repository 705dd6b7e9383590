// Element loads and stores for the CPU kernels. Kept apart from fastmerge/dtypes.h
// so that the compiler's native _Float16 can be used on the host: with F16C enabled
// (the x86-64-v3/v4 clones) it becomes one vector conversion instead of bit tricks.
#pragma once

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

}  // namespace fastmerge::cpu

// Hot loops are compiled for several x86 levels and picked at load time, so one
// wheel runs everywhere and still uses AVX2/AVX-512 where the machine has them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FM_CPU_CLONES
#endif
