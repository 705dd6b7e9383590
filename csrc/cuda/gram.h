// Host-side entry point of the CUDA Gram matrices (plain C++, like launchers.h, so that
// the pybind11 module compiles with the host compiler).
#pragma once

#include <cstdint>

namespace fastmerge::cuda {

// Gram matrices of `count` (rows, cols) row-major device buffers (fastmerge/gram.h and
// csrc/cpu/gram.h for the arithmetic). table: device int64 (2, count): row 0 the inputs'
// data pointers, row 1 their dtype codes. base: device pointer or null, of base_dtype.
// mode: fastmerge::GramMode. The vectors' entries are cut into `splits` ranges; with
// splits > 1, workspace holds float64 (splits, batch, count (count + 1) / 2) partial pair
// sums, summed in range order on the device; with splits == 1 it is unused (may be null).
// out: float64 (batch, count, count), batch = 1, rows or cols by mode, fully written.
void gram(const int64_t* table, int64_t count, const void* base, int32_t base_dtype,
          int64_t rows, int64_t cols, int32_t mode, int64_t splits, bool float64,
          double* workspace, double* out, uintptr_t stream);

}  // namespace fastmerge::cuda
