// Feature-matching costs from shifted moments, shared by host and device code.
//
// A FeatureStats accumulator keeps, for units i of model a and j of model b, with
// per-unit shifts s_i, t_j (close to the means) and n samples:
//   sum_a[i] = sum (x_i - s_i),   sumsq_a[i] = sum (x_i - s_i)^2    (same for b)
//   cross[i][j] = sum (x_i - s_i)(y_j - t_j)
// Every cost is a per-sample mean and is computed from these in one elementwise pass:
//   covariance       E[(x_i - mu_i)(y_j - nu_j)]          (population)
//   correlation      covariance / (sigma_i sigma_j) in [-1, 1], 0 where sigma_i or sigma_j is 0
//   inner_product    E[x_i y_j]
//   neg_sq_distance  -E[(x_i - y_j)^2]
// The shifts keep every difference small, so nothing cancels catastrophically when
// |mean| >> std.
#pragma once

#include <cstdint>

#include "fastmerge/moments.h"  // FM_HD

namespace fastmerge {

// Kind codes; keep in sync with fastmerge/ops/feature_cost.py (KINDS).
enum FeatureCostKind : int32_t {
  kCovariance = 0,
  kCorrelation = 1,
  kInnerProduct = 2,
  kNegSqDistance = 3,
};

// A unit whose variance is below this fraction of its mean square around the shift is
// constant up to rounding (its std is below ~1e-7 of the distance to the shift), and
// gets variance 0 (correlation 0) rather than a rounding residue.
constexpr double kConstantUnitRtol = 1e-14;

struct UnitMoments {
  double dmean;    // mean of x - shift
  double mean;     // mean of x
  double var;      // population variance (0 for a constant unit)
  double inv_std;  // 1 / sqrt(var), and 0 for a constant unit (so its correlation is 0)
};

// Comparisons (not fmin/fmax) so that a NaN passes through instead of being dropped.
FM_HD UnitMoments unit_moments(double sum, double sumsq, double shift, double inv_n) {
  const double dmean = sum * inv_n;
  const double square = sumsq * inv_n;
  double var = square - dmean * dmean;
  if (var <= kConstantUnitRtol * square) var = 0.0;
#if defined(__CUDA_ARCH__)
  const double inv_std = var == 0.0 ? 0.0 : rsqrt(var);
#else
  const double inv_std = var == 0.0 ? 0.0 : 1.0 / sqrt(var);
#endif
  return UnitMoments{dmean, shift + dmean, var, inv_std};
}

// One entry of the cost matrix; `cross` is the accumulated shifted cross-product.
template <int32_t KIND>
FM_HD double feature_cost_entry(double cross, const UnitMoments& a, const UnitMoments& b,
                                double inv_n) {
  const double cov = cross * inv_n - a.dmean * b.dmean;
  if (KIND == kCovariance) return cov;
  if (KIND == kCorrelation) {
    const double r = cov * a.inv_std * b.inv_std;
    return r < -1.0 ? -1.0 : (r > 1.0 ? 1.0 : r);
  }
  if (KIND == kInnerProduct) return cov + a.mean * b.mean;
  // E[(x - y)^2] = var_x + var_y - 2 cov + (mu_x - mu_y)^2, never negative.
  const double dm = a.mean - b.mean;
  const double sq = a.var + b.var - 2.0 * cov + dm * dm;
  return sq < 0.0 ? 0.0 : -sq;
}

}  // namespace fastmerge
