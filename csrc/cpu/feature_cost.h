#pragma once

#include <cstdint>

namespace fastmerge::cpu {

// out[i * cols + j] = cost `kind` (fastmerge::FeatureCostKind) of unit i of model a and
// unit j of model b, from float64 shifted moments of `count` samples (see
// fastmerge/feature_cost.h). cross: rows x cols row-major; sum_a, sumsq_a, shift_a: rows;
// sum_b, sumsq_b, shift_b: cols. One parallel pass over the rows.
void feature_cost(const double* cross, int64_t rows, int64_t cols, const double* sum_a,
                  const double* sum_b, const double* sumsq_a, const double* sumsq_b,
                  const double* shift_a, const double* shift_b, double count, int32_t kind,
                  double* out);

}  // namespace fastmerge::cpu
