// Order-preserving integer keys of |tau| for the CPU TIES threshold selection.
//
// For a non-negative float, the IEEE bits read as an unsigned integer grow with the
// value, so clearing the sign bit of tau gives a key whose order is the order of |tau|
// (-0 and +0 share key 0). A selection over keys is an exact selection over values.
// (The CUDA kernel builds the same keys with __float_as_uint / __double_as_longlong.)
// Histograms use the top kHistogramBits of the key (float32: 8 exponent and 4 mantissa
// bits, 4,096 bins; float64: 11 and 5, 65,536 bins).
#pragma once

#include <cstdint>
#include <cstring>

#include "fastmerge/moments.h"

namespace fastmerge {

template <typename C>
struct MagnitudeKey;

template <>
struct MagnitudeKey<float> {
  using type = uint32_t;
  static constexpr int kHistogramBits = 12;
  static constexpr int kShift = 31 - kHistogramBits;
  static constexpr int64_t kBins = int64_t{1} << kHistogramBits;
  FM_HD static type of(float tau) {
    type bits;
    memcpy(&bits, &tau, sizeof(bits));
    return bits & 0x7fffffffu;
  }
  FM_HD static float value(type key) {
    float v;
    memcpy(&v, &key, sizeof(v));
    return v;
  }
};

template <>
struct MagnitudeKey<double> {
  using type = uint64_t;
  static constexpr int kHistogramBits = 16;
  static constexpr int kShift = 63 - kHistogramBits;
  static constexpr int64_t kBins = int64_t{1} << kHistogramBits;
  FM_HD static type of(double tau) {
    type bits;
    memcpy(&bits, &tau, sizeof(bits));
    return bits & 0x7fffffffffffffffull;
  }
  FM_HD static double value(type key) {
    double v;
    memcpy(&v, &key, sizeof(v));
    return v;
  }
};

}  // namespace fastmerge
