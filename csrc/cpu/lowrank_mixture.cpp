// The non-GEMM passes of fastmerge.lowrank_mixture on the CPU. The products are BLAS
// GEMMs (torch's, called from Python); these passes sit between them:
// * the gating pass scales each task's block of the down-projection by the sample's gate
//   in place, so the up-projection GEMM reads gated values and no gated copy is written;
// * the routed (top-k) path gathers the rows of the samples routed to a task into one
//   dense block (so each task costs two large GEMMs, not one small pair per sample) and
//   adds the block's output back into y.
#include "lowrank_mixture.h"

#include <algorithm>
#include <vector>

#include "cpu_loads.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/parallel.h"

namespace fastmerge::cpu {
namespace {

// Below this many elements per thread a second thread costs more than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 16;

template <typename T>
FM_CPU_CLONES void scale_rows(T* z, int64_t first, int64_t last, int64_t tasks, int64_t rank,
                              int64_t z_row_stride, const T* gates, int64_t gate_row_stride,
                              int64_t tokens) {
  for (int64_t m = first; m < last; ++m) {
    T* row = z + m * z_row_stride;
    const T* g = gates + (m / tokens) * gate_row_stride;
    for (int64_t t = 0; t < tasks; ++t) {
      const T gate = g[t];
      T* block = row + t * rank;
#pragma omp simd
      for (int64_t k = 0; k < rank; ++k) block[k] *= gate;
    }
  }
}

template <typename T>
void gate_scale(T* z, int64_t rows, int64_t tasks, int64_t rank, int64_t z_row_stride,
                const T* gates, int64_t gate_row_stride, int64_t tokens) {
  const int64_t cols = tasks * rank;
  std::vector<int64_t> prefix(rows + 1);
  for (int64_t m = 0; m <= rows; ++m) prefix[m] = m * cols;
  parallel_ranges(rows, prefix, kMinElementsPerThread, [&](int64_t first, int64_t last) {
    scale_rows<T>(z, first, last, tasks, rank, z_row_stride, gates, gate_row_stride, tokens);
  });
}

// Calls body(b) for every block b < count, in parallel when the blocks are big enough.
template <typename Body>
void for_blocks(int64_t count, int64_t block_elements, const Body& body) {
  std::vector<int64_t> prefix(count + 1);
  for (int64_t b = 0; b <= count; ++b) prefix[b] = b * block_elements;
  parallel_ranges(count, prefix, kMinElementsPerThread, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) body(b);
  });
}

template <typename T>
FM_CPU_CLONES void add_row(T* dst, const T* src, int64_t cols) {
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) dst[j] += src[j];
}

template <typename T>
void gather(T* dst, int64_t dst_stride, const T* src, int64_t src_stride, const int64_t* index,
            int64_t count, int64_t tokens, int64_t cols) {
  for_blocks(count, tokens * cols, [&](int64_t b) {
    for (int64_t i = 0; i < tokens; ++i) {
      const T* from = src + (index[b] * tokens + i) * src_stride;
      std::copy(from, from + cols, dst + (b * tokens + i) * dst_stride);
    }
  });
}

template <typename T>
void scatter_add(T* dst, int64_t dst_stride, const T* src, int64_t src_stride,
                 const int64_t* index, int64_t count, int64_t tokens, int64_t cols) {
  for_blocks(count, tokens * cols, [&](int64_t b) {
    for (int64_t i = 0; i < tokens; ++i) {
      add_row(dst + (index[b] * tokens + i) * dst_stride, src + (b * tokens + i) * src_stride,
              cols);
    }
  });
}

}  // namespace

// Each entry point dispatches before its empty-input return, so that a bad code raises
// whatever the sizes (as the bindings' own check did).
void lowrank_gather_rows(void* dst, int64_t dst_row_stride, const void* src,
                         int64_t src_row_stride, const int64_t* index, int64_t count,
                         int64_t tokens, int64_t cols, int32_t dtype) {
  dispatch_dtype<FloatDTypes>(dtype, "lowrank_gather_rows: dtype", [&](auto tag) {
    using T = typename decltype(tag)::compute;
    if (count <= 0 || tokens <= 0 || cols <= 0) return;
    gather(static_cast<T*>(dst), dst_row_stride, static_cast<const T*>(src),
           src_row_stride, index, count, tokens, cols);
  });
}

void lowrank_scatter_add_rows(void* dst, int64_t dst_row_stride, const void* src,
                              int64_t src_row_stride, const int64_t* index, int64_t count,
                              int64_t tokens, int64_t cols, int32_t dtype) {
  dispatch_dtype<FloatDTypes>(dtype, "lowrank_scatter_add_rows: dtype", [&](auto tag) {
    using T = typename decltype(tag)::compute;
    if (count <= 0 || tokens <= 0 || cols <= 0) return;
    scatter_add(static_cast<T*>(dst), dst_row_stride, static_cast<const T*>(src),
                src_row_stride, index, count, tokens, cols);
  });
}

void lowrank_gate_scale(void* z, int32_t dtype, int64_t rows, int64_t tasks, int64_t rank,
                        int64_t z_row_stride, const void* gates, int64_t gate_row_stride,
                        int64_t tokens) {
  dispatch_dtype<FloatDTypes>(dtype, "lowrank_gate_scale: dtype", [&](auto tag) {
    using T = typename decltype(tag)::compute;
    if (rows <= 0 || tasks <= 0 || rank <= 0 || tokens <= 0) return;
    gate_scale(static_cast<T*>(z), rows, tasks, rank, z_row_stride,
               static_cast<const T*>(gates), gate_row_stride, tokens);
  });
}

}  // namespace fastmerge::cpu
