// pybind11 module fastmerge._C: the CPU kernels behind raw pointers.
//
// No torch headers: callers pass data pointers (ints), element counts and dtype codes,
// so numpy, DLPack or any framework can call these. The GIL is released while the
// kernels run. Python-side validation lives in fastmerge/ops/<op>.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cpu/scope_grad.h"
#include "../cpu/scope_stats.h"
#include "fastmerge/parallel.h"

namespace py = pybind11;

namespace {

template <typename T>
std::vector<T> as_pointers(const std::vector<uintptr_t>& addresses) {
  std::vector<T> out(addresses.size());
  for (size_t i = 0; i < addresses.size(); ++i) out[i] = reinterpret_cast<T>(addresses[i]);
  return out;
}

void check_lengths(size_t expected, size_t got, const char* name) {
  if (expected != got) {
    throw std::invalid_argument(std::string(name) + " has " + std::to_string(got) +
                                " entries, expected " + std::to_string(expected));
  }
}

void scope_stats(const std::vector<uintptr_t>& data, const std::vector<int64_t>& numels,
                 const std::vector<int32_t>& dtypes, uintptr_t out) {
  check_lengths(data.size(), numels.size(), "numels");
  check_lengths(data.size(), dtypes.size(), "dtypes");
  const auto pointers = as_pointers<const void*>(data);
  auto* stats = reinterpret_cast<double*>(out);  // rows: mean, std, count
  const size_t n = data.size();
  py::gil_scoped_release release;
  fastmerge::cpu::scope_stats(pointers, numels, dtypes, stats, stats + n, stats + 2 * n);
}

void scope_grad(const std::vector<uintptr_t>& x, const std::vector<uintptr_t>& out,
                const std::vector<int64_t>& numels, const std::vector<int32_t>& dtypes,
                uintptr_t coefficients) {
  check_lengths(x.size(), out.size(), "out");
  check_lengths(x.size(), numels.size(), "numels");
  check_lengths(x.size(), dtypes.size(), "dtypes");
  const auto src = as_pointers<const void*>(x);
  const auto dst = as_pointers<void*>(out);
  const auto* coef = reinterpret_cast<const double*>(coefficients);  // rows: mean, alpha, beta
  const size_t n = x.size();
  py::gil_scoped_release release;
  fastmerge::cpu::scope_grad(src, dst, numels, dtypes, coef, coef + n, coef + 2 * n);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmerge CPU kernels (raw-pointer interface; use fastmerge.* instead)";
  m.def("scope_stats", &scope_stats, py::arg("data"), py::arg("numels"), py::arg("dtypes"),
        py::arg("out"),
        "Write mean, std, count rows (float64, 3 x n) of n contiguous buffers to `out`.");
  m.def("scope_grad", &scope_grad, py::arg("x"), py::arg("out"), py::arg("numels"),
        py::arg("dtypes"), py::arg("coefficients"),
        "out_t = alpha_t + beta_t * (x_t - mean_t); coefficients: float64 rows mean, alpha, beta.");
  m.def("set_num_threads", &fastmerge::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &fastmerge::get_num_threads);
}
