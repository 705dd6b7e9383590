// Gram and cross matrices of a convolution's im2col patches on the CPU, fused: each thread
// owns a block of output rows, gathers tiles of kTile samples of the columns it needs into
// a feature-major float64 buffer (never the whole unfolded tensor), and adds the dot
// products of its rows with every later column, four rows at a time.
#include "conv_gram.h"

#include <algorithm>
#include <vector>

#include "cpu_loads.h"  // FM_CPU_CLONES
#include "fastmerge/dispatch.h"
#include "fastmerge/dtypes.h"
#include "fastmerge/parallel.h"

namespace fastmerge::cpu {
namespace {

// Samples per gathered tile: one row of the tile is 2 KiB of float64.
constexpr int64_t kTile = 256;
// Below this many multiply-adds per sample per thread a second thread is not worth it.
constexpr int64_t kMinWeightPerThread = 1 << 12;

// tile[(t - first_col) * kTile + s] = column t of sample m0 + s, for t in [first_col, cols).
template <typename T>
void gather(const T* x, const T* y, const ConvGeometry& g, int64_t m0, int64_t count,
            int64_t first_col, double* tile) {
  const int64_t cols = g.columns();
  for (int64_t t = first_col; t < cols; ++t) {
    double* row = tile + (t - first_col) * kTile;
    for (int64_t s = 0; s < count; ++s) row[s] = conv_column_value(x, y, g, m0 + s, t);
    for (int64_t s = count; s < kTile; ++s) row[s] = 0.0;
  }
}

// out[i, t] += <tile row i, tile row t> for i in [first, last) and t >= i (and a few
// entries just below the diagonal, in the same block of four rows).
FM_CPU_CLONES void accumulate(const double* tile, int64_t first_col, int64_t first, int64_t last,
                              int64_t cols, double* out) {
  auto row = [&](int64_t t) { return tile + (t - first_col) * kTile; };
  int64_t i = first;
  for (; i + 4 <= last; i += 4) {
    const double* a0 = row(i);
    const double* a1 = row(i + 1);
    const double* a2 = row(i + 2);
    const double* a3 = row(i + 3);
    for (int64_t t = i; t < cols; ++t) {
      const double* b = row(t);
      double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t s = 0; s < kTile; ++s) {
        s0 += a0[s] * b[s];
        s1 += a1[s] * b[s];
        s2 += a2[s] * b[s];
        s3 += a3[s] * b[s];
      }
      out[i * cols + t] += s0;
      out[(i + 1) * cols + t] += s1;
      out[(i + 2) * cols + t] += s2;
      out[(i + 3) * cols + t] += s3;
    }
  }
  for (; i < last; ++i) {
    const double* a = row(i);
    for (int64_t t = i; t < cols; ++t) {
      const double* b = row(t);
      double s0 = 0;
#pragma omp simd reduction(+ : s0)
      for (int64_t s = 0; s < kTile; ++s) s0 += a[s] * b[s];
      out[i * cols + t] += s0;
    }
  }
}

template <typename T>
void run(const T* x, const T* y, const ConvGeometry& g, double* out) {
  const int64_t rows = g.features();
  const int64_t cols = g.columns();
  const int64_t samples = g.samples();
  std::fill(out, out + rows * cols, 0.0);
  if (rows == 0 || samples == 0) return;
  // Work of row i: cols - i dot products per sample.
  std::vector<int64_t> prefix(rows + 1, 0);
  for (int64_t i = 0; i < rows; ++i) prefix[i + 1] = prefix[i] + (cols - i);
  parallel_ranges(rows, prefix, kMinWeightPerThread, [&](int64_t first, int64_t last) {
    std::vector<double> tile((cols - first) * kTile);
    for (int64_t m0 = 0; m0 < samples; m0 += kTile) {
      const int64_t count = std::min(kTile, samples - m0);
      gather(x, y, g, m0, count, first, tile.data());
      accumulate(tile.data(), first, first, last, cols, out);
    }
  });
}

}  // namespace

void conv_gram(const void* x, const void* y, int32_t dtype, const ConvGeometry& geometry,
               double* out) {
  dispatch_dtype<FloatDTypes>(dtype, "conv_gram: dtype", [&](auto tag) {
    using T = typename decltype(tag)::compute;  // float32 / float64 buffers, as they are
    run(static_cast<const T*>(x), static_cast<const T*>(y), geometry, out);
  });
}

}  // namespace fastmerge::cpu
