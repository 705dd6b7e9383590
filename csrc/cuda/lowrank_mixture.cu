// The gated low-rank part of fastmerge.lowrank_mixture on the GPU (the base x W^T + b is
// a cuBLAS GEMM issued by torch before these kernels run):
//
//   kernel 1 (down): down[m, t r + k] = g[m / tokens, t] * (x[m] . vs[t, k])
//   kernel 2 (up):   y[m, o] += sum_t sum_k down[m, t r + k] * us[t, o, k]
//
// Both are shared-memory tiled products with 16 x 16 threads. A block first asks whether
// any row of its tile has a non-zero gate for a task (one __syncthreads_or) and skips the
// task otherwise, so top-k routing pays only for the selected tasks' factors in tiles
// whose samples agree. Inputs of any supported dtype are accumulated in float (double for
// float64); `down` and `y` are float (double) buffers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/dtypes.h"
#include "launchers.h"

namespace fastmerge::cuda {
namespace {

constexpr int kSide = 16;  // threads per tile side
constexpr int kThreads = kSide * kSide;
// Down tile: 64 rows x 32 ranks (a rank of 10% of a 768 layer is 77: 3 tiles), depth 16.
constexpr int kDownRows = 64;
constexpr int kDownRanks = 32;
constexpr int kDownDepth = 16;
// Up tile: 64 rows x 64 outputs, depth 16 over one task's ranks.
constexpr int kUpRows = 64;
constexpr int kUpCols = 64;
constexpr int kUpDepth = 16;

// Element i as the accumulation type; half types through the hardware conversions (the
// portable bit-level ones in dtypes.h cost registers that made the tile loops spill).
template <int32_t DT, typename Acc>
__device__ __forceinline__ Acc load(const void* data, int64_t i) {
  if constexpr (DT == kFloat16) {
    return static_cast<Acc>(__half2float(static_cast<const __half*>(data)[i]));
  } else if constexpr (DT == kBFloat16) {
    return static_cast<Acc>(__bfloat162float(static_cast<const __nv_bfloat16*>(data)[i]));
  } else if constexpr (DT == kFloat32) {
    return static_cast<Acc>(static_cast<const float*>(data)[i]);
  } else {
    return static_cast<Acc>(static_cast<const double*>(data)[i]);
  }
}

// True when row m's sample has a non-zero gate for `task`.
template <int32_t DT, typename Acc>
__device__ __forceinline__ bool routed(const void* gates, int64_t m, int64_t rows,
                                       int64_t tokens, int64_t tasks, int64_t task) {
  return m < rows && load<DT, Acc>(gates, (m / tokens) * tasks + task) != Acc(0);
}

template <int32_t DT, typename Acc>
__global__ void __launch_bounds__(kThreads)
    lowrank_down_kernel(const void* __restrict__ x, const void* __restrict__ vs,
                        const void* __restrict__ gates, Acc* __restrict__ down, int64_t rows,
                        int64_t d_in, int64_t tasks, int64_t rank, int64_t tokens) {
  // Stored depth-major (+1 padding): the inner product reads a row of each.
  __shared__ Acc x_tile[kDownDepth][kDownRows + 1];
  __shared__ Acc v_tile[kDownDepth][kDownRanks + 1];
  const int tid = threadIdx.x, tx = tid % kSide, ty = tid / kSide;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kDownRows;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kDownRanks;
  const int64_t task = blockIdx.z;
  const int64_t width = tasks * rank;
  const bool mine = tid < kDownRows && routed<DT, Acc>(gates, m0 + tid, rows, tokens, tasks, task);
  if (!__syncthreads_or(mine)) {
    // No sample of this tile uses the task: its slice of `down` is zero.
    for (int e = tid; e < kDownRows * kDownRanks; e += kThreads) {
      const int64_t m = m0 + e / kDownRanks, k = k0 + e % kDownRanks;
      if (m < rows && k < rank) down[m * width + task * rank + k] = Acc(0);
    }
    return;
  }
  Acc acc[kDownRows / kSide][kDownRanks / kSide] = {};
  for (int64_t d0 = 0; d0 < d_in; d0 += kDownDepth) {
    for (int e = tid; e < kDownRows * kDownDepth; e += kThreads) {
      const int i = e / kDownDepth, kk = e % kDownDepth;
      const int64_t m = m0 + i, d = d0 + kk;
      x_tile[kk][i] = (m < rows && d < d_in) ? load<DT, Acc>(x, m * d_in + d) : Acc(0);
    }
    for (int e = tid; e < kDownRanks * kDownDepth; e += kThreads) {
      const int j = e / kDownDepth, kk = e % kDownDepth;
      const int64_t k = k0 + j, d = d0 + kk;
      v_tile[kk][j] =
          (k < rank && d < d_in) ? load<DT, Acc>(vs, (task * rank + k) * d_in + d) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kDownDepth; ++kk) {
#pragma unroll
      for (int i = 0; i < kDownRows / kSide; ++i) {
        const Acc a = x_tile[kk][ty + kSide * i];
#pragma unroll
        for (int j = 0; j < kDownRanks / kSide; ++j) acc[i][j] += a * v_tile[kk][tx + kSide * j];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kDownRows / kSide; ++i) {
    const int64_t m = m0 + ty + kSide * i;
    if (m >= rows) continue;
    const Acc gate = load<DT, Acc>(gates, (m / tokens) * tasks + task);
#pragma unroll
    for (int j = 0; j < kDownRanks / kSide; ++j) {
      const int64_t k = k0 + tx + kSide * j;
      if (k < rank) down[m * width + task * rank + k] = gate * acc[i][j];
    }
  }
}

template <int32_t DT, typename Acc>
__global__ void __launch_bounds__(kThreads)
    lowrank_up_kernel(const Acc* __restrict__ down, const void* __restrict__ us,
                      const void* __restrict__ gates, Acc* __restrict__ y, int64_t rows,
                      int64_t d_out, int64_t tasks, int64_t rank, int64_t tokens) {
  __shared__ Acc z_tile[kUpDepth][kUpRows + 1];
  __shared__ Acc u_tile[kUpDepth][kUpCols + 1];
  const int tid = threadIdx.x, tx = tid % kSide, ty = tid / kSide;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kUpRows;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kUpCols;
  const int64_t width = tasks * rank;
  Acc acc[kUpRows / kSide][kUpCols / kSide] = {};
  for (int64_t task = 0; task < tasks; ++task) {
    const bool mine = tid < kUpRows && routed<DT, Acc>(gates, m0 + tid, rows, tokens, tasks, task);
    if (!__syncthreads_or(mine)) continue;  // uniform over the block
    for (int64_t k0 = 0; k0 < rank; k0 += kUpDepth) {
      for (int e = tid; e < kUpRows * kUpDepth; e += kThreads) {
        const int i = e / kUpDepth, kk = e % kUpDepth;
        const int64_t m = m0 + i, k = k0 + kk;
        z_tile[kk][i] = (m < rows && k < rank) ? down[m * width + task * rank + k] : Acc(0);
      }
      for (int e = tid; e < kUpCols * kUpDepth; e += kThreads) {
        const int j = e / kUpDepth, kk = e % kUpDepth;
        const int64_t o = o0 + j, k = k0 + kk;
        u_tile[kk][j] =
            (o < d_out && k < rank) ? load<DT, Acc>(us, (task * d_out + o) * rank + k) : Acc(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kUpDepth; ++kk) {
        Acc b[kUpCols / kSide];
#pragma unroll
        for (int j = 0; j < kUpCols / kSide; ++j) b[j] = u_tile[kk][tx + kSide * j];
#pragma unroll
        for (int i = 0; i < kUpRows / kSide; ++i) {
          const Acc a = z_tile[kk][ty + kSide * i];
#pragma unroll
          for (int j = 0; j < kUpCols / kSide; ++j) acc[i][j] += a * b[j];
        }
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < kUpRows / kSide; ++i) {
    const int64_t m = m0 + ty + kSide * i;
    if (m >= rows) continue;
#pragma unroll
    for (int j = 0; j < kUpCols / kSide; ++j) {
      const int64_t o = o0 + tx + kSide * j;
      if (o < d_out) y[m * d_out + o] += acc[i][j];
    }
  }
}

template <int32_t DT, typename Acc>
void launch(const void* x, int64_t rows, int64_t d_in, int64_t d_out, int64_t tasks,
            int64_t rank, int64_t tokens, const void* us, const void* vs, const void* gates,
            void* down, void* y, cudaStream_t stream) {
  const auto blocks = [](int64_t n, int tile) { return static_cast<unsigned>((n + tile - 1) / tile); };
  const dim3 down_grid(blocks(rows, kDownRows), blocks(rank, kDownRanks),
                       static_cast<unsigned>(tasks));
  lowrank_down_kernel<DT, Acc><<<down_grid, kThreads, 0, stream>>>(
      x, vs, gates, static_cast<Acc*>(down), rows, d_in, tasks, rank, tokens);
  const dim3 up_grid(blocks(rows, kUpRows), blocks(d_out, kUpCols));
  lowrank_up_kernel<DT, Acc><<<up_grid, kThreads, 0, stream>>>(
      static_cast<const Acc*>(down), us, gates, static_cast<Acc*>(y), rows, d_out, tasks, rank,
      tokens);
}

}  // namespace

void lowrank_mixture(const void* x, int32_t dtype, int64_t rows, int64_t d_in, int64_t d_out,
                     int64_t tasks, int64_t rank, int64_t tokens, const void* us, const void* vs,
                     const void* gates, void* down, void* y, uintptr_t stream) {
  if (rows <= 0 || d_out <= 0 || tasks <= 0 || rank <= 0 || tokens <= 0) return;
  if (tasks > 65535) throw std::invalid_argument("lowrank_mixture: at most 65535 tasks on CUDA");
  // grid.y holds the rank tiles of the down launch and the output tiles of the up launch.
  if ((rank + kDownRanks - 1) / kDownRanks > 65535 || (d_out + kUpCols - 1) / kUpCols > 65535) {
    throw std::invalid_argument("lowrank_mixture: rank " + std::to_string(rank) + " and d_out " +
                                std::to_string(d_out) + " must be at most " +
                                std::to_string(65535 * kDownRanks) + " and " +
                                std::to_string(65535 * kUpCols) +
                                " on CUDA (grid.y holds 65535 tiles)");
  }
  auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, "lowrank_mixture: dtype", [&](auto tag) {
    launch<decltype(tag)::code, typename decltype(tag)::compute>(x, rows, d_in, d_out, tasks, rank,
                                                                 tokens, us, vs, gates, down, y, s);
  });
  check(cudaGetLastError(), "lowrank_mixture launch");
}

}  // namespace fastmerge::cuda
