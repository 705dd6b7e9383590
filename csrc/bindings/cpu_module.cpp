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

#include "../cpu/conv_gram.h"
#include "../cpu/feature_center.h"
#include "../cpu/feature_cost.h"
#include "../cpu/gram.h"
#include "../cpu/gta_combine.h"
#include "../cpu/linear_assignment.h"
#include "../cpu/lowrank_mixture.h"
#include "../cpu/magnitude_threshold.h"
#include "../cpu/magprune.h"
#include "../cpu/nearswap.h"
#include "../cpu/sce_combine.h"
#include "../cpu/scope_grad.h"
#include "../cpu/scope_stats.h"
#include "../cpu/ties_combine.h"
#include "../cpu/weighted_sum.h"
#include "dtype_errors.h"
#include "fastmerge/parallel.h"
#include "linear_assignment_py.h"

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

// Reads (data pointer, numel, dtype code) straight from a list of torch tensors with
// the CPython API: for thousands of small tensors this per-tensor marshalling, not the
// arithmetic, is the cost, and doing it here is several times cheaper than in Python.
// Returns the index of the first tensor that is not a contiguous CPU tensor of a
// supported dtype (the caller then validates in Python and reports), or -1.
struct Buffers {
  std::vector<const void*> data;
  std::vector<int64_t> numels;
  std::vector<int32_t> dtypes;
};

int64_t collect_cpu_buffers(const py::list& tensors, const py::dict& dtype_codes, Buffers& out) {
  static PyObject* const data_ptr = PyUnicode_InternFromString("data_ptr");
  static PyObject* const numel = PyUnicode_InternFromString("numel");
  static PyObject* const dtype = PyUnicode_InternFromString("dtype");
  static PyObject* const is_cpu = PyUnicode_InternFromString("is_cpu");
  static PyObject* const is_contiguous = PyUnicode_InternFromString("is_contiguous");
  const Py_ssize_t n = PyList_GET_SIZE(tensors.ptr());
  out.data.resize(n);
  out.numels.resize(n);
  out.dtypes.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* t = PyList_GET_ITEM(tensors.ptr(), i);
    py::object cpu = py::reinterpret_steal<py::object>(PyObject_GetAttr(t, is_cpu));
    if (!cpu || cpu.ptr() != Py_True) return i;
    py::object dt = py::reinterpret_steal<py::object>(PyObject_GetAttr(t, dtype));
    PyObject* code = dt ? PyDict_GetItem(dtype_codes.ptr(), dt.ptr()) : nullptr;  // borrowed
    if (code == nullptr) return i;
    py::object contiguous =
        py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(t, is_contiguous));
    if (!contiguous || contiguous.ptr() != Py_True) return i;
    py::object ptr = py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(t, data_ptr));
    py::object count = py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(t, numel));
    if (!ptr || !count) throw py::error_already_set();
    out.data[i] = reinterpret_cast<const void*>(PyLong_AsUnsignedLongLong(ptr.ptr()));
    out.numels[i] = PyLong_AsLongLong(count.ptr());
    out.dtypes[i] = static_cast<int32_t>(PyLong_AsLong(code));
  }
  PyErr_Clear();  // attribute lookups that failed were reported through the index
  return -1;
}

