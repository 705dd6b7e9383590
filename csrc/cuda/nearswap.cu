// The nearswap on the GPU: one thread per entry (grid-stride), the formula in registers,
// one store. a and b may have different dtypes: their dtype codes are uniform across the
// grid, so the per-input dispatch never diverges.
//
// Bit for bit the reference (csrc/cpu/nearswap.h describes the arithmetic): the explicit
// _rn intrinsics keep nvcc from fusing the multiplies and the add, and the division is
// the IEEE one.
#include <cuda_runtime.h>

#include "cuda_check.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/dtypes.h"
#include "nearswap.h"
#include "rounding.cuh"

namespace fastmerge::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float abs_of(float a) { return fabsf(a); }
__device__ __forceinline__ double abs_of(double a) { return fabs(a); }

template <typename C, int32_t OUT>
__global__ void __launch_bounds__(kThreads)
    nearswap_kernel(const void* a, int32_t a_dtype, const void* b, int32_t b_dtype, C t,
                    int64_t n, void* out) {
  const C eps = static_cast<C>(1e-6);
  const C zero = C(0);
  const C one = C(1);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const C x = load_any<C>(a, a_dtype, i);
    const C y = load_any<C>(b, b_dtype, i);
    C d = abs_of(sub_rn(x, y));
    d = d < eps ? eps : d;  // a NaN fails the comparison and stays
    C w = div_rn(t, d);
    w = w < zero ? zero : w;
    w = w > one ? one : w;
    const C result = add_rn(mul_rn(w, y), mul_rn(sub_rn(one, w), x));
    store_from_double<OUT>(out, i, static_cast<double>(result));
  }
}

template <typename C>
void launch(const void* a, int32_t a_dtype, const void* b, int32_t b_dtype, C t, int64_t n,
            void* out, int32_t out_dtype, cudaStream_t stream) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < 65535 * 8 ? wanted : 65535 * 8);
  dispatch_dtype(out_dtype, "nearswap: out_dtype", [&](auto tag) {
    nearswap_kernel<C, decltype(tag)::code>
        <<<blocks, kThreads, 0, stream>>>(a, a_dtype, b, b_dtype, t, n, out);
  });
}

}  // namespace

void nearswap(const void* a, int32_t a_dtype, const void* b, int32_t b_dtype, double t,
              int64_t n, bool float64, void* out, int32_t out_dtype, uintptr_t stream) {
  // The kernel dispatches a and b per entry, where it cannot throw: check them here.
  check_dtype(a_dtype, "nearswap: a_dtype");
  check_dtype(b_dtype, "nearswap: b_dtype");
  if (n <= 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (float64) {
    launch<double>(a, a_dtype, b, b_dtype, t, n, out, out_dtype, s);
  } else {
    launch<float>(a, a_dtype, b, b_dtype, static_cast<float>(t), n, out, out_dtype, s);
  }
  check(cudaGetLastError(), "nearswap launch");
}

}  // namespace fastmerge::cuda
