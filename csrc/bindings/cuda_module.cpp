// pybind11 module fastmerge._cuda: the CUDA kernels behind raw device pointers.
//
// Compiled by the host compiler against plain C++ launchers (csrc/cuda/launchers.h);
// no torch headers. The Python side builds the tensor and chunk tables on the device
// and passes their addresses and the current stream. Importing works without a GPU;
// calls then fail with a clear error from the CUDA runtime.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "../cuda/gram.h"
#include "../cuda/launchers.h"
#include "../cuda/nearswap.h"
#include "../cuda/weighted_sum.h"
#include "dtype_errors.h"

namespace py = pybind11;

#ifndef FASTMERGE_CUDA_ARCHS
#define FASTMERGE_CUDA_ARCHS ""
#endif
#ifndef FASTMERGE_PTX_ARCH
#define FASTMERGE_PTX_ARCH ""
#endif

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fastmerge CUDA kernels (raw-pointer interface; use fastmerge.* instead)";
  fastmerge::register_dtype_errors();
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
  m.def(
      "linear_assignment",
      [](uintptr_t cost, int64_t batch, int64_t rows, int64_t cols, uintptr_t dual,
         uintptr_t index_work, uintptr_t flags, uintptr_t col4row, uintptr_t status,
         uintptr_t stream) {
        py::gil_scoped_release release;
        fastmerge::cuda::linear_assignment(ptr<const double>(cost), batch, rows, cols,
                                           ptr<double>(dual), ptr<int64_t>(index_work),
                                           ptr<uint8_t>(flags), ptr<int64_t>(col4row),
                                           ptr<int32_t>(status), stream);
      },
      py::arg("cost"), py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("dual"),
      py::arg("index_work"), py::arg("flags"), py::arg("col4row"), py::arg("status"),
      py::arg("stream"));
  m.def(
      "feature_center",
      [](uintptr_t x, int32_t dtype, int64_t rows, int64_t cols, int64_t x_row_stride,
         uintptr_t shift, uintptr_t out, int32_t out_dtype, int64_t out_row_stride,
         int64_t splits, uintptr_t partials, uintptr_t stream) {
        py::gil_scoped_release release;
        fastmerge::cuda::feature_center(ptr<const void>(x), dtype, rows, cols, x_row_stride,
                                        ptr<const double>(shift), ptr<void>(out), out_dtype,
                                        out_row_stride, splits, ptr<double>(partials), stream);
      },
      py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("x_row_stride"),
      py::arg("shift"), py::arg("out"), py::arg("out_dtype"), py::arg("out_row_stride"),
      py::arg("splits"), py::arg("partials"), py::arg("stream"));
  m.def(
      "feature_cost",
      [](uintptr_t cross, int64_t rows, int64_t cols, uintptr_t sum_a, uintptr_t sum_b,
         uintptr_t sumsq_a, uintptr_t sumsq_b, uintptr_t shift_a, uintptr_t shift_b,
         double count, int32_t kind, uintptr_t out, uintptr_t stream) {
        py::gil_scoped_release release;
        fastmerge::cuda::feature_cost(ptr<const double>(cross), rows, cols,
                                      ptr<const double>(sum_a), ptr<const double>(sum_b),
                                      ptr<const double>(sumsq_a), ptr<const double>(sumsq_b),
                                      ptr<const double>(shift_a), ptr<const double>(shift_b),
                                      count, kind, ptr<double>(out), stream);
      },
      py::arg("cross"), py::arg("rows"), py::arg("cols"), py::arg("sum_a"), py::arg("sum_b"),
      py::arg("sumsq_a"), py::arg("sumsq_b"), py::arg("shift_a"), py::arg("shift_b"),
      py::arg("count"), py::arg("kind"), py::arg("out"), py::arg("stream"));
  m.def(
      "conv_gram",
      [](uintptr_t x, uintptr_t y, int32_t dtype, uintptr_t geometry, uintptr_t out,
         uintptr_t stream) {
        py::gil_scoped_release release;
        fastmerge::cuda::conv_gram(ptr<const void>(x), ptr<const void>(y), dtype,
                                   ptr<const int64_t>(geometry), ptr<double>(out), stream);
      },
      py::arg("x"), py::arg("y"), py::arg("dtype"), py::arg("geometry"), py::arg("out"),
      py::arg("stream"));
  m.def(
      "gram",
      [](uintptr_t table, int64_t count, uintptr_t base, int32_t base_dtype, int64_t rows,
         int64_t cols, int32_t mode, int64_t splits, bool float64, uintptr_t workspace,
         uintptr_t out, uintptr_t stream) {
        py::gil_scoped_release release;
        fastmerge::cuda::gram(ptr<const int64_t>(table), count, ptr<const void>(base),
                              base_dtype, rows, cols, mode, splits, float64,
                              ptr<double>(workspace), ptr<double>(out), stream);
      },
      py::arg("table"), py::arg("count"), py::arg("base"), py::arg("base_dtype"),
      py::arg("rows"), py::arg("cols"), py::arg("mode"), py::arg("splits"), py::arg("float64"),
      py::arg("workspace"), py::arg("out"), py::arg("stream"));
  m.def(
      "lowrank_mixture",
      [](uintptr_t x, int32_t dtype, int64_t rows, int64_t d_in, int64_t d_out, int64_t tasks,
         int64_t rank, int64_t tokens, uintptr_t us, uintptr_t vs, uintptr_t gates,
         uintptr_t down, uintptr_t y, uintptr_t stream) {
        py::gil_scoped_release release;
        fastmerge::cuda::lowrank_mixture(ptr<const void>(x), dtype, rows, d_in, d_out, tasks,
                                         rank, tokens, ptr<const void>(us), ptr<const void>(vs),
                                         ptr<const void>(gates), ptr<void>(down), ptr<void>(y),
                                         stream);
      },
      py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("d_in"), py::arg("d_out"),
      py::arg("tasks"), py::arg("rank"), py::arg("tokens"), py::arg("us"), py::arg("vs"),
      py::arg("gates"), py::arg("down"), py::arg("y"), py::arg("stream"));
  m.def(
      "magnitude_threshold",
      [](uintptr_t base, uintptr_t expert_addresses, int64_t num_experts, int64_t n,
         int32_t dtype, int64_t k, uintptr_t out, uintptr_t hist, uintptr_t prefix,
         uintptr_t rank, uintptr_t stream) {
        py::gil_scoped_release release;
        fastmerge::cuda::magnitude_threshold(ptr<const void>(base),
                                             ptr<const int64_t>(expert_addresses), num_experts,
                                             n, dtype, k, ptr<void>(out), ptr<uint32_t>(hist),
                                             ptr<uint64_t>(prefix), ptr<int64_t>(rank), stream);
      },
      py::arg("base"), py::arg("expert_addresses"), py::arg("num_experts"), py::arg("n"),
      py::arg("dtype"), py::arg("k"), py::arg("out"), py::arg("hist"), py::arg("prefix"),
      py::arg("rank"), py::arg("stream"));
  m.def(
      "gta_combine",
      [](uintptr_t base, uintptr_t expert_addresses, int64_t num_experts, int64_t n,
         int32_t dtype, uintptr_t params, uintptr_t random, int64_t offset, bool consensus,
         bool drop_zero_sum, bool normalize, double lam, uintptr_t out, int32_t out_dtype,
         uintptr_t stream) {
        py::gil_scoped_release release;
        fastmerge::cuda::gta_combine(ptr<const void>(base), ptr<const int64_t>(expert_addresses),
                                     num_experts, n, dtype, ptr<const void>(params),
                                     ptr<const int64_t>(random), offset, consensus,
                                     drop_zero_sum, normalize, lam, ptr<void>(out), out_dtype,
                                     stream);
      },
      py::arg("base"), py::arg("expert_addresses"), py::arg("num_experts"), py::arg("n"),
      py::arg("dtype"), py::arg("params"), py::arg("random"), py::arg("offset"),
      py::arg("consensus"), py::arg("drop_zero_sum"), py::arg("normalize"), py::arg("lam"),
      py::arg("out"), py::arg("out_dtype"), py::arg("stream"));
  m.def(
      "ties_combine",
      [](uintptr_t base, uintptr_t expert_addresses, int64_t num_experts, int64_t n,
         int32_t dtype, uintptr_t thresholds, double scale, uintptr_t out, int32_t out_dtype,
         uintptr_t stream) {
        py::gil_scoped_release release;
        fastmerge::cuda::ties_combine(ptr<const void>(base), ptr<const int64_t>(expert_addresses),
                                      num_experts, n, dtype, ptr<const void>(thresholds), scale,
                                      ptr<void>(out), out_dtype, stream);
      },
      py::arg("base"), py::arg("expert_addresses"), py::arg("num_experts"), py::arg("n"),
      py::arg("dtype"), py::arg("thresholds"), py::arg("scale"), py::arg("out"),
      py::arg("out_dtype"), py::arg("stream"));
  m.def(
      "weighted_sum",
      [](uintptr_t table, int64_t count, int64_t n, bool float64, uintptr_t out,
         int32_t out_dtype, uintptr_t stream) {
        py::gil_scoped_release release;
        fastmerge::cuda::weighted_sum(ptr<const int64_t>(table), count, n, float64,
                                      ptr<void>(out), out_dtype, stream);
      },
      py::arg("table"), py::arg("count"), py::arg("n"), py::arg("float64"), py::arg("out"),
      py::arg("out_dtype"), py::arg("stream"));
  m.def(
      "nearswap",
      [](uintptr_t a, int32_t a_dtype, uintptr_t b, int32_t b_dtype, double t, int64_t n,
         bool float64, uintptr_t out, int32_t out_dtype, uintptr_t stream) {
        py::gil_scoped_release release;
        fastmerge::cuda::nearswap(ptr<const void>(a), a_dtype, ptr<const void>(b), b_dtype, t,
                                  n, float64, ptr<void>(out), out_dtype, stream);
      },
      py::arg("a"), py::arg("a_dtype"), py::arg("b"), py::arg("b_dtype"), py::arg("t"),
      py::arg("n"), py::arg("float64"), py::arg("out"), py::arg("out_dtype"),
      py::arg("stream"));
  m.def("device_count", &fastmerge::cuda::device_count);
  m.attr("compiled_archs") = FASTMERGE_CUDA_ARCHS;
  m.attr("ptx_arch") = FASTMERGE_PTX_ARCH;
  m.attr("cuda_runtime_version") = fastmerge::cuda::runtime_version();
  m.def("driver_version", &fastmerge::cuda::driver_version,
        "Newest CUDA the installed driver supports (1000 * major + 10 * minor), 0 if none");
}
