#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace fastmerge::cuda {

// Turn a CUDA error into a Python-visible exception naming the failing call.
inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("fastmerge CUDA error in ") + what + ": " +
                             cudaGetErrorString(status));
  }
}

}  // namespace fastmerge::cuda
