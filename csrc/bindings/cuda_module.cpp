// pybind11 module fastmerge._cuda: the CUDA kernels behind raw device pointers.
//
// Compiled by the host compiler against plain C++ launchers (csrc/cuda/launchers.h);
// no torch headers. The Python side builds the tensor and chunk tables on the device
// and passes their addresses and the current stream. Importing works without a GPU;
// calls then fail with a clear error from the CUDA runtime.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "../cuda/launchers.h"

namespace py = pybind11;

#ifndef FASTMERGE_CUDA_ARCHS
#define FASTMERGE_CUDA_ARCHS ""
#endif

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fastmerge CUDA kernels (raw-pointer interface; use fastmerge.* instead)";
  m.def(
      "scope_stats",
      [](uintptr_t tensor_table, int64_t num_tensors, uintptr_t chunk_table, int64_t num_chunks,
         int64_t chunk_size, uintptr_t partials, uintptr_t counters, uintptr_t out,
         uintptr_t stream) {
        py::gil_scoped_release release;
        fastmerge::cuda::scope_stats(ptr<const int64_t>(tensor_table), num_tensors,
                                     ptr<const int64_t>(chunk_table), num_chunks, chunk_size,
                                     ptr<double>(partials), ptr<uint32_t>(counters),
                                     ptr<double>(out), stream);
      },
      py::arg("tensor_table"), py::arg("num_tensors"), py::arg("chunk_table"),
      py::arg("num_chunks"), py::arg("chunk_size"), py::arg("partials"), py::arg("counters"),
      py::arg("out"), py::arg("stream"));
  m.def(
      "scope_grad",
      [](uintptr_t tensor_table, int64_t num_tensors, uintptr_t chunk_table, int64_t num_chunks,
         uintptr_t coefficients, uintptr_t stream) {
        py::gil_scoped_release release;
        fastmerge::cuda::scope_grad(ptr<const int64_t>(tensor_table), num_tensors,
                                    ptr<const int64_t>(chunk_table), num_chunks,
                                    ptr<const double>(coefficients), stream);
      },
      py::arg("tensor_table"), py::arg("num_tensors"), py::arg("chunk_table"),
      py::arg("num_chunks"), py::arg("coefficients"), py::arg("stream"));
  m.def("device_count", &fastmerge::cuda::device_count);
  m.attr("compiled_archs") = FASTMERGE_CUDA_ARCHS;
}
