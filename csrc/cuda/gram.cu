// Gram matrices on the GPU: the k(k+1)/2 pairwise dot products of k vectors, in double.
//
// One kernel serves the three modes of fastmerge/gram.h. A batch of B vectors of E entries
// each: entry e of vector b is element b * batch_stride + e * entry_stride of every input
// (whole: B = 1, E = n; rows: B = rows, E = cols, contiguous entries; columns: B = cols,
// E = rows, entries strided by cols). A block takes a tile of `lanes` consecutive vectors
// (lanes > 1 only for columns, where they are contiguous in memory) and one of `splits`
// ranges of their entries. It stages `stage_rows` entries of every input of its lanes in
// shared memory as double (read once from global memory, coalesced; the base is staged
// first and subtracted in the compute type), then every thread adds the products of its
// items (pair p, lane l, slice s) over the staged entries into registers. At the end of a
// tile the slices are summed in shared memory in a fixed order and each (lane, pair) sum is
// written: into `out` directly (both halves) when splits == 1, else into the workspace,
// whose ranges a second kernel sums in range order. No atomics: the result is the same
// run to run.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/dtypes.h"
#include "fastmerge/gram.h"
#include "gram.h"
#include "rounding.cuh"

namespace fastmerge::cuda {
namespace {

constexpr int kThreads = 256;
// Items a thread holds: ceil(2080 / 256) for the largest k with one lane.
constexpr int kMaxItems = 9;
static_assert(kMaxItems * kThreads >= kGramMaxTensors * (kGramMaxTensors + 1) / 2,
              "the items of a block do not cover every pair");
// Doubles of staged input values per block (k * stage_rows * lanes at most).
constexpr int64_t kStageBudget = 3072;
constexpr int kMaxLanes = 64;

struct GramArgs {
  const int64_t* table;  // (2, k): addresses, dtype codes
  const void* base;      // null: none
  int32_t base_dtype;
  int k;
  int pairs;
  int64_t batch;
  int64_t entries;
  int64_t entry_stride;
  int64_t batch_stride;
  int64_t split_length;
  int lanes;
  int stage_rows;
  int slices;
  int items;  // pairs * lanes * slices
  bool direct;
  double* workspace;
  double* out;
};

// Pair sum `value` of (vector `lane`, pair p) of entry range `split`.
__device__ __forceinline__ void emit(const GramArgs& a, int64_t split, int64_t lane, int p,
                                     double value) {
  if (lane >= a.batch) return;
  if (a.direct) {
    int i, j;
    gram_pair(p, a.k, &i, &j);
    double* m = a.out + lane * a.k * a.k;
    m[i * a.k + j] = value;
    m[j * a.k + i] = value;
  } else {
    a.workspace[(split * a.batch + lane) * a.pairs + p] = value;
  }
}

template <typename C>
__global__ void __launch_bounds__(kThreads) gram_kernel(const GramArgs a) {
  extern __shared__ double shared[];
  const int tid = static_cast<int>(threadIdx.x);
  const int lanes = a.lanes;
  const int stage = a.stage_rows * lanes;  // staged values per input
  const int xs_stride = stage + 1;         // padded: pairs of a warp read distinct banks
  double* xs = shared;                     // (k, xs_stride)
  double* bs = xs + a.k * xs_stride;       // (stage,): the staged base, in C
  double* red = bs + stage;                // (kThreads,): slice sums

  // This thread's items: offsets of its two inputs' staged values and its first entry.
  int oi[kMaxItems], oj[kMaxItems], first[kMaxItems];
#pragma unroll
  for (int it = 0; it < kMaxItems; ++it) {
    const int w = tid + it * kThreads;
    oi[it] = 0;
    oj[it] = 0;
    first[it] = INT_MAX;  // no item: its loop never runs
    if (w < a.items) {
      const int p = w % a.pairs;
      const int rest = w / a.pairs;
      const int l = rest % lanes;
      int i, j;
      gram_pair(p, a.k, &i, &j);
      oi[it] = i * xs_stride + l;
      oj[it] = j * xs_stride + l;
      first[it] = rest / lanes;  // the slice: entries first, first + slices, ...
    }
  }

  const int64_t split = blockIdx.y;
  const int64_t e_begin = split * a.split_length;
  const int64_t e_end = min(a.entries, e_begin + a.split_length);
  const int64_t tiles = (a.batch + lanes - 1) / lanes;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t lane0 = tile * lanes;
    double acc[kMaxItems];
#pragma unroll
    for (int it = 0; it < kMaxItems; ++it) acc[it] = 0.0;

    for (int64_t e0 = e_begin; e0 < e_end; e0 += a.stage_rows) {
      const int rows = static_cast<int>(min(static_cast<int64_t>(a.stage_rows), e_end - e0));
      const int n = rows * lanes;
      if (a.base != nullptr) {
        for (int idx = tid; idx < n; idx += kThreads) {
          const int64_t lane = lane0 + idx % lanes;
          const int64_t e = e0 + idx / lanes;
          bs[idx] = lane < a.batch ? static_cast<double>(load_any<C>(
                                         a.base, a.base_dtype,
                                         lane * a.batch_stride + e * a.entry_stride))
                                   : 0.0;
        }
        __syncthreads();
      }
      for (int idx = tid; idx < a.k * n; idx += kThreads) {
        const int i = idx / n;
        const int rem = idx - i * n;
        const int64_t lane = lane0 + rem % lanes;
        const int64_t e = e0 + rem / lanes;
        double v = 0.0;
        if (lane < a.batch) {
          const void* x = reinterpret_cast<const void*>(__ldg(a.table + i));
          const int64_t code = __ldg(a.table + a.k + i);
          C c = load_any<C>(x, code, lane * a.batch_stride + e * a.entry_stride);
          if (a.base != nullptr) c = sub_rn(c, static_cast<C>(bs[rem]));
          v = static_cast<double>(c);
        }
        xs[i * xs_stride + rem] = v;
      }
      __syncthreads();
#pragma unroll
      for (int it = 0; it < kMaxItems; ++it) {
        for (int r = first[it]; r < rows; r += a.slices) {
          acc[it] = __dadd_rn(acc[it], __dmul_rn(xs[oi[it] + r * lanes], xs[oj[it] + r * lanes]));
        }
      }
      __syncthreads();
    }

    if (a.slices > 1) {
      // items <= kThreads: one per thread; sum the slices of each (lane, pair) in order
      red[tid] = acc[0];
      __syncthreads();
      const int cells = a.pairs * lanes;
      if (tid < cells) {
        double v = 0.0;
        for (int s = 0; s < a.slices; ++s) v = __dadd_rn(v, red[s * cells + tid]);
        emit(a, split, lane0 + tid / a.pairs, tid % a.pairs, v);
      }
      __syncthreads();
    } else {
#pragma unroll
      for (int it = 0; it < kMaxItems; ++it) {
        const int w = tid + it * kThreads;
        if (w < a.items) emit(a, split, lane0 + w / a.pairs, w % a.pairs, acc[it]);
      }
    }
  }
}

// out[b] = the sum over ranges s = 0, 1, ... (in order) of workspace[s, b], both halves.
__global__ void __launch_bounds__(kThreads)
    gram_finalize_kernel(const double* __restrict__ workspace, int64_t splits, int64_t batch,
                         int k, int pairs, double* __restrict__ out) {
  const int64_t total = batch * pairs;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t b = idx / pairs;
    const int p = static_cast<int>(idx - b * pairs);
    double v = 0.0;
    for (int64_t s = 0; s < splits; ++s) v = __dadd_rn(v, workspace[s * total + idx]);
    int i, j;
    gram_pair(p, k, &i, &j);
    out[(b * k + i) * k + j] = v;
    out[(b * k + j) * k + i] = v;
  }
}

