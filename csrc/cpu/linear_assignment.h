#pragma once

#include <cstdint>

namespace fastmerge::cpu {

// Solves `batch` independent problems of `rows` x `cols` costs (float32 when
// `is_float32`, else float64; row-major, contiguous; solved in float64 either way), minimizing (or maximizing) the total cost. Problems are spread over the
// thread pool. For each problem b, writes min(rows, cols) pairs to row_out/col_out
// (rows ascending) and status[b] = 0 (solved), 1 (no finite complete assignment) or
// 2 (a NaN, or -inf after the sign flip of `maximize`).
// By default square problems with finite costs start with Jonker-Volgenant's column
// reduction, reduction transfer and augmenting row reduction, and the searches use a
// vectorized scan. `generic` instead runs the GPU kernel's exact path on one thread
// (zero duals, the team-generic scan of fastmerge/lap.h), so tests exercise it.
void linear_assignment(const void* cost, bool is_float32, int64_t batch, int64_t rows,
                       int64_t cols, bool maximize, bool generic, int64_t* row_out,
                       int64_t* col_out, int32_t* status);

}  // namespace fastmerge::cpu
