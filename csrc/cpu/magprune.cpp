// DELLA's MAGPRUNE on the CPU: per row an exact rank of |tau| by an LSD radix sort of its
// float bits, fused with the hashed random keep, the mask and the L1 sums.
//
// A row of tau = expert - base is widened into a buffer (in L1/L2 for the widths of real
// weights), its order-preserving keys (fastmerge/magnitude.h, NaNs made one key above
// +inf) are sorted with their positions, after subtracting the row's smallest key, by
// digits of at most 10 bits over the bits in which the keys differ (the histograms of every
// digit in one pass; a digit that is the same for the whole row is skipped), which gives each entry
// its rank; one more loop draws the hash of each entry (fastmerge/keep_hash.h), compares it
// with the rank's integer bound, and writes the kept tau. Stable passes rank ties by
// position, as the reference's stable argsort does. The sums are float64 with eight
// accumulators in a fixed order, so every instruction set and thread count gives the same
// bits. Each input is read once and the output written once.
#include "magprune.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "bit_select.h"
#include "cpu_loads.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/keep_hash.h"
#include "fastmerge/magnitude.h"
#include "fastmerge/parallel.h"

namespace fastmerge::cpu {
namespace {

// Below this many elements read and written per thread a second thread does not pay.
constexpr int64_t kMinElementsPerThread = 1 << 16;
constexpr int kLanes = 8;  // accumulators of the sums
// The widest radix digit (2^10 counters per pass).
constexpr int kDigitBits = 10;

// The one key of every NaN: just above +inf's (the keys of NaNs differ by payload).
template <typename C>
constexpr typename MagnitudeKey<C>::type nan_key() {
  if constexpr (sizeof(C) == 4) {
    return 0x7f800001u;
  } else {
    return 0x7ff0000000000001ull;
  }
}

// dst[j] = x[start + j * stride] in the compute type, j < len.
template <typename C, int32_t DT>
__attribute__((always_inline)) inline void widen(C* dst, const void* x, int64_t start,
                                                 int64_t stride, int64_t len) {
  const auto* p = static_cast<const typename Element<DT>::storage*>(x) + start;
  if (stride == 1) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<C>(load<DT>(p, j));
  } else {
    for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<C>(load<DT>(p, j * stride));
  }
}

template <typename C>
__attribute__((always_inline)) inline void widen_any(C* dst, const void* x, int32_t dtype,
                                                     int64_t start, int64_t stride,
                                                     int64_t len) {
  dispatch_dtype(dtype, "magprune: dtype", [&](auto tag) FM_INLINE_LAMBDA {
    widen<C, decltype(tag)::code>(dst, x, start, stride, len);
  });
}

template <typename C>
__attribute__((always_inline)) inline void store_any(void* out, int32_t dtype, int64_t start,
                                                     int64_t stride, int64_t len, const C* r) {
  dispatch_dtype(dtype, "magprune: out_dtype", [&](auto tag) FM_INLINE_LAMBDA {
    using O = Element<decltype(tag)::code>;
    auto* p = static_cast<typename O::storage*>(out) + start;
    if (stride == 1) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) O::store(p, j, static_cast<typename O::compute>(r[j]));
    } else {
      for (int64_t j = 0; j < len; ++j) {
        O::store(p, j * stride, static_cast<typename O::compute>(r[j]));
      }
    }
  });
}

// sum |x[j]|, j < m, in float64: kLanes partial sums (lane j mod kLanes), then the lanes
// in order; the same bits on every instruction set.
template <typename C>
__attribute__((always_inline)) inline double l1(const C* x, int64_t m) {
  double lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= m; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<double>(std::fabs(x[j + l]));
  }
  for (int l = 0; j < m; ++j, ++l) lanes[l] += static_cast<double>(std::fabs(x[j]));
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// Per-thread buffers of one row.
template <typename C>
struct Scratch {
  using Key = typename MagnitudeKey<C>::type;
  explicit Scratch(int64_t width)
      : tau(width),
        keys(width),
        keys2(width),
        order(width),
        order2(width),
        rank(width),
        hist(static_cast<size_t>((8 * sizeof(Key) + kDigitBits - 1) / kDigitBits)
             << kDigitBits) {}
  std::vector<C> tau;
  std::vector<Key> keys, keys2;
  std::vector<uint32_t> order, order2, rank;
  std::vector<uint32_t> hist;  // passes * 2^digit bits counters
};