int64_t floor_pow2(int64_t v) {
  int64_t p = 1;
  while (p * 2 <= v) p *= 2;
  return p;
}

template <typename C>
void launch(GramArgs a, int64_t splits, cudaStream_t stream) {
  const int64_t tiles = (a.batch + a.lanes - 1) / a.lanes;
  const dim3 grid(static_cast<unsigned>(tiles < 65535 ? tiles : 65535),
                  static_cast<unsigned>(splits));
  const size_t shared =
      sizeof(double) * (static_cast<size_t>(a.k) * (a.stage_rows * a.lanes + 1) +
                        static_cast<size_t>(a.stage_rows) * a.lanes + kThreads);
  gram_kernel<C><<<grid, kThreads, shared, stream>>>(a);
  check(cudaGetLastError(), "gram launch");
  if (!a.direct) {
    const int64_t total = a.batch * a.pairs;
    const int64_t wanted = (total + kThreads - 1) / kThreads;
    const unsigned blocks = static_cast<unsigned>(wanted < 65535 ? wanted : 65535);
    gram_finalize_kernel<<<blocks, kThreads, 0, stream>>>(a.workspace, splits, a.batch, a.k,
                                                          a.pairs, a.out);
    check(cudaGetLastError(), "gram finalize launch");
  }
}

}  // namespace

