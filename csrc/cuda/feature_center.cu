// The prologue of FeatureStats on the GPU: out = x - shift in the GEMM's dtype, and
// float64 column sums and sums of squares of what was stored, in one pass.
//
// Blocks of 32 columns x 8 row lanes (a warp reads 32 consecutive columns of one row,
// coalesced); blockIdx.y picks a split of the rows. Each block writes its split's sums
// to partials[split] and the caller adds the splits up in order (deterministic).
#include <cuda_runtime.h>

#include "cuda_check.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/dtypes.h"
#include "launchers.h"

namespace fastmerge::cuda {
namespace {

constexpr int kColumns = 32;
constexpr int kLanes = 8;

template <int32_t DT, typename O>
__global__ void __launch_bounds__(kColumns* kLanes)
    feature_center_kernel(const void* __restrict__ x, int64_t rows, int64_t cols,
                          int64_t x_row_stride, const double* __restrict__ shift,
                          O* __restrict__ out, int64_t out_row_stride, int64_t rows_per_split,
                          double* __restrict__ partials) {
  __shared__ double s1_lanes[kLanes][kColumns + 1];
  __shared__ double s2_lanes[kLanes][kColumns + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColumns + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < rows ? r0 + rows_per_split : rows;
  double s1 = 0.0, s2 = 0.0;
  if (j < cols) {
    const O s = static_cast<O>(shift[j]);
    for (int64_t r = r0 + ty; r < r1; r += kLanes) {
      const O d = static_cast<O>(load_as_double<DT>(x, r * x_row_stride + j)) - s;
      out[r * out_row_stride + j] = d;
      const double dd = d;
      s1 += dd;
      s2 += dd * dd;
    }
  }
  s1_lanes[ty][tx] = s1;
  s2_lanes[ty][tx] = s2;
  __syncthreads();
  if (ty == 0 && j < cols) {
    double t1 = 0.0, t2 = 0.0;
    for (int l = 0; l < kLanes; ++l) {
      t1 += s1_lanes[l][tx];
      t2 += s2_lanes[l][tx];
    }
    partials[(2 * static_cast<int64_t>(blockIdx.y)) * cols + j] = t1;
    partials[(2 * static_cast<int64_t>(blockIdx.y) + 1) * cols + j] = t2;
  }
}

template <int32_t DT, typename O>
void launch(const void* x, int64_t rows, int64_t cols, int64_t x_row_stride, const double* shift,
            void* out, int64_t out_row_stride, int64_t splits, double* partials,
            cudaStream_t stream) {
  const int64_t rows_per_split = (rows + splits - 1) / splits;
  const dim3 grid(static_cast<unsigned>((cols + kColumns - 1) / kColumns),
                  static_cast<unsigned>(splits));
  feature_center_kernel<DT, O><<<grid, dim3(kColumns, kLanes), 0, stream>>>(
      x, rows, cols, x_row_stride, shift, static_cast<O*>(out), out_row_stride,
      rows_per_split > 0 ? rows_per_split : 1, partials);
}

}  // namespace

void feature_center(const void* x, int32_t dtype, int64_t rows, int64_t cols,
                    int64_t x_row_stride, const double* shift, void* out, int32_t out_dtype,
                    int64_t out_row_stride, int64_t splits, double* partials,
                    uintptr_t stream) {
  if (cols <= 0 || splits <= 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtypes<AllDTypes, FloatDTypes>(
      dtype, "feature_center: dtype", out_dtype, "feature_center: out_dtype",
      [&](auto in, auto o) {
        launch<decltype(in)::code, typename decltype(o)::compute>(
            x, rows, cols, x_row_stride, shift, out, out_row_stride, splits, partials, s);
      });
  check(cudaGetLastError(), "feature_center launch");
}

}  // namespace fastmerge::cuda
