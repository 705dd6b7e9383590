// TIES trim thresholds on the CPU: a radix (histogram) selection over the float bits of
// |tau|, tau = expert - base computed on the fly and never stored.
//
// Pass 1 histograms the top bits of every expert's keys (all experts per block of the
// base, so the base is read once per pass). The bin holding each expert's k-th largest
// key follows from the counts. Pass 2 copies the keys of that bin (a few percent of n for
// real weights) into a buffer, each worker at an offset known from its own histogram; a
// histogram of their next bits and std::nth_element on one sub-bin finish the selection.
// Two reads of the inputs in all.
#include "magnitude_threshold.h"

#include <algorithm>
#include <cstring>
#include <functional>

#include "cpu_loads.h"
#include "fastmerge/magnitude.h"
#include "fastmerge/parallel.h"

namespace fastmerge::cpu {
namespace {

// Elements per block: the base block and one expert's keys stay in L1.
constexpr int64_t kBlock = 1024;
// Below this many input elements (base and experts) per thread a second thread does not pay.
constexpr int64_t kMinElementsPerThread = 1 << 18;

template <int32_t DT>
using Compute = typename std::conditional<DT == kFloat64, double, float>::type;

// Element j of a buffer of DT, widened exactly to the compute type (float32 for the half
// types and float32, double for float64), without a detour through double: these loops
// must vectorize to a few instructions per element.
template <int32_t DT>
__attribute__((always_inline)) inline Compute<DT> load(const typename Element<DT>::storage* p,
                                                       int64_t j) {
  if constexpr (DT == kBFloat16) {
    const uint32_t bits = static_cast<uint32_t>(p[j]) << 16;
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
  } else if constexpr (DT == kFloat16) {
    return static_cast<float>(Element<DT>::load(p, j));
  } else {
    return p[j];
  }
}

// keys[j] = key of |expert[j0 + j] - base[j0 + j]|; b: the base block in the compute type.
template <int32_t DT>
__attribute__((always_inline)) inline void block_keys(
    const void* expert, int64_t j0, int64_t len, const Compute<DT>* b,
    typename MagnitudeKey<Compute<DT>>::type* keys) {
  using C = Compute<DT>;
  const auto* e = static_cast<const typename Element<DT>::storage*>(expert) + j0;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) keys[j] = MagnitudeKey<C>::of(load<DT>(e, j) - b[j]);
}

// The base block [j0, j0 + len) in the compute type: float32 and float64 are used where
// they are (a copy costs more than it saves), the half types are widened into b.
template <int32_t DT>
__attribute__((always_inline)) inline const Compute<DT>* base_block(const void* base, int64_t j0,
                                                                    int64_t len, Compute<DT>* b) {
  const auto* p = static_cast<const typename Element<DT>::storage*>(base) + j0;
  if constexpr (DT == kFloat32 || DT == kFloat64) {
    return p;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) b[j] = load<DT>(p, j);
    return b;
  }
}

// Pass 1 over [i0, i1) (< 2^32 elements): hist[t * bins + bin] counts expert t's keys
// per top-bits bin.
template <int32_t DT>
__attribute__((always_inline)) inline void histogram_range(const void* base,
                                                           const void* const* experts,
                                                           int64_t num_experts, int64_t i0,
                                                           int64_t i1, uint32_t* hist) {
  using K = MagnitudeKey<Compute<DT>>;
  Compute<DT> b[kBlock];
  typename K::type keys[kBlock];
  for (int64_t j0 = i0; j0 < i1; j0 += kBlock) {
    const int64_t len = std::min(kBlock, i1 - j0);
    const Compute<DT>* bb = base_block<DT>(base, j0, len, b);
    for (int64_t t = 0; t < num_experts; ++t) {
      block_keys<DT>(experts[t], j0, len, bb, keys);
      uint32_t* h = hist + t * K::kBins;
      for (int64_t j = 0; j < len; ++j) ++h[keys[j] >> K::kShift];
    }
  }
}

