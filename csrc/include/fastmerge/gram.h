// Pairwise dot products of k vectors (the op `gram`), shared by the host and device kernels.
//
// The k inputs are one (rows, cols) row-major layout each; a mode says which entries make
// one vector: kGramWhole, all rows * cols entries (one k x k matrix); kGramRows, each row
// (rows matrices over cols entries); kGramColumns, each column (cols matrices over rows
// entries). Vector entry e of input i is x_i[e] = t_i[e] in the compute type (float, or
// double when any input is float64), or t_i[e] - base[e] subtracted and rounded there;
// products and sums are in double. Only the upper triangle is formed: pair p < k(k+1)/2
// is (i, j), i <= j, in row-major order (0,0), (0,1), ..., (0,k-1), (1,1), ...
#pragma once

#include <cstdint>

#include "fastmerge/moments.h"  // FM_HD

namespace fastmerge {

enum GramMode : int32_t { kGramWhole = 0, kGramRows = 1, kGramColumns = 2 };

// The most inputs one call takes (k(k+1)/2 = 2080 pairs); fastmerge/ops/gram.py says so.
constexpr int kGramMaxTensors = 64;

FM_HD int64_t gram_pairs(int64_t k) { return k * (k + 1) / 2; }

// Pair p -> (i, j), i <= j: the inverse of p = i k - i (i - 1) / 2 + (j - i).
FM_HD void gram_pair(int64_t p, int64_t k, int* i, int* j) {
  int64_t row = 0;
  while (p >= k - row) {
    p -= k - row;
    ++row;
  }
  *i = static_cast<int>(row);
  *j = static_cast<int>(row + p);
}

// Number of matrices a mode gives and entries in each vector, for a (rows, cols) layout.
FM_HD int64_t gram_batch(int32_t mode, int64_t rows, int64_t cols) {
  return mode == kGramWhole ? 1 : mode == kGramRows ? rows : cols;
}
FM_HD int64_t gram_length(int32_t mode, int64_t rows, int64_t cols) {
  return mode == kGramWhole ? rows * cols : mode == kGramRows ? cols : rows;
}

}  // namespace fastmerge
