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
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

#include "cpu_loads.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/magnitude.h"
#include "fastmerge/parallel.h"

namespace fastmerge::cpu {
namespace {

// Elements per block: the base block and one expert's keys stay in L1.
constexpr int64_t kBlock = 1024;
// Below this many input elements (base and experts) per thread a second thread does not pay.
constexpr int64_t kMinElementsPerThread = 1 << 18;
// The one-pass selection samples kSampleChunks chunks of kSampleChunk contiguous entries;
// tensors smaller than kSampleMinElements take the two-pass selection directly.
constexpr int64_t kSampleChunks = 64;
constexpr int64_t kSampleChunk = 512;
constexpr int64_t kSampleMinElements = 1 << 18;
// Up to this many expert entries in all, one thread computes every key and runs
// nth_element: for tiny tensors (a 16-entry merge) the histograms' zeroing and a thread
// team cost a hundred times more than the selection itself.
constexpr int64_t kSmallSelection = 1 << 14;

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

// The one-pass path, over [i0, i1): for every expert t, above[t] += the keys > hi[t], and
// the keys in [lo[t], hi[t]] (the band around the sampled estimate of the k-th largest)
// are appended to band[t] (used[t] of its entries are keys). Both compares vectorize; band keys are few (a few percent), so
// the marks are scanned 8 at a time as in collect_range.
template <int32_t DT>
__attribute__((always_inline)) inline void band_range(
    const void* base, const void* const* experts, int64_t num_experts, int64_t i0, int64_t i1,
    const typename MagnitudeKey<Compute<DT>>::type* lo,
    const typename MagnitudeKey<Compute<DT>>::type* hi, int64_t* above,
    std::vector<typename MagnitudeKey<Compute<DT>>::type>* band, int64_t* used) {
  using Key = typename MagnitudeKey<Compute<DT>>::type;
  Compute<DT> b[kBlock];
  Key keys[kBlock];
  alignas(8) uint8_t match[kBlock];
  for (int64_t j0 = i0; j0 < i1; j0 += kBlock) {
    const int64_t len = std::min(kBlock, i1 - j0);
    const Compute<DT>* bb = base_block<DT>(base, j0, len, b);
    for (int64_t t = 0; t < num_experts; ++t) {
      block_keys<DT>(experts[t], j0, len, bb, keys);
      const Key l = lo[t], h = hi[t];
      int64_t count = 0;
#pragma omp simd reduction(+ : count)
      for (int64_t j = 0; j < len; ++j) {
        count += keys[j] > h;
        match[j] = (keys[j] >= l) & (keys[j] <= h);
      }
      for (int64_t j = len; j < kBlock; ++j) match[j] = 0;
      above[t] += count;
      // band[t] holds its keys then spare room (its size is the room); used[t] counts
      // the keys. Room for a whole block is made before it, so the scan writes freely.
      auto& out = band[t];
      if (used[t] + len > static_cast<int64_t>(out.size())) out.resize(2 * out.size() + kBlock);
      Key* dst = out.data() + used[t];
      int64_t m = 0;
      for (int64_t j = 0; j < len; j += 8) {
        uint64_t word;
        std::memcpy(&word, match + j, sizeof(word));
        while (word != 0) {
          dst[m++] = keys[j + (__builtin_ctzll(word) >> 3)];
          word &= word - 1;
        }
      }
      used[t] += m;
    }
  }
}

// The keys of [i0, i0 + len) of every expert: out[t * len + j].
template <int32_t DT>
__attribute__((always_inline)) inline void sample_range(
    const void* base, const void* const* experts, int64_t num_experts, int64_t i0, int64_t len,
    typename MagnitudeKey<Compute<DT>>::type* out) {
  Compute<DT> b[kBlock];
  for (int64_t j0 = i0; j0 < i0 + len; j0 += kBlock) {
    const int64_t m = std::min(kBlock, i0 + len - j0);
    const Compute<DT>* bb = base_block<DT>(base, j0, m, b);
    for (int64_t t = 0; t < num_experts; ++t) {
      block_keys<DT>(experts[t], j0, m, bb, out + t * len + (j0 - i0));
    }
  }
}

// The rank-th largest (1-based) of `keys`, all in [lo, hi]: a histogram of (key - lo) in
// at most 4,096 bins first, then nth_element on the one bin that holds it. Exact.
template <typename Key>
Key select_in_range(std::vector<Key>& keys, int64_t rank, Key lo, Key hi) {
  int shift = 0;
  while (((hi - lo) >> shift) >= 4096) ++shift;
  const int64_t bins = static_cast<int64_t>((hi - lo) >> shift) + 1;
  if (static_cast<int64_t>(keys.size()) > 4 * bins) {
    std::vector<uint32_t> count(bins, 0);
    for (const Key k : keys) ++count[(k - lo) >> shift];
    int64_t above = 0, bin = bins - 1;
    for (; bin > 0; --bin) {
      if (above + count[bin] >= rank) break;
      above += count[bin];
    }
    std::vector<Key> in_bin;
    in_bin.reserve(count[bin]);
    for (const Key k : keys) {
      if (static_cast<int64_t>((k - lo) >> shift) == bin) in_bin.push_back(k);
    }
    keys.swap(in_bin);
    rank -= above;
  }
  auto nth = keys.begin() + (rank - 1);
  std::nth_element(keys.begin(), nth, keys.end(), std::greater<Key>());
  return *nth;
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
using BandFn = void (*)(const void*, const void* const*, int64_t, int64_t, int64_t, const void*,
                        const void*, int64_t*, void*, int64_t*);
using SampleFn = void (*)(const void*, const void* const*, int64_t, int64_t, int64_t, void*);

struct Kernels {
  HistogramFn histogram;
  CollectFn collect;
  BandFn band;
  SampleFn sample;
};

template <int32_t DT>
FM_CPU_CLONES void histogram_clone(const void* base, const void* const* experts, int64_t t,
                                   int64_t i0, int64_t i1, uint32_t* hist) {
  histogram_range<DT>(base, experts, t, i0, i1, hist);
}
template <int32_t DT>
FM_CPU_CLONES void collect_clone(const void* base, const void* const* experts, int64_t t,
                                 int64_t i0, int64_t i1, const int64_t* bin, void* const* dest) {
  using Key = typename MagnitudeKey<Compute<DT>>::type;
  collect_range<DT>(base, experts, t, i0, i1, bin, reinterpret_cast<Key* const*>(dest));
}
template <int32_t DT>
FM_CPU_CLONES void band_clone(const void* base, const void* const* experts, int64_t t,
                              int64_t i0, int64_t i1, const void* lo, const void* hi,
                              int64_t* above, void* band, int64_t* used) {
  using Key = typename MagnitudeKey<Compute<DT>>::type;
  band_range<DT>(base, experts, t, i0, i1, static_cast<const Key*>(lo),
                 static_cast<const Key*>(hi), above, static_cast<std::vector<Key>*>(band), used);
}
template <int32_t DT>
FM_CPU_CLONES void sample_clone(const void* base, const void* const* experts, int64_t t,
                                int64_t i0, int64_t len, void* out) {
  using Key = typename MagnitudeKey<Compute<DT>>::type;
  sample_range<DT>(base, experts, t, i0, len, static_cast<Key*>(out));
}

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

// The one-pass selection: a sample of contiguous chunks estimates each expert's k-th
// largest key and a band around it wide enough to hold it unless the sample misleads;
// one pass counts the keys above the band and gathers the band's keys. When the count
// shows the k-th largest inside the band (nearly always), it is selected among the band's
// keys and out[t] is set; returns false (nothing set) for an expert where it is not, and
// the caller falls back to the exact two-pass histogram selection. Exact either way.
template <typename C>
bool select_by_band(const void* base, const std::vector<const void*>& experts, int64_t n,
                    int64_t k, const Kernels& fn, const std::vector<int64_t>& cuts, C* out) {
  using K = MagnitudeKey<C>;
  using Key = typename K::type;
  const int64_t num_experts = static_cast<int64_t>(experts.size());
  const int64_t parts = static_cast<int64_t>(cuts.size()) - 1;
  const int64_t sample = kSampleChunks * kSampleChunk;
  std::vector<Key> keys(static_cast<size_t>(num_experts * sample));
  std::vector<Key> chunk(static_cast<size_t>(num_experts * kSampleChunk));
  for (int64_t c = 0; c < kSampleChunks; ++c) {
    const int64_t i0 = (n - kSampleChunk) * c / (kSampleChunks - 1);
    fn.sample(base, experts.data(), num_experts, i0, kSampleChunk, chunk.data());
    for (int64_t t = 0; t < num_experts; ++t) {
      std::copy(chunk.begin() + t * kSampleChunk, chunk.begin() + (t + 1) * kSampleChunk,
                keys.begin() + t * sample + c * kSampleChunk);
    }
  }
  // Band in sample ranks: the estimate +- 6 binomial standard deviations, + 0.4% of the
  // sample (chunks are not independent draws), + 16.
  const double p = static_cast<double>(k) / static_cast<double>(n);
  const int64_t r = std::clamp<int64_t>(std::llround(p * sample), 1, sample);
  const int64_t delta = static_cast<int64_t>(6.0 * std::sqrt(sample * p * (1.0 - p))) +
                        sample / 256 + 16;
  std::vector<Key> lo(num_experts), hi(num_experts);
  for (int64_t t = 0; t < num_experts; ++t) {
    auto first = keys.begin() + t * sample, last = first + sample;
    hi[t] = std::numeric_limits<Key>::max();
    lo[t] = Key(0);
    if (r - delta >= 1) {
      std::nth_element(first, first + (r - delta - 1), last, std::greater<Key>());
      hi[t] = first[r - delta - 1];
    }
    if (r + delta <= sample) {
      std::nth_element(first, first + (r + delta - 1), last, std::greater<Key>());
      lo[t] = first[r + delta - 1];
    }
  }
  std::vector<int64_t> above(static_cast<size_t>(parts * num_experts), 0);
  std::vector<int64_t> used(static_cast<size_t>(parts * num_experts), 0);
  std::vector<std::vector<Key>> band(static_cast<size_t>(parts * num_experts));
  const double band_share = std::min(1.0, (2.0 * delta + 1.0) / sample);
  for (auto& b : band) b.resize(static_cast<size_t>(1.25 * band_share * (n / parts)) + kBlock);
  run_parts(parts, [&](int q) {
    fn.band(base, experts.data(), num_experts, cuts[q], cuts[q + 1], lo.data(), hi.data(),
            above.data() + q * num_experts, band.data() + q * num_experts,
            used.data() + q * num_experts);
  });
  std::vector<int64_t> rank(num_experts, -1);
  std::vector<std::vector<Key>> merged(num_experts);
  bool all = true;
  for (int64_t t = 0; t < num_experts; ++t) {
    int64_t count_above = 0, count_band = 0;
    for (int64_t q = 0; q < parts; ++q) {
      count_above += above[q * num_experts + t];
      count_band += used[q * num_experts + t];
    }
    if (count_above < k && k <= count_above + count_band) {
      rank[t] = k - count_above;
      merged[t].reserve(count_band);
      for (int64_t q = 0; q < parts; ++q) {
        auto& b = band[q * num_experts + t];
        merged[t].insert(merged[t].end(), b.begin(), b.begin() + used[q * num_experts + t]);
        std::vector<Key>().swap(b);
      }
    } else {
      all = false;
    }
  }
  if (!all) return false;
  const int64_t workers = std::min<int64_t>(num_experts, get_num_threads());
  run_parts(workers, [&](int w) {
    for (int64_t t = w; t < num_experts; t += workers) {
      out[t] = K::value(select_in_range(merged[t], rank[t], lo[t], hi[t]));
    }
  });
  return true;
}

template <typename C>
void select_thresholds(const void* base, const std::vector<const void*>& experts, int64_t n,
                       int64_t k, const Kernels& fn, C* out) {
  using K = MagnitudeKey<C>;
  using Key = typename K::type;
  const int64_t num_experts = static_cast<int64_t>(experts.size());
  const std::vector<int64_t> cuts = cut_points(n, num_experts);
  const int64_t parts = static_cast<int64_t>(cuts.size()) - 1;
  if (n >= kSampleMinElements && select_by_band(base, experts, n, k, fn, cuts, out)) return;
  const HistogramFn histogram = fn.histogram;
  const CollectFn collect = fn.collect;
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

// The exact selection for small tensors (kSmallSelection): the same keys, nth_element.
template <int32_t DT>
void small_thresholds(const void* base, const std::vector<const void*>& experts, int64_t n,
                      int64_t k, Compute<DT>* out) {
  using K = MagnitudeKey<Compute<DT>>;
  std::vector<Compute<DT>> widened(static_cast<size_t>(n));
  const Compute<DT>* b = base_block<DT>(base, 0, n, widened.data());
  std::vector<typename K::type> keys(static_cast<size_t>(n));
  for (size_t t = 0; t < experts.size(); ++t) {
    block_keys<DT>(experts[t], 0, n, b, keys.data());
    const auto nth = keys.begin() + (k - 1);
    std::nth_element(keys.begin(), nth, keys.end(), std::greater<typename K::type>());
    out[t] = K::value(*nth);
  }
}

}  // namespace

void magnitude_threshold(const void* base, const std::vector<const void*>& experts, int64_t n,
                         int32_t dtype, int64_t k, void* out) {
  if (experts.empty() || n <= 0 || k < 1 || k > n) return;
  dispatch_dtype(dtype, "magnitude_threshold: dtype", [&](auto tag) {
    constexpr int32_t DT = decltype(tag)::code;
    using C = typename decltype(tag)::compute;
    if (n * static_cast<int64_t>(experts.size()) <= kSmallSelection) {
      small_thresholds<DT>(base, experts, n, k, static_cast<C*>(out));
      return;
    }
    select_thresholds(base, experts, n, k,
                      Kernels{histogram_clone<DT>, collect_clone<DT>, band_clone<DT>,
                              sample_clone<DT>},
                      static_cast<C*>(out));
  });
}

}  // namespace fastmerge::cpu
