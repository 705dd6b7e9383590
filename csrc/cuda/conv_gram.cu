// Gram and cross matrices of a convolution's im2col patches on the GPU, fused (implicit
// im2col): one block per 32 x 32 tile of the upper triangle of Z = B^T B, B = [patches | y]
// (fastmerge/conv_gram.h), and per slice of the samples. Each step gathers kStep samples
// of the tile's 32 rows and 32 columns straight from x and y into shared memory as double;
// each thread sums a 2 x 2 sub-tile in float64 and the slices are added with atomicAdd.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "fastmerge/conv_gram.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/dtypes.h"
#include "launchers.h"

namespace fastmerge::cuda {
namespace {

constexpr int kTileDim = 32;     // output tile: kTileDim x kTileDim entries
constexpr int kThreadsDim = 16;  // 16 x 16 threads, 2 x 2 entries each
constexpr int kStep = 16;        // samples per shared-memory step
constexpr int64_t kMaxSlices = 65535;
constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on grid.y (and grid.z)

template <typename T>
__global__ void __launch_bounds__(kThreadsDim* kThreadsDim)
    conv_gram_kernel(const T* __restrict__ x, const T* __restrict__ y, ConvGeometry g,
                     int64_t samples_per_slice, double* __restrict__ out) {
  const int64_t rows = g.features();
  const int64_t cols = g.columns();
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTileDim;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTileDim;
  if (col0 + kTileDim <= row0) return;  // wholly below the diagonal: the mirror fills it
  const int64_t m_begin = static_cast<int64_t>(blockIdx.z) * samples_per_slice;
  const int64_t samples = g.samples();
  const int64_t m_end = m_begin + samples_per_slice < samples ? m_begin + samples_per_slice
                                                              : samples;
  __shared__ double a[kStep][kTileDim];
  __shared__ double b[kStep][kTileDim + 1];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int tid = ty * kThreadsDim + tx;
  double acc[2][2] = {{0.0, 0.0}, {0.0, 0.0}};
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kStep) {
    // 256 threads load kStep x 32 values of each operand: two per thread per operand.
    for (int e = tid; e < kStep * kTileDim; e += kThreadsDim * kThreadsDim) {
      const int s = e / kTileDim;
      const int c = e - s * kTileDim;
      const int64_t m = m0 + s;
      const bool in_m = m < m_end;
      const int64_t r = row0 + c;
      const int64_t t = col0 + c;
      a[s][c] = (in_m && r < rows) ? conv_column_value(x, y, g, m, r) : 0.0;
      b[s][c] = (in_m && t < cols) ? conv_column_value(x, y, g, m, t) : 0.0;
    }
    __syncthreads();
#pragma unroll 4
    for (int s = 0; s < kStep; ++s) {
      const double a0 = a[s][ty], a1 = a[s][ty + kThreadsDim];
      const double b0 = b[s][tx], b1 = b[s][tx + kThreadsDim];
      acc[0][0] += a0 * b0;
      acc[0][1] += a0 * b1;
      acc[1][0] += a1 * b0;
      acc[1][1] += a1 * b1;
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < 2; ++u) {
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      const int64_t r = row0 + ty + u * kThreadsDim;
      const int64_t t = col0 + tx + v * kThreadsDim;
      if (r < rows && t < cols) atomicAdd(out + r * cols + t, acc[u][v]);
    }
  }
}

}  // namespace

void conv_gram(const void* x, const void* y, int32_t dtype, const int64_t* geometry,
               double* out, uintptr_t stream) {
  ConvGeometry g;
  int64_t* fields = &g.n;
  for (int k = 0; k < kConvGeometryFields; ++k) fields[k] = geometry[k];
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t rows = g.features();
  const int64_t cols = g.columns();
  if (rows == 0) return;
  const int64_t row_tiles = (rows + kTileDim - 1) / kTileDim;
  const int64_t col_tiles = (cols + kTileDim - 1) / kTileDim;
  // grid.y holds the row tiles (checked before any work is queued); grid.x, the column
  // tiles, stays far below 2**31 - 1 whenever the (rows, cols) output fits in memory.
  if (row_tiles > kMaxGridY) {
    throw std::invalid_argument("conv_gram: " + std::to_string(rows) +
                                " features (c_in * kh * kw + bias) need " +
                                std::to_string(row_tiles) +
                                " row tiles, more than CUDA's grid.y limit of 65535");
  }
  check(cudaMemsetAsync(out, 0, sizeof(double) * rows * cols, s), "conv_gram memset");
  const int64_t samples = g.samples();
  if (samples == 0) return;
  // Enough sample slices for about 4 blocks per SM on a large GPU, at least 256 samples each.
  const int64_t tiles = row_tiles * col_tiles;
  int64_t slices = (4 * 132 + tiles - 1) / tiles;
  const int64_t max_slices = (samples + 255) / 256;
  slices = slices < max_slices ? slices : max_slices;
  slices = slices < kMaxSlices ? (slices > 0 ? slices : 1) : kMaxSlices;
  int64_t per_slice = (samples + slices - 1) / slices;
  per_slice = (per_slice + kStep - 1) / kStep * kStep;
  slices = (samples + per_slice - 1) / per_slice;
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles),
                  static_cast<unsigned>(slices));
  const dim3 block(kThreadsDim, kThreadsDim);
  dispatch_dtype<FloatDTypes>(dtype, "conv_gram: dtype", [&](auto tag) {
    using T = typename decltype(tag)::compute;  // float32 / float64 buffers, as they are
    conv_gram_kernel<T><<<grid, block, 0, s>>>(static_cast<const T*>(x),
                                               static_cast<const T*>(y), g, per_slice, out);
  });
  check(cudaGetLastError(), "conv_gram launch");
}

}  // namespace fastmerge::cuda
