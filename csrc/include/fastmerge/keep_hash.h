// The counter-based random keep of gta_combine (DARE's random drop), for host and device.
//
// Entry e (flat index in the whole tensor) of expert t is kept iff u_t(e) < p_t, where
// u_t(e) = (h >> 11) * 2^-53 and h = mix64(key_t + (e + 1) * kGolden) (mod 2^64): the
// e-th output of a splitmix64 generator seeded with the expert's key, key_t =
// mix64(seed + (t + 1) * kGolden), which the Python side computes. Kernels compare
// integers: u < p <=> (h >> 11) < keep_below, keep_below = ceil(p * 2^53) clamped to
// [0, 2^53]. The same bits on every backend and for every thread count or block size.
#pragma once

#include <cstdint>

#include "fastmerge/moments.h"

namespace fastmerge {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
// keep_below of p >= 1: every entry is kept.
constexpr int64_t kKeepAll = int64_t{1} << 53;

// splitmix64's finalizer.
FM_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Whether the entry at flat index `index` passes the random test of an expert with
// `key` and `keep_below`.
FM_HD bool random_keep(uint64_t key, uint64_t index, int64_t keep_below) {
  const uint64_t h = mix64(key + (index + 1) * kGolden);
  return static_cast<int64_t>(h >> 11) < keep_below;
}

}  // namespace fastmerge