// Pass 2 over [i0, i1): appends expert t's keys that fall in bin[t] at dest[t].
template <int32_t DT>
__attribute__((always_inline)) inline void collect_range(
    const void* base, const void* const* experts, int64_t num_experts, int64_t i0, int64_t i1,
    const int64_t* bin, typename MagnitudeKey<Compute<DT>>::type* const* dest) {
  using K = MagnitudeKey<Compute<DT>>;
  Compute<DT> b[kBlock];
  typename K::type keys[kBlock];
  alignas(8) uint8_t match[kBlock];
  std::vector<int64_t> filled(num_experts, 0);
  for (int64_t j0 = i0; j0 < i1; j0 += kBlock) {
    const int64_t len = std::min(kBlock, i1 - j0);
    const Compute<DT>* bb = base_block<DT>(base, j0, len, b);
    for (int64_t t = 0; t < num_experts; ++t) {
      block_keys<DT>(experts[t], j0, len, bb, keys);
      const auto wanted = static_cast<typename K::type>(bin[t]);
      auto* out = dest[t] + filled[t];
      int64_t m = 0;
      // The bin holds a few percent of the keys: a vectorized compare marks them, and the
      // marks are scanned 8 at a time (most words of 8 are empty), so that there is no
      // branch per key.
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) match[j] = (keys[j] >> K::kShift) == wanted;
      for (int64_t j = len; j < kBlock; ++j) match[j] = 0;
      for (int64_t j = 0; j < len; j += 8) {
        uint64_t word;
        std::memcpy(&word, match + j, sizeof(word));
        while (word != 0) {
          out[m++] = keys[j + (__builtin_ctzll(word) >> 3)];
          word &= word - 1;
        }
      }
      filled[t] += m;
    }
  }
}

// The rank-th largest (1-based) of `keys`, which all agree above bit `shift`: one more
// radix digit (kSubBits bits below `shift`) is counted first, so that nth_element only
// sorts out the keys of the one sub-bin that holds the answer (for real weights a few
// hundred instead of tens of thousands). Exact: the same key as nth_element on all.
template <typename Key>
Key select_from_top(std::vector<Key>& keys, int64_t rank, int shift) {
  constexpr int kSubBits = 10;
  const int sub_shift = std::max(0, shift - kSubBits);
  const Key mask = (Key(1) << (shift - sub_shift)) - 1;
  const int64_t bins = int64_t{1} << (shift - sub_shift);
  if (static_cast<int64_t>(keys.size()) > 4 * bins) {
    std::vector<uint32_t> count(bins, 0);
    for (const Key k : keys) ++count[(k >> sub_shift) & mask];
    int64_t above = 0, bin = bins - 1;
    for (; bin > 0; --bin) {
      if (above + count[bin] >= rank) break;
      above += count[bin];
    }
    std::vector<Key> in_bin;
    in_bin.reserve(count[bin]);
    for (const Key k : keys) {
      if (static_cast<int64_t>((k >> sub_shift) & mask) == bin) in_bin.push_back(k);
    }
    keys.swap(in_bin);
    rank -= above;
  }
  auto nth = keys.begin() + (rank - 1);
  std::nth_element(keys.begin(), nth, keys.end(), std::greater<Key>());
  return *nth;
}

using HistogramFn = void (*)(const void*, const void* const*, int64_t, int64_t, int64_t,
                             uint32_t*);
using CollectFn = void (*)(const void*, const void* const*, int64_t, int64_t, int64_t,
                           const int64_t*, void* const*);

#define FM_THRESHOLD_CLONES(SUFFIX, DT)                                                      \
  FM_CPU_CLONES void histogram_##SUFFIX(const void* base, const void* const* experts,       \
                                        int64_t t, int64_t i0, int64_t i1, uint32_t* hist) { \
    histogram_range<DT>(base, experts, t, i0, i1, hist);                                     \
  }                                                                                          \
  FM_CPU_CLONES void collect_##SUFFIX(const void* base, const void* const* experts,         \
                                      int64_t t, int64_t i0, int64_t i1, const int64_t* bin, \
                                      void* const* dest) {                                   \
    using Key = typename MagnitudeKey<Compute<DT>>::type;                                    \
    collect_range<DT>(base, experts, t, i0, i1, bin, reinterpret_cast<Key* const*>(dest));   \
  }
FM_THRESHOLD_CLONES(f16, kFloat16)
FM_THRESHOLD_CLONES(bf16, kBFloat16)
FM_THRESHOLD_CLONES(f32, kFloat32)
FM_THRESHOLD_CLONES(f64, kFloat64)
#undef FM_THRESHOLD_CLONES

