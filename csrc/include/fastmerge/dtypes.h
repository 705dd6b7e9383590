// Element types the kernels accept and their conversion to float, for host and device.
// The codes match fastmerge/_dtypes.py; keep the two in sync.
#pragma once

#include <cstdint>
#include <cstring>

#include "fastmerge/moments.h"

namespace fastmerge {

enum DType : int32_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

FM_HD float bits_to_float(uint32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

FM_HD uint32_t float_to_bits(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// IEEE half -> float, exact for every input including subnormals, inf and NaN.
FM_HD float half_to_float(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (uint32_t(h) & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;  // re-bias the exponent
  if (exp == shifted_exp) {
    o += (128u - 16u) << 23;  // inf / NaN keep an all-ones exponent
  } else if (exp == 0) {
    o += 1u << 23;  // zero / subnormal: renormalize through a float subtraction
    o = float_to_bits(bits_to_float(o) - bits_to_float(113u << 23));
  }
  return bits_to_float(o | ((uint32_t(h) & 0x8000u) << 16));
}

// bfloat16 is the top half of a float32.
FM_HD float bfloat16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// float -> bfloat16 bits, round to nearest even; NaN stays a quiet NaN.
FM_HD uint16_t float_to_bfloat16(float f) {
  const uint32_t bits = float_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x0040u);
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// float -> IEEE half bits, round to nearest even, overflow to inf, NaN to quiet NaN.
FM_HD uint16_t float_to_half(float value) {
  const uint32_t f32_inf = 255u << 23;
  const uint32_t f16_max = (127u + 16u) << 23;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t f = float_to_bits(value);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint16_t o;
  if (f >= f16_max) {
    o = (f > f32_inf) ? 0x7e00u : 0x7c00u;
  } else if (f < (113u << 23)) {
    // Subnormal or zero: let the FPU round by adding a magic number.
    o = uint16_t(float_to_bits(bits_to_float(f) + bits_to_float(denorm_magic)) - denorm_magic);
  } else {
    const uint32_t mant_odd = (f >> 13) & 1u;
    f += ((15u - 127u) << 23) + 0xfffu;
    f += mant_odd;
    o = uint16_t(f >> 13);
  }
  return uint16_t(o | (sign >> 16));
}

// Load element i of a buffer of the given type as double.
template <int32_t DT>
FM_HD double load_as_double(const void* data, int64_t i);

template <>
FM_HD double load_as_double<kFloat16>(const void* data, int64_t i) {
  return half_to_float(static_cast<const uint16_t*>(data)[i]);
}
template <>
FM_HD double load_as_double<kBFloat16>(const void* data, int64_t i) {
  return bfloat16_to_float(static_cast<const uint16_t*>(data)[i]);
}
template <>
FM_HD double load_as_double<kFloat32>(const void* data, int64_t i) {
  return static_cast<const float*>(data)[i];
}
template <>
FM_HD double load_as_double<kFloat64>(const void* data, int64_t i) {
  return static_cast<const double*>(data)[i];
}

// Store a float (or double) as element i of a buffer of the given type.
template <int32_t DT>
FM_HD void store_from_double(void* data, int64_t i, double v);

template <>
FM_HD void store_from_double<kFloat16>(void* data, int64_t i, double v) {
  static_cast<uint16_t*>(data)[i] = float_to_half(float(v));
}
template <>
FM_HD void store_from_double<kBFloat16>(void* data, int64_t i, double v) {
  static_cast<uint16_t*>(data)[i] = float_to_bfloat16(float(v));
}
template <>
FM_HD void store_from_double<kFloat32>(void* data, int64_t i, double v) {
  static_cast<float*>(data)[i] = float(v);
}
template <>
FM_HD void store_from_double<kFloat64>(void* data, int64_t i, double v) {
  static_cast<double*>(data)[i] = v;
}

}  // namespace fastmerge