int64_t scope_stats_tensors(const py::list& tensors, const py::dict& dtype_codes, uintptr_t out) {
  Buffers buffers;
  const int64_t bad = collect_cpu_buffers(tensors, dtype_codes, buffers);
  if (bad >= 0) {
    PyErr_Clear();
    return bad;
  }
  auto* stats = reinterpret_cast<double*>(out);
  const size_t n = buffers.data.size();
  py::gil_scoped_release release;
  fastmerge::cpu::scope_stats(buffers.data, buffers.numels, buffers.dtypes, stats, stats + n,
                              stats + 2 * n);
  return -1;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmerge CPU kernels (raw-pointer interface; use fastmerge.* instead)";
  fastmerge::register_dtype_errors();
  m.def("scope_stats", &scope_stats, py::arg("data"), py::arg("numels"), py::arg("dtypes"),
        py::arg("out"),
        "Write mean, std, count rows (float64, 3 x n) of n contiguous buffers to `out`.");
  m.def("scope_stats_tensors", &scope_stats_tensors, py::arg("tensors"),
        py::arg("dtype_codes"), py::arg("out"),
        "scope_stats on a list of torch CPU tensors; returns -1, or the index of the first "
        "tensor that is not a contiguous CPU tensor of a dtype in dtype_codes (nothing "
        "is computed then).");
  m.def("scope_grad", &scope_grad, py::arg("x"), py::arg("out"), py::arg("numels"),
        py::arg("dtypes"), py::arg("coefficients"),
        "out_t = alpha_t + beta_t * (x_t - mean_t); coefficients: float64 rows mean, alpha, beta.");
  m.def(
      "linear_assignment",
      [](uintptr_t cost, int32_t type, int64_t batch, int64_t rows, int64_t cols,
         int64_t stride_b, int64_t stride_r, int64_t stride_c, bool maximize, bool generic,
         uintptr_t row_out, uintptr_t col_out, uintptr_t status) {
        py::gil_scoped_release release;
        return fastmerge::cpu::linear_assignment(
            reinterpret_cast<const void*>(cost), type, batch, rows, cols, stride_b, stride_r,
            stride_c, maximize, generic, reinterpret_cast<int64_t*>(row_out),
            reinterpret_cast<int64_t*>(col_out), reinterpret_cast<int32_t*>(status));
      },
      py::arg("cost"), py::arg("type"), py::arg("batch"), py::arg("rows"), py::arg("cols"),
      py::arg("stride_b"), py::arg("stride_r"), py::arg("stride_c"), py::arg("maximize"),
      py::arg("generic"), py::arg("row_out"), py::arg("col_out"), py::arg("status"),
      "Solve batch x rows x cols assignment problems (element strides, CostType `type`); "
      "status per problem 0 ok, 1 infeasible, 2 invalid entry, 3 integer beyond 2^53. "
      "Returns the first problem that failed, or -1.");
  // The whole-call entries (linear_assignment_py.cpp): outputs allocated in C++, for a
  // tiny problem's per-call overhead.
  m.def(
      "linear_assignment_solve",
      [](uintptr_t cost, int32_t type, const py::tuple& shape, const py::tuple& strides,
         bool maximize) {
        return fastmerge::bindings::linear_assignment_solve(cost, type, shape, strides,
                                                            maximize);
      },
      py::arg("cost"), py::arg("type"), py::arg("shape"), py::arg("strides"),
      py::arg("maximize"),
      "Solve a 2-D or 3-D strided cost array (element strides); returns (rows, cols, "
      "failed, status) with numpy int64 outputs.");
  m.def(
      "linear_assignment_array",
      [](const py::object& cost, bool maximize) {
        return fastmerge::bindings::linear_assignment_array(cost, maximize);
      },
      py::arg("cost"), py::arg("maximize"),
      "linear_assignment_solve on a numpy array read in place; None when its dtype, "
      "layout or rank is not one it reads (the caller converts it first).");
  m.def(
      "feature_center",
      [](uintptr_t x, int32_t dtype, int64_t rows, int64_t cols, int64_t x_row_stride,
         uintptr_t shift, uintptr_t out, int32_t out_dtype, int64_t out_row_stride,
         uintptr_t sums) {
        py::gil_scoped_release release;
        fastmerge::cpu::feature_center(reinterpret_cast<const void*>(x), dtype, rows, cols,
                                       x_row_stride, reinterpret_cast<const double*>(shift),
                                       reinterpret_cast<void*>(out), out_dtype, out_row_stride,
                                       reinterpret_cast<double*>(sums));
      },
      py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("x_row_stride"),
      py::arg("shift"), py::arg("out"), py::arg("out_dtype"), py::arg("out_row_stride"),
      py::arg("sums"),
      "out = x - shift in out_dtype (float32/float64 code); sums: float64 2 x cols, the column "
      "sums of out and of out**2.");
  m.def(
      "feature_cost",
      [](uintptr_t cross, int64_t rows, int64_t cols, uintptr_t sum_a, uintptr_t sum_b,
         uintptr_t sumsq_a, uintptr_t sumsq_b, uintptr_t shift_a, uintptr_t shift_b,
         double count, int32_t kind, uintptr_t out) {
        auto f64 = [](uintptr_t p) { return reinterpret_cast<const double*>(p); };
        py::gil_scoped_release release;
        fastmerge::cpu::feature_cost(f64(cross), rows, cols, f64(sum_a), f64(sum_b),
                                     f64(sumsq_a), f64(sumsq_b), f64(shift_a), f64(shift_b),
                                     count, kind, reinterpret_cast<double*>(out));
      },
      py::arg("cross"), py::arg("rows"), py::arg("cols"), py::arg("sum_a"), py::arg("sum_b"),
      py::arg("sumsq_a"), py::arg("sumsq_b"), py::arg("shift_a"), py::arg("shift_b"),
      py::arg("count"), py::arg("kind"), py::arg("out"),
      "float64 rows x cols feature cost (kind 0 covariance, 1 correlation, 2 inner product, "
      "3 negative squared distance) from shifted moments.");
  m.def(
      "conv_gram",
      [](uintptr_t x, uintptr_t y, int32_t dtype, const std::vector<int64_t>& geometry,
         uintptr_t out) {
        check_lengths(fastmerge::kConvGeometryFields, geometry.size(), "geometry");
        fastmerge::ConvGeometry g;
        int64_t* fields = &g.n;
        for (int k = 0; k < fastmerge::kConvGeometryFields; ++k) fields[k] = geometry[k];
        py::gil_scoped_release release;
        fastmerge::cpu::conv_gram(reinterpret_cast<const void*>(x),
                                  reinterpret_cast<const void*>(y), dtype, g,
                                  reinterpret_cast<double*>(out));
      },
      py::arg("x"), py::arg("y"), py::arg("dtype"), py::arg("geometry"), py::arg("out"),
      "Upper triangle of [patches | y]^T [patches | y] of a convolution (float64 features x "
      "columns) without materializing the patches; geometry: n, c_in, h, w, c_out, h_out, "
      "w_out, kh, kw, sh, sw, ph, pw, dh, dw, bias.");
  m.def(
      "gram",
      [](const std::vector<uintptr_t>& inputs, const std::vector<int32_t>& dtypes,
         uintptr_t base, int32_t base_dtype, int64_t rows, int64_t cols, int32_t mode,
         bool float64, uintptr_t out) {
        check_lengths(inputs.size(), dtypes.size(), "dtypes");
        const auto pointers = as_pointers<const void*>(inputs);
        py::gil_scoped_release release;
        fastmerge::cpu::gram(pointers, dtypes, reinterpret_cast<const void*>(base), base_dtype,
                             rows, cols, mode, float64, reinterpret_cast<double*>(out));
      },
      py::arg("inputs"), py::arg("dtypes"), py::arg("base"), py::arg("base_dtype"),
      py::arg("rows"), py::arg("cols"), py::arg("mode"), py::arg("float64"), py::arg("out"),
      "float64 (batch, k, k) Gram matrices of k (rows, cols) buffers (dtype codes per input; "
      "base 0: none): mode 0 the whole buffer, 1 each row, 2 each column; x = input - base "
      "rounded in float32 (float64 when float64), products and sums in float64.");
  m.def(
      "lowrank_gate_scale",
      [](uintptr_t z, int32_t dtype, int64_t rows, int64_t tasks, int64_t rank,
         int64_t z_row_stride, uintptr_t gates, int64_t gate_row_stride, int64_t tokens) {
        py::gil_scoped_release release;
        fastmerge::cpu::lowrank_gate_scale(reinterpret_cast<void*>(z), dtype, rows, tasks, rank,
                                           z_row_stride, reinterpret_cast<const void*>(gates),
                                           gate_row_stride, tokens);
      },
      py::arg("z"), py::arg("dtype"), py::arg("rows"), py::arg("tasks"), py::arg("rank"),
      py::arg("z_row_stride"), py::arg("gates"), py::arg("gate_row_stride"), py::arg("tokens"),
      "In place: z[m, t * rank + k] *= gates[m // tokens, t] (float32/float64 codes).");
  m.def(
      "lowrank_rows",
      [](bool scatter_add, uintptr_t dst, int64_t dst_row_stride, uintptr_t src,
         int64_t src_row_stride, uintptr_t index, int64_t count, int64_t tokens, int64_t cols,
         int32_t dtype) {
        const auto* idx = reinterpret_cast<const int64_t*>(index);
        py::gil_scoped_release release;
        if (scatter_add) {
          fastmerge::cpu::lowrank_scatter_add_rows(reinterpret_cast<void*>(dst), dst_row_stride,
                                                   reinterpret_cast<const void*>(src),
                                                   src_row_stride, idx, count, tokens, cols, dtype);
        } else {
          fastmerge::cpu::lowrank_gather_rows(reinterpret_cast<void*>(dst), dst_row_stride,
                                              reinterpret_cast<const void*>(src), src_row_stride,
                                              idx, count, tokens, cols, dtype);
        }
      },
      py::arg("scatter_add"), py::arg("dst"), py::arg("dst_row_stride"), py::arg("src"),
      py::arg("src_row_stride"), py::arg("index"), py::arg("count"), py::arg("tokens"),
      py::arg("cols"), py::arg("dtype"),
      "By blocks of `tokens` rows: gather dst[b] = src[index[b]], or scatter-add "
      "dst[index[b]] += src[b] (distinct indices); float32/float64 codes.");
  m.def(
      "magnitude_threshold",
      [](uintptr_t base, const std::vector<uintptr_t>& experts, int64_t n, int32_t dtype,
         int64_t k, uintptr_t out) {
        const auto pointers = as_pointers<const void*>(experts);
        py::gil_scoped_release release;
        fastmerge::cpu::magnitude_threshold(reinterpret_cast<const void*>(base), pointers, n,
                                            dtype, k, reinterpret_cast<void*>(out));
      },
      py::arg("base"), py::arg("experts"), py::arg("n"), py::arg("dtype"), py::arg("k"),
      py::arg("out"),
      "out[t] = k-th largest |experts[t] - base| (float32, float64 for float64 inputs).");
  m.def(
      "gta_combine",
      [](uintptr_t base, const std::vector<uintptr_t>& experts, int64_t n, int32_t dtype,
         uintptr_t params, uintptr_t random, int64_t offset, bool consensus, bool drop_zero_sum,
         bool normalize, double lam, uintptr_t out, int32_t out_dtype) {
        const auto pointers = as_pointers<const void*>(experts);
        py::gil_scoped_release release;
        fastmerge::cpu::gta_combine(reinterpret_cast<const void*>(base), pointers, n, dtype,
                                    reinterpret_cast<const void*>(params),
                                    reinterpret_cast<const int64_t*>(random), offset, consensus,
                                    drop_zero_sum, normalize, lam, reinterpret_cast<void*>(out),
                                    out_dtype);
      },
      py::arg("base"), py::arg("experts"), py::arg("n"), py::arg("dtype"), py::arg("params"),
      py::arg("random"), py::arg("offset"), py::arg("consensus"), py::arg("drop_zero_sum"),
      py::arg("normalize"), py::arg("lam"), py::arg("out"), py::arg("out_dtype"),
      "Generalized task arithmetic of one tensor: params (compute type, 4 x T: weights, lower, "
      "upper, scales), random (0, or int64 2 x T: keys, keep_below), sign election, "
      "base + lam * mixed.");
  m.def(
      "sce_variance",
      [](uintptr_t base, const std::vector<uintptr_t>& experts, int64_t n, int32_t dtype,
         uintptr_t var) {
        const auto pointers = as_pointers<const void*>(experts);
        py::gil_scoped_release release;
        fastmerge::cpu::sce_variance(reinterpret_cast<const void*>(base), pointers, n, dtype,
                                     reinterpret_cast<void*>(var));
      },
      py::arg("base"), py::arg("experts"), py::arg("n"), py::arg("dtype"), py::arg("var"),
      "SCE's variance across the models of tau_t = experts[t] - base (population, the mean "
      "first), n values of the compute type written into var.");
  m.def(
      "sce_energies",
      [](uintptr_t base, const std::vector<uintptr_t>& experts, int64_t n, int32_t dtype,
         bool select, uintptr_t threshold, uintptr_t sums) {
        const auto pointers = as_pointers<const void*>(experts);
        py::gil_scoped_release release;
        fastmerge::cpu::sce_energies(reinterpret_cast<const void*>(base), pointers, n, dtype,
                                     select, reinterpret_cast<const void*>(threshold),
                                     reinterpret_cast<double*>(sums));
      },
      py::arg("base"), py::arg("experts"), py::arg("n"), py::arg("dtype"), py::arg("select"),
      py::arg("threshold"), py::arg("sums"),
      "SCE's energies: float64 sum of the squared kept tau_t per expert (kept: variance >= "
      "threshold when select).");
  m.def(
      "sce_combine",
      [](uintptr_t base, const std::vector<uintptr_t>& experts, int64_t n, int32_t dtype,
         bool select, uintptr_t threshold, uintptr_t weights, uintptr_t out, int32_t out_dtype) {
        const auto pointers = as_pointers<const void*>(experts);
        py::gil_scoped_release release;
        fastmerge::cpu::sce_combine(reinterpret_cast<const void*>(base), pointers, n, dtype,
                                    select, reinterpret_cast<const void*>(threshold),
                                    reinterpret_cast<const void*>(weights),
                                    reinterpret_cast<void*>(out), out_dtype);
      },
      py::arg("base"), py::arg("experts"), py::arg("n"), py::arg("dtype"), py::arg("select"),
      py::arg("threshold"), py::arg("weights"), py::arg("out"), py::arg("out_dtype"),
      "SCE's erase of one tensor: elect the sign of the sum of the kept tau, base + weighted "
      "mean of the agreeing kept tau (divisor floored at 1e-6).");
  m.def(
      "ties_combine",
      [](uintptr_t base, const std::vector<uintptr_t>& experts, int64_t n, int32_t dtype,
         uintptr_t thresholds, double scale, uintptr_t out, int32_t out_dtype) {
        const auto pointers = as_pointers<const void*>(experts);
        py::gil_scoped_release release;
        fastmerge::cpu::ties_combine(reinterpret_cast<const void*>(base), pointers, n, dtype,
                                     reinterpret_cast<const void*>(thresholds), scale,
                                     reinterpret_cast<void*>(out), out_dtype);
      },
      py::arg("base"), py::arg("experts"), py::arg("n"), py::arg("dtype"), py::arg("thresholds"),
      py::arg("scale"), py::arg("out"), py::arg("out_dtype"),
      "TIES combine of one tensor: trim by thresholds, elect signs, base + scale * disjoint mean.");
  m.def(
      "weighted_sum",
      [](const std::vector<uintptr_t>& inputs, const std::vector<int32_t>& dtypes,
         const std::vector<double>& weights, int64_t n, bool float64, uintptr_t out,
         int32_t out_dtype) {
        check_lengths(inputs.size(), dtypes.size(), "dtypes");
        check_lengths(inputs.size(), weights.size(), "weights");
        const auto pointers = as_pointers<const void*>(inputs);
        py::gil_scoped_release release;
        fastmerge::cpu::weighted_sum(pointers, dtypes, weights, n, float64,
                                     reinterpret_cast<void*>(out), out_dtype);
      },
      py::arg("inputs"), py::arg("dtypes"), py::arg("weights"), py::arg("n"), py::arg("float64"),
      py::arg("out"), py::arg("out_dtype"),
      "out = sum_t weights[t] * inputs[t] (n elements each, dtype codes per input), "
      "accumulated in float32 (float64 when float64), written in out_dtype.");
  m.def(
      "nearswap",
      [](uintptr_t a, int32_t a_dtype, uintptr_t b, int32_t b_dtype, double t, int64_t n,
         bool float64, uintptr_t out, int32_t out_dtype) {
        py::gil_scoped_release release;
        fastmerge::cpu::nearswap(reinterpret_cast<const void*>(a), a_dtype,
                                 reinterpret_cast<const void*>(b), b_dtype, t, n, float64,
                                 reinterpret_cast<void*>(out), out_dtype);
      },
      py::arg("a"), py::arg("a_dtype"), py::arg("b"), py::arg("b_dtype"), py::arg("t"),
      py::arg("n"), py::arg("float64"), py::arg("out"), py::arg("out_dtype"),
      "out = w * b + (1 - w) * a with w = clamp(t / max(|a - b|, 1e-6), 0, 1) (n elements, "
      "dtype codes per input), in float32 (float64 when float64), written in out_dtype.");
  m.def(
      "magprune",
      [](uintptr_t base, int32_t base_dtype, uintptr_t expert, int32_t expert_dtype, int64_t n,
         int64_t width, int64_t inner, bool float64, int64_t key, int64_t below, int64_t step,
         int64_t offset, uintptr_t out, int32_t out_dtype, uintptr_t norms) {
        py::gil_scoped_release release;
        fastmerge::cpu::magprune(reinterpret_cast<const void*>(base), base_dtype,
                                 reinterpret_cast<const void*>(expert), expert_dtype, n, width,
                                 inner, float64, key, below, step, offset,
                                 reinterpret_cast<void*>(out), out_dtype,
                                 reinterpret_cast<double*>(norms));
      },
      py::arg("base"), py::arg("base_dtype"), py::arg("expert"), py::arg("expert_dtype"),
      py::arg("n"), py::arg("width"), py::arg("inner"), py::arg("float64"), py::arg("key"),
      py::arg("below"), py::arg("step"), py::arg("offset"), py::arg("out"),
      py::arg("out_dtype"), py::arg("norms"),
      "DELLA's MAGPRUNE of tau = expert - base: per row (width entries at stride inner) "
      "keep the entry of |tau| rank r iff its hash is below below + r * step; writes the kept "
      "tau into out and [sum |tau|, sum kept |tau|] into norms (2 float64).");
  m.def("set_num_threads", &fastmerge::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &fastmerge::get_num_threads);
}
