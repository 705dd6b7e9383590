// Shared by both pybind11 modules: an unsupported dtype code (fastmerge::UnsupportedDType,
// from the dispatch in fastmerge/dispatch.h) reaches Python as a TypeError, like the Python
// ops' own dtype checks, with the message naming the argument and the code.
#pragma once

#include <pybind11/pybind11.h>

#include <exception>

#include "fastmerge/dispatch.h"

namespace fastmerge {

inline void register_dtype_errors() {
  pybind11::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const UnsupportedDType& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });
}

}  // namespace fastmerge
