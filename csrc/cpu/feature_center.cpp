// The prologue of FeatureStats on the CPU: subtract the per-unit shift (in the GEMM's
// dtype) and accumulate float64 column sums and sums of squares in the same pass, so
// that the GEMM that follows reads small, centred values and no second pass is needed.
#include "feature_center.h"

#include <vector>

#include "cpu_loads.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/parallel.h"

namespace fastmerge::cpu {
namespace {

// Rows are cut into blocks of this many; each block's column sums are a separate partial,
// added up in block order, so the result does not depend on the thread count.
constexpr int64_t kRowBlock = 256;
// Below this many elements per thread (1 MiB of float32) a second thread does not pay.
constexpr int64_t kMinElementsPerThread = 1 << 18;

// Rows [r0, r1), whole rows (so the hardware prefetcher sees long streams), four rows
// per step: the float64 column sums are read and written once per four rows. O is the
// output (and subtraction) type; s is the shift already rounded to O.
template <int32_t DT, typename O>
__attribute__((always_inline)) inline void center_rows(const void* x, int64_t x_row_stride,
                                                       int64_t r0, int64_t r1, int64_t cols,
                                                       const O* s, void* out,
                                                       int64_t out_row_stride, double* s1,
                                                       double* s2) {
  using E = Element<DT>;
  using S = typename E::storage;
  for (int64_t j = 0; j < cols; ++j) {
    s1[j] = 0.0;
    s2[j] = 0.0;
  }
  const auto load = [](const S* p, int64_t j) { return static_cast<O>(E::load(p, j)); };
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const S* x0 = static_cast<const S*>(x) + r * x_row_stride;
    const S* x1 = x0 + x_row_stride;
    const S* x2 = x1 + x_row_stride;
    const S* x3 = x2 + x_row_stride;
    O* o0 = static_cast<O*>(out) + r * out_row_stride;
    O* o1 = o0 + out_row_stride;
    O* o2 = o1 + out_row_stride;
    O* o3 = o2 + out_row_stride;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      const O d0 = load(x0, j) - s[j], d1 = load(x1, j) - s[j];
      const O d2 = load(x2, j) - s[j], d3 = load(x3, j) - s[j];
      o0[j] = d0;
      o1[j] = d1;
      o2[j] = d2;
      o3[j] = d3;
      const double e0 = d0, e1 = d1, e2 = d2, e3 = d3;
      s1[j] += (e0 + e1) + (e2 + e3);
      s2[j] += (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3);
    }
  }
  for (; r < r1; ++r) {
    const S* x0 = static_cast<const S*>(x) + r * x_row_stride;
    O* o0 = static_cast<O*>(out) + r * out_row_stride;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      const O d = load(x0, j) - s[j];
      o0[j] = d;
      const double e = d;
      s1[j] += e;
      s2[j] += e * e;
    }
  }
}

template <int32_t DT, typename O>
FM_CPU_CLONES void center_clone(const void* x, int64_t xs, int64_t r0, int64_t r1, int64_t cols,
                                const void* s, void* out, int64_t os, double* s1, double* s2) {
  center_rows<DT, O>(x, xs, r0, r1, cols, static_cast<const O*>(s), out, os, s1, s2);
}

using CenterFn = decltype(&center_clone<kFloat32, float>);

// The output is float32 or float64 only: the centred features feed float GEMMs.
CenterFn center_for(int32_t dtype, int32_t out_dtype) {
  return dispatch_dtypes<AllDTypes, FloatDTypes>(
      dtype, "feature_center: dtype", out_dtype, "feature_center: out_dtype",
      [](auto x, auto o) -> CenterFn {
        return center_clone<decltype(x)::code, typename decltype(o)::compute>;
      });
}

}  // namespace

void feature_center(const void* x, int32_t dtype, int64_t rows, int64_t cols,
                    int64_t x_row_stride, const double* shift, void* out, int32_t out_dtype,
                    int64_t out_row_stride, double* sums) {
  if (cols <= 0) return;
  const CenterFn fn = center_for(dtype, out_dtype);
  // The shift rounded to the output type, once.
  std::vector<float> shift32;
  const void* s = shift;
  if (out_dtype != kFloat64) {
    shift32.assign(shift, shift + cols);
    s = shift32.data();
  }
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  std::vector<double> partials(static_cast<size_t>(blocks) * 2 * cols);
  std::vector<int64_t> prefix(blocks + 1);
  for (int64_t b = 0; b <= blocks; ++b) prefix[b] = (b * kRowBlock < rows ? b * kRowBlock : rows) * cols;
  parallel_ranges(blocks, prefix, kMinElementsPerThread, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t r0 = b * kRowBlock;
      const int64_t r1 = r0 + kRowBlock < rows ? r0 + kRowBlock : rows;
      double* p = partials.data() + 2 * b * cols;
      fn(x, x_row_stride, r0, r1, cols, s, out, out_row_stride, p, p + cols);
    }
  });
  for (int64_t j = 0; j < 2 * cols; ++j) sums[j] = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const double* p = partials.data() + 2 * b * cols;
    for (int64_t j = 0; j < 2 * cols; ++j) sums[j] += p[j];
  }
}

}  // namespace fastmerge::cpu
