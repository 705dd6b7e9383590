// Fused backward of scope-based penalties (the WSA regularizer) on the CPU.
//
// d/dw of f(mean_t, std_t) is affine in (w - mean_t) for every element of tensor t,
// so one pass over the chunk table writes every tensor's gradient.
#include "scope_grad.h"

#include "cpu_loads.h"
#include "fastmerge/chunks.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/parallel.h"

namespace fastmerge::cpu {
namespace {

constexpr int64_t kChunkSize = 1 << 16;
constexpr int64_t kMinElementsPerThread = 1 << 18;
constexpr const char* kDTypesName = "scope_grad: dtypes";

// Half-precision and float32 tensors compute in float32 (E::compute); float64 in double.
template <int32_t DT>
__attribute__((always_inline)) inline void affine_chunk(const void* x, void* out, int64_t begin,
                                                        int64_t length, double mean,
                                                        double alpha, double beta) {
  using E = Element<DT>;
  using C = typename E::compute;
  const auto* src = static_cast<const typename E::storage*>(x) + begin;
  auto* dst = static_cast<typename E::storage*>(out) + begin;
  const C m = static_cast<C>(mean), a = static_cast<C>(alpha), b = static_cast<C>(beta);
#pragma omp simd
  for (int64_t i = 0; i < length; ++i) {
    E::store(dst, i, a + b * (static_cast<C>(E::load(src, i)) - m));
  }
}

template <int32_t DT>
FM_CPU_CLONES void affine_clone(const void* x, void* o, int64_t b, int64_t n, double m, double a,
                                double s) {
  affine_chunk<DT>(x, o, b, n, m, a, s);
}

}  // namespace

void scope_grad(const std::vector<const void*>& x, const std::vector<void*>& out,
                const std::vector<int64_t>& numels, const std::vector<int32_t>& dtypes,
                const double* mean, const double* alpha, const double* beta) {
  for (const int32_t code : dtypes) check_dtype(code, kDTypesName);  // before the workers
  const std::vector<Chunk> chunks = plan_chunks(numels, kChunkSize);
  const std::vector<int64_t> offsets = chunk_offsets(chunks);
  parallel_ranges(static_cast<int64_t>(chunks.size()), offsets, kMinElementsPerThread,
                  [&](int64_t first, int64_t last) {
                    for (int64_t c = first; c < last; ++c) {
                      const Chunk& ck = chunks[c];
                      const int32_t t = ck.tensor;
                      dispatch_dtype(dtypes[t], kDTypesName, [&](auto tag) {
                        affine_clone<decltype(tag)::code>(x[t], out[t], ck.begin, ck.length,
                                                          mean[t], alpha[t], beta[t]);
                      });
                    }
                  });
}

}  // namespace fastmerge::cpu
