// Batched exact linear assignment on the GPU: one thread block per problem.
//
// Each block runs the shortest augmenting path solver of fastmerge/lap.h with a
// BlockTeam: the threads scan strided slices of the columns and reduce to the best
// candidate in shared memory, so a large problem uses a whole block instead of one
// thread. Problems arrive oriented (rows <= cols) and as minimizations; infeasible
// problems are reported in `status`, never by a device assert.
#include <cuda_runtime.h>

#include "cuda_check.h"
#include "fastmerge/lap.h"
#include "launchers.h"

namespace fastmerge::cuda {
namespace {

// A power of two: the candidate reduction halves it. __launch_bounds__(kThreads, 1)
// lets ptxas use the registers it needs (without it, sm_90 spilled 12 bytes).
constexpr int kThreads = 256;

struct BlockTeam {
  lap::Candidate* scratch;  // kThreads entries of shared memory

  __device__ int64_t begin(int64_t) const { return threadIdx.x; }
  __device__ int64_t end(int64_t n) const { return n; }
  __device__ int64_t stride() const { return kThreads; }
  __device__ bool leader() const { return threadIdx.x == 0; }
  __device__ void sync() const { __syncthreads(); }
  __device__ lap::Candidate scan(const double* row_cost, int64_t i, double u_i, double min_val,
                                 int64_t nc, const lap::Workspace& w) const {
    return lap::scan_columns(*this, row_cost, i, u_i, min_val, nc, w);
  }
  __device__ lap::Candidate best(const lap::Candidate& mine) const {
    scratch[threadIdx.x] = mine;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) {
        const lap::Candidate& other = scratch[threadIdx.x + stride];
        const lap::Candidate& own = scratch[threadIdx.x];
        // Empty slots (position < 0) never win over a real candidate.
        if (own.position < 0 || (other.position >= 0 && lap::better(other, own))) {
          scratch[threadIdx.x] = other;
        }
      }
      __syncthreads();
    }
    const lap::Candidate result = scratch[0];
    __syncthreads();  // scratch is reused by the next reduction
    return result;
  }
};

__global__ void __launch_bounds__(kThreads, 1)
    linear_assignment_kernel(const double* __restrict__ cost, int64_t rows, int64_t cols,
                             double* dual, int64_t* index_work, uint8_t* flags,
                             int64_t* col4row_out, int32_t* status) {
  __shared__ lap::Candidate scratch[kThreads];
  __shared__ lap::TeamState state;
  const int64_t b = blockIdx.x;
  const int64_t nr = rows, nc = cols;
  // Per-problem slices: dual = [u (nr) | v (nc) | shortest (nc) | closed_col (nc)],
  // index_work = [row4col (nc) | path (nc)], flags = visited_row (nr); col4row is the
  // output itself.
  double* d = dual + b * (nr + 3 * nc);
  int64_t* x = index_work + b * 2 * nc;
  uint8_t* f = flags + b * nr;
  const lap::Workspace ws{d,  d + nr, d + nr + nc, x + nc, col4row_out + b * nr,
                          x,  f,      d + nr + 2 * nc};
  const BlockTeam team{scratch};
  lap::reset(team, nr, nc, ws);
  const int64_t failed = lap::assign_free_rows(team, state, cost + b * nr * nc, nr, nc, ws);
  if (team.leader()) status[b] = failed >= 0 ? 1 : 0;
}

}  // namespace

void linear_assignment(const double* cost, int64_t batch, int64_t rows, int64_t cols,
                       double* dual, int64_t* index_work, uint8_t* flags, int64_t* col4row,
                       int32_t* status, uintptr_t stream) {
  if (batch == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  linear_assignment_kernel<<<static_cast<unsigned>(batch), kThreads, 0, s>>>(
      cost, rows, cols, dual, index_work, flags, col4row, status);
  check(cudaGetLastError(), "linear_assignment launch");
}

}  // namespace fastmerge::cuda
