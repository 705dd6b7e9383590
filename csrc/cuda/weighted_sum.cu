// The weighted sum on the GPU: one thread per entry (grid-stride), sum_t w_t * x_t in a
// register, one store. The inputs may have different dtypes: the dtype code of each input
// is uniform across the grid, so the per-input dispatch never diverges.
//
// Bit for bit the reference (csrc/cpu/weighted_sum.h describes the arithmetic): the
// explicit _rn intrinsics keep nvcc from fusing the multiply and the add.
#include <cuda_runtime.h>

#include "cuda_check.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/dtypes.h"
#include "weighted_sum.h"
#include "rounding.cuh"

namespace fastmerge::cuda {
namespace {

constexpr int kThreads = 256;

template <typename C, int32_t OUT>
__global__ void __launch_bounds__(kThreads)
    weighted_sum_kernel(const int64_t* __restrict__ table, int count, int64_t n,
                        void* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    C acc = C(0);
    for (int t = 0; t < count; ++t) {
      const void* x = reinterpret_cast<const void*>(__ldg(table + t));
      const int64_t code = __ldg(table + count + t);
      const C w = static_cast<C>(__longlong_as_double(__ldg(table + 2 * count + t)));
      const C product = mul_rn(w, load_any<C>(x, code, i));
      acc = t == 0 ? product : add_rn(acc, product);
    }
    store_from_double<OUT>(out, i, static_cast<double>(acc));
  }
}

template <typename C>
void launch(const int64_t* table, int64_t count, int64_t n, void* out, int32_t out_dtype,
            cudaStream_t stream) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < 65535 * 8 ? wanted : 65535 * 8);
  const int c = static_cast<int>(count);
  dispatch_dtype(out_dtype, "weighted_sum: out_dtype", [&](auto tag) {
    weighted_sum_kernel<C, decltype(tag)::code><<<blocks, kThreads, 0, stream>>>(table, c, n, out);
  });
}

}  // namespace

void weighted_sum(const int64_t* table, int64_t count, int64_t n, bool float64, void* out,
                  int32_t out_dtype, uintptr_t stream) {
  if (n <= 0 || count <= 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (float64) {
    launch<double>(table, count, n, out, out_dtype, s);
  } else {
    launch<float>(table, count, n, out, out_dtype, s);
  }
  check(cudaGetLastError(), "weighted_sum launch");
}

}  // namespace fastmerge::cuda
