// Fused epilogue of the feature-matching costs on the GPU: one elementwise launch turns
// the accumulated cross-products into covariance, correlation, inner product or negative
// squared distance (fastmerge/feature_cost.h), with no temporaries.
#include <cuda_runtime.h>

#include "cuda_check.h"
#include "fastmerge/feature_cost.h"
#include "launchers.h"

namespace fastmerge::cuda {
namespace {

constexpr int kThreads = 256;
// Rows per block: each thread derives its column's moments once and reuses them.
constexpr int kRowsPerBlock = 8;
constexpr int64_t kMaxGridY = 65535;

// One thread per column, kRowsPerBlock rows per step; the rows' moments are derived
// once per block into shared memory. Blocks stride over the rows.
template <int32_t KIND>
__global__ void __launch_bounds__(kThreads)
    feature_cost_kernel(const double* __restrict__ cross, int64_t rows, int64_t cols,
                        const double* __restrict__ sum_a, const double* __restrict__ sum_b,
                        const double* __restrict__ sumsq_a, const double* __restrict__ sumsq_b,
                        const double* __restrict__ shift_a, const double* __restrict__ shift_b,
                        double inv_n, double* __restrict__ out) {
  __shared__ UnitMoments row_moments[kRowsPerBlock];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = j < cols;
  const UnitMoments b = unit_moments(active ? sum_b[j] : 0.0, active ? sumsq_b[j] : 0.0,
                                     active ? shift_b[j] : 0.0, inv_n);
  for (int64_t first = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock; first < rows;
       first += static_cast<int64_t>(gridDim.y) * kRowsPerBlock) {
    const int64_t count = rows - first < kRowsPerBlock ? rows - first : kRowsPerBlock;
    __syncthreads();  // the previous step is done with row_moments
    if (threadIdx.x < count) {
      const int64_t i = first + threadIdx.x;
      row_moments[threadIdx.x] = unit_moments(sum_a[i], sumsq_a[i], shift_a[i], inv_n);
    }
    __syncthreads();
    if (!active) continue;
    for (int64_t k = 0; k < count; ++k) {
      const int64_t index = (first + k) * cols + j;
      out[index] = feature_cost_entry<KIND>(cross[index], row_moments[k], b, inv_n);
    }
  }
}

}  // namespace

void feature_cost(const double* cross, int64_t rows, int64_t cols, const double* sum_a,
                  const double* sum_b, const double* sumsq_a, const double* sumsq_b,
                  const double* shift_a, const double* shift_b, double count, int32_t kind,
                  double* out, uintptr_t stream) {
  if (rows <= 0 || cols <= 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t row_blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const dim3 grid(static_cast<unsigned>((cols + kThreads - 1) / kThreads),
                  static_cast<unsigned>(row_blocks < kMaxGridY ? row_blocks : kMaxGridY));
  const double inv_n = 1.0 / count;
#define FM_LAUNCH(KIND)                                                                    \
  feature_cost_kernel<KIND><<<grid, kThreads, 0, s>>>(cross, rows, cols, sum_a, sum_b,     \
                                                      sumsq_a, sumsq_b, shift_a, shift_b, \
                                                      inv_n, out)
  switch (kind) {
    case kCovariance:
      FM_LAUNCH(kCovariance);
      break;
    case kCorrelation:
      FM_LAUNCH(kCorrelation);
      break;
    case kInnerProduct:
      FM_LAUNCH(kInnerProduct);
      break;
    default:
      FM_LAUNCH(kNegSqDistance);
  }
#undef FM_LAUNCH
  check(cudaGetLastError(), "feature_cost launch");
}

}  // namespace fastmerge::cuda
