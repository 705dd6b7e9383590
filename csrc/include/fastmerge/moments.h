// Mergeable first and second moments, shared by host and device code.
//
// Every backend reduces a chunk of a tensor to shifted sums (sum of x - K and of
// (x - K)^2 with K the chunk's first element), turns them into (count, mean, M2),
// and then combines chunk partials into one tensor's moments. The shift keeps the
// second moment free of catastrophic cancellation when |mean| >> std.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FM_HD __host__ __device__ __forceinline__
#else
#define FM_HD inline
#endif

namespace fastmerge {

struct Moments {
  double count;  // number of elements
  double mean;   // mean of the elements (NaN when count == 0)
  double m2;     // sum of squared deviations from the mean
};

// Moments of n elements whose shifted sums around `shift` are s1 and s2.
FM_HD Moments moments_from_shifted_sums(double n, double shift, double s1, double s2) {
  if (n <= 0.0) return Moments{0.0, NAN, NAN};
  const double delta = s1 / n;
  return Moments{n, shift + delta, s2 - s1 * delta};
}

// Chan et al.'s pairwise update: the moments of the union of two disjoint parts.
FM_HD Moments chan_merge(const Moments& a, const Moments& b) {
  if (a.count <= 0.0) return b;
  if (b.count <= 0.0) return a;
  const double n = a.count + b.count;
  const double delta = b.mean - a.mean;
  const double fb = b.count / n;
  return Moments{n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.count * fb};
}

// Population standard deviation; NaN when there are no elements.
FM_HD double population_std(const Moments& m) {
  if (m.count <= 0.0) return NAN;
  const double var = m.m2 / m.count;
  return std::sqrt(var < 0.0 ? 0.0 : var);  // rounding may dip below 0; NaN must stay NaN
}

}  // namespace fastmerge
