#pragma once

#include <cstdint>

namespace fastmerge::cpu {

// Element types of a cost array (codes shared with fastmerge/ops/linear_assignment.py;
// keep the two in sync). Every type is solved exactly: float16, bfloat16, bool and
// integers up to 16 bits widen to float, the others to double; 64-bit integers beyond
// 2^53 in magnitude (which double cannot hold) make the problem kTooLarge.
enum CostType : int32_t {
  kCostFloat64 = 0,
  kCostFloat32 = 1,
  kCostFloat16 = 2,
  kCostBFloat16 = 3,
  kCostInt8 = 4,
  kCostInt16 = 5,
  kCostInt32 = 6,
  kCostInt64 = 7,
  kCostUInt8 = 8,
  kCostUInt16 = 9,
  kCostUInt32 = 10,
  kCostUInt64 = 11,
  kCostBool = 12,
};

// Per-problem status codes.
enum CostStatus : int32_t {
  kStatusSolved = 0,
  kStatusInfeasible = 1,  // no assignment avoids the forbidden (+inf) pairs
  kStatusInvalid = 2,     // a NaN, or -inf after the sign flip of `maximize`
  kStatusTooLarge = 3,    // a 64-bit integer beyond 2^53 in magnitude
};

// Solves `batch` independent problems of `rows` x `cols` costs, minimizing (or
// maximizing) the total. Element (b, i, j) is at cost[b * stride_b + i * stride_r +
// j * stride_c] (strides in elements, any sign or layout). Problems are spread over the
// thread pool. For each problem b, writes min(rows, cols) pairs to row_out/col_out
// (rows ascending) and a CostStatus to status[b]; returns the first b that failed, or -1.
// By default square problems with finite costs start with Jonker-Volgenant's column
// reduction, reduction transfer and augmenting row reduction, and the searches use a
// vectorized scan. `generic` instead runs the GPU kernel's exact path on one thread
// (zero duals, the team-generic scan of fastmerge/lap.h), so tests exercise it.
int64_t linear_assignment(const void* cost, int32_t type, int64_t batch, int64_t rows,
                          int64_t cols, int64_t stride_b, int64_t stride_r, int64_t stride_c,
                          bool maximize, bool generic, int64_t* row_out, int64_t* col_out,
                          int32_t* status);

}  // namespace fastmerge::cpu
