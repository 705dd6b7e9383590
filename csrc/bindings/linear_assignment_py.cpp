// The whole-call entries of the CPU linear assignment (their m.def is in cpu_module.cpp).
//
// Besides the raw-pointer entry every op has, two entries solve a whole call, with the
// outputs allocated here, for the per-call overhead: a tiny problem solves in well under
// a microsecond, and the Python work around it (allocating outputs, orienting, checking)
// used to cost 20 us. `linear_assignment_solve` takes a pointer, type code, shape and
// strides (from a torch tensor); `linear_assignment_array` reads a numpy array itself.
// Both return (rows, cols, failed, status): numpy int64 arrays, the first failed problem
// (-1: none) and its CostStatus; the caller words the error.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "../cpu/linear_assignment.h"
#include "linear_assignment_py.h"

namespace py = pybind11;

namespace fastmerge::bindings {
namespace {

// Below this many entries the solve is shorter than releasing and re-taking the GIL.
constexpr int64_t kReleaseGilEntries = 1 << 14;

py::tuple solve(const void* data, int32_t type, int ndim, const int64_t* shape,
                const int64_t* strides, bool maximize) {
  const bool batched = ndim == 3;
  const int64_t batch = batched ? shape[0] : 1;
  const int64_t rows = shape[ndim - 2], cols = shape[ndim - 1];
  const int64_t sb = batched ? strides[0] : 0;
  const int64_t sr = strides[ndim - 2], sc = strides[ndim - 1];
  const int64_t pairs = std::min(rows, cols);
  py::array_t<int64_t> row_out =
      batched ? py::array_t<int64_t>({batch, pairs}) : py::array_t<int64_t>(pairs);
  py::array_t<int64_t> col_out =
      batched ? py::array_t<int64_t>({batch, pairs}) : py::array_t<int64_t>(pairs);
  int64_t failed = -1;
  int32_t code = 0;
  if (batch > 0 && pairs > 0) {
    int32_t one_status;
    std::vector<int32_t> many;
    int32_t* status = &one_status;
    if (batch > 1) {
      many.resize(batch);
      status = many.data();
    }
    auto run = [&] {
      failed = cpu::linear_assignment(data, type, batch, rows, cols, sb, sr, sc, maximize,
                                      false, row_out.mutable_data(), col_out.mutable_data(),
                                      status);
    };
    if (batch * rows * cols >= kReleaseGilEntries) {
      py::gil_scoped_release release;
      run();
    } else {
      run();
    }
    if (failed >= 0) code = status[failed];
  }
  return py::make_tuple(std::move(row_out), std::move(col_out), failed, code);
}

// The CostType of a numpy dtype, or -1 when the solver cannot read it in place.
int32_t numpy_type(const py::dtype& dt) {
  if (dt.byteorder() == '>') return -1;  // non-native byte order (little-endian hosts)
  const int size = static_cast<int>(dt.itemsize());
  switch (dt.kind()) {
    case 'f':
      return size == 8 ? cpu::kCostFloat64 : size == 4 ? cpu::kCostFloat32
                                        : size == 2 ? cpu::kCostFloat16
                                                    : -1;
    case 'i':
      return size == 1   ? cpu::kCostInt8
             : size == 2 ? cpu::kCostInt16
             : size == 4 ? cpu::kCostInt32
             : size == 8 ? cpu::kCostInt64
                         : -1;
    case 'u':
      return size == 1   ? cpu::kCostUInt8
             : size == 2 ? cpu::kCostUInt16
             : size == 4 ? cpu::kCostUInt32
             : size == 8 ? cpu::kCostUInt64
                         : -1;
    case 'b':
      return size == 1 ? cpu::kCostBool : -1;
    default:
      return -1;
  }
}

}  // namespace

py::tuple linear_assignment_solve(uintptr_t cost, int32_t type, const py::tuple& shape,
                                  const py::tuple& strides, bool maximize) {
  const auto ndim = static_cast<int>(shape.size());
  if ((ndim != 2 && ndim != 3) || static_cast<int>(strides.size()) != ndim) {
    throw py::value_error("linear_assignment_solve: shape and strides must be 2-D or 3-D");
  }
  int64_t sh[3], st[3];
  for (int d = 0; d < ndim; ++d) {
    sh[d] = shape[d].cast<int64_t>();
    st[d] = strides[d].cast<int64_t>();
  }
  return solve(reinterpret_cast<const void*>(cost), type, ndim, sh, st, maximize);
}

py::object linear_assignment_array(const py::object& object, bool maximize) {
  if (!py::isinstance<py::array>(object)) return py::none();
  const auto cost = py::reinterpret_borrow<py::array>(object);
  const auto ndim = static_cast<int>(cost.ndim());
  const int32_t type = numpy_type(cost.dtype());
  if ((ndim != 2 && ndim != 3) || type < 0) return py::none();
  const auto size = static_cast<int64_t>(cost.itemsize());
  if (reinterpret_cast<uintptr_t>(cost.data()) % size != 0) return py::none();
  int64_t sh[3], st[3];
  for (int d = 0; d < ndim; ++d) {
    sh[d] = static_cast<int64_t>(cost.shape(d));
    const auto bytes = static_cast<int64_t>(cost.strides(d));
    if (bytes % size != 0) return py::none();  // unaligned rows: not in place
    st[d] = bytes / size;
  }
  return solve(cost.data(), type, ndim, sh, st, maximize);
}

}  // namespace fastmerge::bindings
