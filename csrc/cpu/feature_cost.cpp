// Fused epilogue of the feature-matching costs on the CPU: one parallel pass over the
// accumulated cross-products turns them into covariance, correlation, inner product
// or negative squared distance (fastmerge/feature_cost.h), with no temporaries.
#include "feature_cost.h"

#include <vector>

#include "cpu_loads.h"  // FM_CPU_CLONES
#include "fastmerge/feature_cost.h"
#include "fastmerge/parallel.h"

namespace fastmerge::cpu {
namespace {

// Below this many entries per thread (2 MiB of float64 in and out) a second thread
// costs more than it saves.
constexpr int64_t kMinEntriesPerThread = 1 << 17;

// Per-unit moments of model b as separate arrays, so the inner loop vectorizes.
struct ColumnMoments {
  std::vector<double> dmean, mean, var, inv_std;
  ColumnMoments(const double* sum, const double* sumsq, const double* shift, int64_t cols,
                double inv_n)
      : dmean(cols), mean(cols), var(cols), inv_std(cols) {
    for (int64_t j = 0; j < cols; ++j) {
      const UnitMoments m = unit_moments(sum[j], sumsq[j], shift[j], inv_n);
      dmean[j] = m.dmean;
      mean[j] = m.mean;
      var[j] = m.var;
      inv_std[j] = m.inv_std;
    }
  }
};

template <int32_t KIND>
__attribute__((always_inline)) inline void cost_rows(const double* cross, int64_t first,
                                                     int64_t last, int64_t cols,
                                                     const double* sum_a, const double* sumsq_a,
                                                     const double* shift_a,
                                                     const ColumnMoments& b, double inv_n,
                                                     double* out) {
  const double* dmean = b.dmean.data();
  const double* mean = b.mean.data();
  const double* var = b.var.data();
  const double* inv_std = b.inv_std.data();
  for (int64_t i = first; i < last; ++i) {
    const UnitMoments a = unit_moments(sum_a[i], sumsq_a[i], shift_a[i], inv_n);
    const double* in = cross + i * cols;
    double* dst = out + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      const UnitMoments bj{dmean[j], mean[j], var[j], inv_std[j]};
      dst[j] = feature_cost_entry<KIND>(in[j], a, bj, inv_n);
    }
  }
}

#define FM_COST_CLONE(NAME, KIND)                                                           \
  FM_CPU_CLONES void NAME(const double* c, int64_t f, int64_t l, int64_t n, const double* s, \
                          const double* q, const double* h, const ColumnMoments& b,         \
                          double inv_n, double* o) {                                        \
    cost_rows<KIND>(c, f, l, n, s, q, h, b, inv_n, o);                                      \
  }
FM_COST_CLONE(covariance_rows, kCovariance)
FM_COST_CLONE(correlation_rows, kCorrelation)
FM_COST_CLONE(inner_product_rows, kInnerProduct)
FM_COST_CLONE(neg_sq_distance_rows, kNegSqDistance)
#undef FM_COST_CLONE

using RowsFn = void (*)(const double*, int64_t, int64_t, int64_t, const double*, const double*,
                        const double*, const ColumnMoments&, double, double*);

RowsFn rows_for(int32_t kind) {
  switch (kind) {
    case kCovariance:
      return covariance_rows;
    case kCorrelation:
      return correlation_rows;
    case kInnerProduct:
      return inner_product_rows;
    default:
      return neg_sq_distance_rows;
  }
}

}  // namespace

void feature_cost(const double* cross, int64_t rows, int64_t cols, const double* sum_a,
                  const double* sum_b, const double* sumsq_a, const double* sumsq_b,
                  const double* shift_a, const double* shift_b, double count, int32_t kind,
                  double* out) {
  if (rows <= 0 || cols <= 0) return;
  const double inv_n = 1.0 / count;
  const RowsFn fn = rows_for(kind);
  std::vector<int64_t> prefix(rows + 1);
  for (int64_t i = 0; i <= rows; ++i) prefix[i] = i * cols;
  parallel_ranges(rows, prefix, kMinEntriesPerThread, [&](int64_t first, int64_t last) {
    const ColumnMoments b(sum_b, sumsq_b, shift_b, cols, inv_n);
    fn(cross, first, last, cols, sum_a, sumsq_a, shift_a, b, inv_n, out);
  });
}

}  // namespace fastmerge::cpu