// Equal ranges of [0, n), one per worker; at most 2^31 elements each so that a
// worker's candidate counts stay small integers.
std::vector<int64_t> cut_points(int64_t n, int64_t num_experts) {
  const int64_t work = n * (num_experts + 1);
  int64_t parts = std::max<int64_t>(1, std::min<int64_t>(get_num_threads(),
                                                         work / kMinElementsPerThread));
  parts = std::max<int64_t>(parts, (n + (int64_t{1} << 31) - 1) >> 31);
  std::vector<int64_t> cuts(parts + 1);
  for (int64_t p = 0; p <= parts; ++p) cuts[p] = n * p / parts;
  return cuts;
}

void run_parts(int64_t parts, const std::function<void(int)>& body) {
  if (parts == 1) {
    body(0);
  } else {
    global_pool().run(static_cast<int>(parts), body);
  }
}

template <typename C>
void select_thresholds(const void* base, const std::vector<const void*>& experts, int64_t n,
                       int64_t k, HistogramFn histogram, CollectFn collect, C* out) {
  using K = MagnitudeKey<C>;
  using Key = typename K::type;
  const int64_t num_experts = static_cast<int64_t>(experts.size());
  const std::vector<int64_t> cuts = cut_points(n, num_experts);
  const int64_t parts = static_cast<int64_t>(cuts.size()) - 1;
  const int64_t stride = num_experts * K::kBins;
  std::vector<uint32_t> hist(static_cast<size_t>(parts * stride), 0);
  run_parts(parts, [&](int p) {
    histogram(base, experts.data(), num_experts, cuts[p], cuts[p + 1], hist.data() + p * stride);
  });
  // Per expert: the bin of the k-th largest key (scanning from the top) and its rank there.
  std::vector<int64_t> bin(num_experts), rank(num_experts), size(num_experts);
  for (int64_t t = 0; t < num_experts; ++t) {
    int64_t above = 0;
    for (int64_t c = K::kBins - 1; c >= 0; --c) {
      int64_t count = 0;
      for (int64_t p = 0; p < parts; ++p) count += hist[p * stride + t * K::kBins + c];
      if (above + count >= k) {
        bin[t] = c;
        rank[t] = k - above;  // 1-based, from the top of the bin
        size[t] = count;
        break;
      }
      above += count;
    }
  }
  // Pass 2: every part writes its candidates at its offset (counts from its histogram).
  std::vector<std::vector<Key>> candidates(num_experts);
  for (int64_t t = 0; t < num_experts; ++t) candidates[t].resize(size[t]);
  std::vector<void*> dest(static_cast<size_t>(parts * num_experts));
  for (int64_t t = 0; t < num_experts; ++t) {
    int64_t offset = 0;
    for (int64_t p = 0; p < parts; ++p) {
      dest[p * num_experts + t] = candidates[t].data() + offset;
      offset += hist[p * stride + t * K::kBins + bin[t]];
    }
  }
  run_parts(parts, [&](int p) {
    collect(base, experts.data(), num_experts, cuts[p], cuts[p + 1], bin.data(),
            dest.data() + p * num_experts);
  });
  const int64_t workers = std::min<int64_t>(num_experts, get_num_threads());
  run_parts(workers, [&](int w) {
    for (int64_t t = w; t < num_experts; t += workers) {
      out[t] = K::value(select_from_top(candidates[t], rank[t], K::kShift));
    }
  });
}

}  // namespace

void magnitude_threshold(const void* base, const std::vector<const void*>& experts, int64_t n,
                         int32_t dtype, int64_t k, void* out) {
  if (experts.empty() || n <= 0 || k < 1 || k > n) return;
  switch (dtype) {
    case kFloat16:
      select_thresholds(base, experts, n, k, histogram_f16, collect_f16, static_cast<float*>(out));
      break;
    case kBFloat16:
      select_thresholds(base, experts, n, k, histogram_bf16, collect_bf16,
                        static_cast<float*>(out));
      break;
    case kFloat32:
      select_thresholds(base, experts, n, k, histogram_f32, collect_f32, static_cast<float*>(out));
      break;
    default:
      select_thresholds(base, experts, n, k, histogram_f64, collect_f64,
                        static_cast<double*>(out));
      break;
  }
}

}  // namespace fastmerge::cpu