// rank[j] = ascending rank of keys[j] among keys[0..m), ties by j: a stable LSD radix
// sort of keys - min over the bits in which the row's keys differ (the span's bit width),
// in the fewest passes of at most kDigitBits bits each (|tau| of one row spans a few
// dozen octaves: about 27 of the 31 bits, three passes of 9). keys is overwritten.
template <typename Key>
__attribute__((always_inline)) inline void radix_ranks(Key* keys, Key* keys2, uint32_t* order,
                                                       uint32_t* order2, uint32_t* rank,
                                                       int64_t m, uint32_t* hist) {
  Key lo = keys[0], hi = keys[0];
#pragma omp simd reduction(min : lo) reduction(max : hi)
  for (int64_t j = 0; j < m; ++j) {
    lo = keys[j] < lo ? keys[j] : lo;
    hi = keys[j] > hi ? keys[j] : hi;
  }
  if (lo == hi) {  // one key: the positions are the ranks
    for (int64_t j = 0; j < m; ++j) rank[j] = static_cast<uint32_t>(j);
    return;
  }
  const Key span = hi - lo;
  const int bits = static_cast<int>(8 * sizeof(Key)) -
                   (sizeof(Key) == 8 ? __builtin_clzll(static_cast<uint64_t>(span))
                                     : __builtin_clz(static_cast<uint32_t>(span)));
  const int passes = (bits + kDigitBits - 1) / kDigitBits;
  const int width = (bits + passes - 1) / passes;
  const int64_t bins = int64_t{1} << width;
  const Key mask = static_cast<Key>(bins - 1);
  std::memset(hist, 0, sizeof(uint32_t) * static_cast<size_t>(passes * bins));
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) keys[j] -= lo;
  for (int64_t j = 0; j < m; ++j) {
    const Key k = keys[j];
    for (int d = 0; d < passes; ++d) ++hist[d * bins + ((k >> (width * d)) & mask)];
  }
  Key* src_k = keys;
  uint32_t* src_i = nullptr;  // the identity until the first pass that moves anything
  Key* dst_k = keys2;
  uint32_t* dst_i = order;
  for (int d = 0; d < passes; ++d) {
    uint32_t* h = hist + d * bins;
    const int shift = width * d;
    if (h[(keys[0] >> shift) & mask] == static_cast<uint32_t>(m)) continue;  // one digit
    uint32_t sum = 0;
    for (int64_t c = 0; c < bins; ++c) {
      const uint32_t count = h[c];
      h[c] = sum;
      sum += count;
    }
    for (int64_t p = 0; p < m; ++p) {
      const Key k = src_k[p];
      const uint32_t at = h[(k >> shift) & mask]++;
      dst_k[at] = k;
      dst_i[at] = src_i == nullptr ? static_cast<uint32_t>(p) : src_i[p];
    }
    Key* next_k = dst_k == keys2 ? keys : keys2;
    uint32_t* next_i = dst_i == order ? order2 : order;
    src_k = dst_k;
    src_i = dst_i;
    dst_k = next_k;
    dst_i = next_i;
  }
  if (src_i == nullptr) {
    for (int64_t j = 0; j < m; ++j) rank[j] = static_cast<uint32_t>(j);
  } else {
    for (int64_t p = 0; p < m; ++p) rank[src_i[p]] = static_cast<uint32_t>(p);
  }
}

struct Args {
  const void* base;
  int32_t base_dtype;
  const void* expert;
  int32_t expert_dtype;
  int64_t width, inner;
  uint64_t key;
  int64_t below, step;
  uint64_t offset;
  void* out;
  int32_t out_dtype;
  double* row_norms;  // (rows, 2)
};

