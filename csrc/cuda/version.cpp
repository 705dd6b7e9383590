// Which CUDA the module was built with and which CUDA the installed driver supports, so
// that Python can tell "driver too old" (or "no driver") apart from a kernel failure and
// report it before the first launch fails with an opaque error. Host code only (a .cpp:
// no kernel for nvcc, and nothing for tests/test_gpu_build.py's spill check to read).
#include <cuda_runtime.h>

#include "launchers.h"

namespace fastmerge::cuda {

// CUDART_VERSION of the toolkit at build time (1000 * major + 10 * minor): the runtime is
// linked statically, so this is the runtime every call of this module uses.
int runtime_version() { return CUDART_VERSION; }

// The newest CUDA the installed driver supports (same encoding), or 0 with no driver.
int driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) {
    cudaGetLastError();  // clear the error: a missing driver is an answer, not a failure
    return 0;
  }
  return version;
}

}  // namespace fastmerge::cuda
