// Branch-free select for the CPU kernels' inner loops.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastmerge::cpu {

// c ? x : y as bit masks, not a select, so that compilers vectorize it without AVX-512
// mask registers too (no branch per entry; see ties_combine.cpp). C is float or double.
template <typename C>
__attribute__((always_inline)) inline C pick(bool c, C x, C y) {
  using U = typename std::conditional<sizeof(C) == 8, uint64_t, uint32_t>::type;
  U xb, yb;
  std::memcpy(&xb, &x, sizeof(xb));
  std::memcpy(&yb, &y, sizeof(yb));
  const U mask = U(0) - static_cast<U>(c);
  const U bits = (xb & mask) | (yb & ~mask);
  C out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

}  // namespace fastmerge::cpu