// Rows [r0, r1).
template <typename C>
__attribute__((always_inline)) inline void magprune_rows(const Args& a, int64_t r0,
                                                         int64_t r1) {
  using K = MagnitudeKey<C>;
  using Key = typename K::type;
  const int64_t m = a.width;
  Scratch<C> s(m);
  std::vector<C> other(m);
  C* tau = s.tau.data();
  Key* keys = s.keys.data();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = r / a.inner;
    const int64_t k = r - i * a.inner;
    const int64_t start = i * m * a.inner + k;
    widen_any<C>(tau, a.expert, a.expert_dtype, start, a.inner, m);
    widen_any<C>(other.data(), a.base, a.base_dtype, start, a.inner, m);
    const Key nan = nan_key<C>();
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const C t = tau[j] - other[j];
      tau[j] = t;
      const Key key = K::of(t);
      keys[j] = key < nan ? key : nan;
    }
    const double b = l1(tau, m);
    radix_ranks<Key>(keys, s.keys2.data(), s.order.data(), s.order2.data(), s.rank.data(), m,
                     s.hist.data());
    const uint32_t* rank = s.rank.data();
    C* kept = other.data();
    const uint64_t first = a.offset + static_cast<uint64_t>(start) + 1;  // e + 1 at j = 0
    const uint64_t stride = static_cast<uint64_t>(a.inner);
    const uint64_t key = a.key;
    const int64_t below = a.below;
    const int64_t step = a.step;
    // No branch per entry (half of the tests fail at random): a bit-mask select.
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const uint64_t h = mix64(key + (first + static_cast<uint64_t>(j) * stride) * kGolden);
      const int64_t bound = below + static_cast<int64_t>(rank[j]) * step;
      kept[j] = pick(static_cast<int64_t>(h >> 11) < bound, tau[j], C(0));
    }
    store_any<C>(a.out, a.out_dtype, start, a.inner, m, kept);
    const double c = l1(kept, m);
    a.row_norms[2 * r] = b;
    a.row_norms[2 * r + 1] = c;
  }
}

FM_CPU_CLONES void magprune_rows_f32(const Args& a, int64_t r0, int64_t r1) {
  magprune_rows<float>(a, r0, r1);
}

FM_CPU_CLONES void magprune_rows_f64(const Args& a, int64_t r0, int64_t r1) {
  magprune_rows<double>(a, r0, r1);
}

}  // namespace

void magprune(const void* base, int32_t base_dtype, const void* expert, int32_t expert_dtype,
              int64_t n, int64_t width, int64_t inner, bool float64, int64_t key,
              int64_t below, int64_t step, int64_t offset, void* out, int32_t out_dtype,
              double* norms) {
  // The rows dispatch on pool workers: check the codes here.
  check_dtype(base_dtype, "magprune: base_dtype");
  check_dtype(expert_dtype, "magprune: expert_dtype");
  check_dtype(out_dtype, "magprune: out_dtype");
  norms[0] = norms[1] = 0.0;
  if (n <= 0) return;
  if (width <= 0 || inner <= 0 || n % (width * inner) != 0) {
    throw std::invalid_argument("magprune: n = " + std::to_string(n) +
                                " is not a multiple of width * inner = " +
                                std::to_string(width) + " * " + std::to_string(inner));
  }
  if (width > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("magprune: rows of " + std::to_string(width) +
                                " entries; at most 2**31 - 1 are supported");
  }
  const int64_t rows = n / width;
  std::vector<double> row_norms(static_cast<size_t>(rows) * 2);
  const Args a{base, base_dtype, expert, expert_dtype, width, inner,
               static_cast<uint64_t>(key), below, step, static_cast<uint64_t>(offset),
               out, out_dtype, row_norms.data()};
  auto* fn = float64 ? magprune_rows_f64 : magprune_rows_f32;
  std::vector<int64_t> prefix(rows + 1);
  for (int64_t r = 0; r <= rows; ++r) prefix[r] = r * width;
  parallel_ranges(rows, prefix, kMinElementsPerThread,
                  [&](int64_t first, int64_t last) { fn(a, first, last); });
  double before = 0.0, after = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    before += row_norms[2 * r];
    after += row_norms[2 * r + 1];
  }
  norms[0] = before;
  norms[1] = after;
}

}  // namespace fastmerge::cpu