void gram(const int64_t* table, int64_t count, const void* base, int32_t base_dtype,
          int64_t rows, int64_t cols, int32_t mode, int64_t splits, bool float64,
          double* workspace, double* out, uintptr_t stream) {
  if (count > kGramMaxTensors) {
    throw std::invalid_argument("gram takes at most " + std::to_string(kGramMaxTensors) +
                                " tensors, got " + std::to_string(count));
  }
  if (mode != kGramWhole && mode != kGramRows && mode != kGramColumns) {
    throw std::invalid_argument("gram: unknown mode " + std::to_string(mode));
  }
  if (splits < 1 || splits > 65535) {
    throw std::invalid_argument("gram: splits must be in [1, 65535], got " +
                                std::to_string(splits));
  }
  if (splits > 1 && workspace == nullptr) {
    throw std::invalid_argument("gram: splits > 1 needs a workspace");
  }
  // The kernel dispatches the base per entry, where it cannot throw: check it here.
  if (base != nullptr) check_dtype(base_dtype, "gram: base_dtype");
  if (count <= 0 || rows <= 0 || cols <= 0) return;  // the caller handles empty vectors

  GramArgs a{};
  a.table = table;
  a.base = base;
  a.base_dtype = base_dtype;
  a.k = static_cast<int>(count);
  a.pairs = static_cast<int>(gram_pairs(count));
  a.batch = gram_batch(mode, rows, cols);
  a.entries = gram_length(mode, rows, cols);
  a.entry_stride = mode == kGramColumns ? cols : 1;
  a.batch_stride = mode == kGramWhole ? 0 : mode == kGramRows ? cols : 1;
  a.split_length = (a.entries + splits - 1) / splits;
  // lanes: contiguous columns side by side, as many as the items allow (and the batch uses)
  int64_t lanes = 1;
  if (mode == kGramColumns) {
    lanes = kMaxLanes;
    while (lanes > 1 && (a.pairs * lanes > kMaxItems * kThreads || lanes / 2 >= a.batch)) {
      lanes /= 2;
    }
  }
  a.lanes = static_cast<int>(lanes);
  int64_t stage_rows = floor_pow2(std::max<int64_t>(1, kStageBudget / (count * lanes)));
  stage_rows = std::min<int64_t>(stage_rows, 1024);
  while (stage_rows > 1 && stage_rows / 2 >= a.split_length) stage_rows /= 2;
  a.stage_rows = static_cast<int>(stage_rows);
  const int64_t cells = a.pairs * lanes;
  a.slices = static_cast<int>(cells >= kThreads ? 1 : kThreads / cells);
  a.items = static_cast<int>(cells * a.slices);
  a.direct = splits == 1;
  a.workspace = workspace;
  a.out = out;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (float64) {
    launch<double>(a, splits, s);
  } else {
    launch<float>(a, splits, s);
  }
}

}  // namespace fastmerge::cuda
