#pragma once

#include <cstdint>
#include <vector>

namespace fastmerge::cpu {

// out_t = alpha[t] + beta[t] * (x_t - mean[t]) for every tensor t, written in x_t's
// dtype: the gradient of any function of the tensors' scopes (mean, std), in one pass.
void scope_grad(const std::vector<const void*>& x, const std::vector<void*>& out,
                const std::vector<int64_t>& numels, const std::vector<int32_t>& dtypes,
                const double* mean, const double* alpha, const double* beta);

}  // namespace fastmerge::cpu
