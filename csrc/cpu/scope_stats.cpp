// Fused weight-scope statistics on the CPU: mean, population std and count of every
// tensor in a list, in one parallel pass over a shared chunk table.
#include "scope_stats.h"

#include <vector>

#include "cpu_loads.h"
#include "fastmerge/chunks.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/moments.h"
#include "fastmerge/parallel.h"

namespace fastmerge::cpu {
namespace {

// Elements per chunk: 256 KiB of float32, small enough to balance two threads on a
// 25M-parameter model and large enough that per-chunk overhead is invisible.
constexpr int64_t kChunkSize = 1 << 16;
// Below this many elements per thread (1 MiB of float32) waking a second thread
// costs more, and varies more, than the work it takes over.
constexpr int64_t kMinElementsPerThread = 1 << 18;
constexpr const char* kDTypesName = "scope_stats: dtypes";

// Shifted sums over one chunk in double. `omp simd reduction` (-fopenmp-simd, no
// OpenMP runtime) lets the compiler keep vector accumulators, which plain -O3 may not
// do for a floating-point sum; the shift keeps the result accurate regardless.
template <int32_t DT>
__attribute__((always_inline)) inline Moments chunk_moments(const void* data, int64_t begin,
                                                            int64_t length) {
  using E = Element<DT>;
  const auto* x = static_cast<const typename E::storage*>(data) + begin;
  const double shift = E::load(x, 0);
  double s1 = 0.0, s2 = 0.0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t i = 0; i < length; ++i) {
    const double d = E::load(x, i) - shift;
    s1 += d;
    s2 += d * d;
  }
  return moments_from_shifted_sums(static_cast<double>(length), shift, s1, s2);
}

template <int32_t DT>
FM_CPU_CLONES Moments chunk_moments_clone(const void* d, int64_t b, int64_t n) {
  return chunk_moments<DT>(d, b, n);
}

}  // namespace

void scope_stats(const std::vector<const void*>& data, const std::vector<int64_t>& numels,
                 const std::vector<int32_t>& dtypes, double* out_mean, double* out_std,
                 double* out_count) {
  for (const int32_t code : dtypes) check_dtype(code, kDTypesName);  // before the workers
  const std::vector<Chunk> chunks = plan_chunks(numels, kChunkSize);
  const std::vector<int64_t> offsets = chunk_offsets(chunks);
  std::vector<Moments> partials(chunks.size());
  parallel_ranges(static_cast<int64_t>(chunks.size()), offsets, kMinElementsPerThread,
                  [&](int64_t first, int64_t last) {
                    for (int64_t c = first; c < last; ++c) {
                      const Chunk& ck = chunks[c];
                      partials[c] = dispatch_dtype(
                          dtypes[ck.tensor], kDTypesName, [&](auto tag) {
                            return chunk_moments_clone<decltype(tag)::code>(
                                data[ck.tensor], ck.begin, ck.length);
                          });
                    }
                  });
  // Merge each tensor's chunks in chunk order: the same answer for any thread count.
  std::vector<Moments> totals(numels.size(), Moments{0.0, NAN, NAN});
  for (size_t c = 0; c < chunks.size(); ++c) {
    Moments& total = totals[chunks[c].tensor];
    total = chan_merge(total, partials[c]);
  }
  for (size_t t = 0; t < numels.size(); ++t) {
    out_mean[t] = totals[t].mean;
    out_std[t] = population_std(totals[t]);
    out_count[t] = static_cast<double>(numels[t]);
  }
}

}  // namespace fastmerge::cpu
