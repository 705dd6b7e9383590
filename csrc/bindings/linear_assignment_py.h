// Whole-call entries of the CPU linear assignment, bound in cpu_module.cpp (see
// linear_assignment_py.cpp). Both return (rows, cols, failed, status).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace fastmerge::bindings {

// A 2-D or 3-D cost given as pointer, CostType code, shape and element strides.
pybind11::tuple linear_assignment_solve(uintptr_t cost, int32_t type,
                                        const pybind11::tuple& shape,
                                        const pybind11::tuple& strides, bool maximize);
// A numpy array read in place; None when its dtype, layout or rank is not one it reads.
pybind11::object linear_assignment_array(const pybind11::object& cost, bool maximize);

}  // namespace fastmerge::bindings
