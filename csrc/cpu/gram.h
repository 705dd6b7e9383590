#pragma once

#include <cstdint>
#include <vector>

namespace fastmerge::cpu {

// Gram matrices of k = inputs.size() vectors (fastmerge/gram.h): every input (and `base`,
// when not null) is one contiguous (rows, cols) row-major buffer of its own dtype
// (fastmerge::DType); `mode` (fastmerge::GramMode) picks the vectors: the whole buffer,
// each row, or each column. x_i = t_i in the compute type, or t_i - base rounded in it
// (float, or double when `float64`); every product x_i[e] x_j[e] and every sum in double.
// out: float64 (batch, k, k), batch = 1, rows or cols by mode, both halves written.
//
// Every entry of every input is read once and no input-sized temporary is made: entries
// are staged in small blocks (per thread, in L1/L2). Parallel with the thread pool: the
// whole buffer in chunks whose partial Gram matrices are summed in chunk order (the chunks
// depend on the size only, so the result does not depend on the thread count), rows and
// column tiles over threads. Throws std::invalid_argument for k > kGramMaxTensors or a bad
// mode.
void gram(const std::vector<const void*>& inputs, const std::vector<int32_t>& dtypes,
          const void* base, int32_t base_dtype, int64_t rows, int64_t cols, int32_t mode,
          bool float64, double* out);

}  // namespace fastmerge::cpu
