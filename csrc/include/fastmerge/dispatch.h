// The one dtype dispatch of the kernels: a runtime dtype code (fastmerge/dtypes.h) becomes a
// compile-time tag, so that each kernel names the types it instantiates in one place and every
// entry point rejects an unknown code with the same message.
//
//   dispatch_dtype(code, "op: x", [&](auto tag) {
//     constexpr int32_t DT = decltype(tag)::code;   // kFloat16 ... kFloat64
//     using C = typename decltype(tag)::compute;    // float, or double for kFloat64
//     return kernel<DT, C>(...);
//   });
//   dispatch_dtype<FloatDTypes>(code, "op: x", f);  // only the codes a kernel is built for
//   dispatch_dtypes(in, "op: dtype", out, "op: out_dtype", [&](auto in_tag, auto out_tag) {...});
//
// On the host an unsupported code throws UnsupportedDType ("<name> has unsupported dtype code
// 7; supported codes are 0 (float16), ..."; the bindings raise it as TypeError, like the
// Python ops' own dtype checks). Code that runs on pool workers, where an exception would end
// the process, dispatches only codes that check_dtype accepted before the parallel region.
// Device code cannot throw: there an unknown code takes the last type of the set (float64 for
// AllDTypes), which is what the kernels' switch defaults did; the host built the code tables
// from checked dtypes.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "fastmerge/dtypes.h"

// Always inlined on the host too: the CPU kernels dispatch inside their target_clones
// functions, and only inlined code gets the clone's instruction set (mark the lambdas of hot
// loops FM_INLINE_LAMBDA: `[&](auto tag) FM_INLINE_LAMBDA { ... }`).
// nv_exec_check_disable: the dispatch is __host__ __device__ and calls whatever it is given,
// a host lambda of a launcher or a device lambda of a kernel; only the side that is used gets
// instantiated, so nvcc's execution-space check would only warn about the other.
#if defined(__CUDACC__)
#define FM_DISPATCH_INLINE __host__ __device__ __forceinline__
#define FM_NO_EXEC_CHECK _Pragma("nv_exec_check_disable")
#else
#define FM_DISPATCH_INLINE __attribute__((always_inline)) inline
#define FM_NO_EXEC_CHECK
#endif
#define FM_INLINE_LAMBDA __attribute__((always_inline))

namespace fastmerge {

template <int32_t DT>
struct DTypeTag {
  static constexpr int32_t code = DT;
  // The fused kernels compute the half types and float32 in float32, float64 in double.
  using compute = typename std::conditional<DT == kFloat64, double, float>::type;
};

// A set of dtype codes, in the order the dispatch tries them.
template <int32_t... Codes>
struct DTypes {};
using AllDTypes = DTypes<kFloat16, kBFloat16, kFloat32, kFloat64>;
// The kernels that work in their input's type (float32 or float64 buffers only).
using FloatDTypes = DTypes<kFloat32, kFloat64>;

class UnsupportedDType : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

inline const char* dtype_code_name(int32_t code) {
  switch (code) {
    case kFloat16:
      return "float16";
    case kBFloat16:
      return "bfloat16";
    case kFloat32:
      return "float32";
    case kFloat64:
      return "float64";
    default:
      return "?";
  }
}

// Out of line and cold: the dispatch stays a few compares in the loops that run it per block.
// noipa also keeps GCC from making a private clone of it in every file (one weak copy is left
// per module).
#if defined(__GNUC__) && !defined(__clang__)
#define FM_COLD_PATH __attribute__((noipa, cold))
#else
#define FM_COLD_PATH __attribute__((noinline, cold))
#endif
template <int32_t... Codes>
[[noreturn]] FM_COLD_PATH void throw_unsupported_dtype(DTypes<Codes...>, const char* name,
                                                       int64_t code) {
  std::string message = std::string(name) + " has unsupported dtype code " +
                        std::to_string(code) + "; supported codes are";
  const char* sep = " ";
  ((message += sep + std::to_string(Codes) + " (" + dtype_code_name(Codes) + ")", sep = ", "),
   ...);
  throw UnsupportedDType(message);
}

namespace detail {

FM_NO_EXEC_CHECK
template <class Set, int32_t First, int32_t... Rest, class Code, class F>
FM_DISPATCH_INLINE decltype(auto) dispatch_from(Code code, const char* name, F& f) {
  if constexpr (sizeof...(Rest) == 0) {
#if defined(__CUDA_ARCH__)
    (void)code;
    (void)name;
    return f(DTypeTag<First>{});
#else
    if (code != First) throw_unsupported_dtype(Set{}, name, static_cast<int64_t>(code));
    return f(DTypeTag<First>{});
#endif
  } else {
    if (code == First) return f(DTypeTag<First>{});
    return dispatch_from<Set, Rest...>(code, name, f);
  }
}

FM_NO_EXEC_CHECK
template <int32_t... Codes, class Code, class F>
FM_DISPATCH_INLINE decltype(auto) dispatch_in(DTypes<Codes...>, Code code, const char* name,
                                              F& f) {
  return dispatch_from<DTypes<Codes...>, Codes...>(code, name, f);
}

// The full set as a switch, the shape the kernels had: per-entry device dispatches (a tensor
// table's codes) then compile to the same code as before.
FM_NO_EXEC_CHECK
template <class Code, class F>
FM_DISPATCH_INLINE decltype(auto) dispatch_in(AllDTypes, Code code, const char* name, F& f) {
  switch (code) {
    case kFloat16:
      return f(DTypeTag<kFloat16>{});
    case kBFloat16:
      return f(DTypeTag<kBFloat16>{});
    case kFloat32:
      return f(DTypeTag<kFloat32>{});
#if defined(__CUDA_ARCH__)
    default:
      (void)name;
      return f(DTypeTag<kFloat64>{});
#else
    case kFloat64:
      return f(DTypeTag<kFloat64>{});
    default:
      throw_unsupported_dtype(AllDTypes{}, name, static_cast<int64_t>(code));
#endif
  }
}

}  // namespace detail

// f(DTypeTag<code>{}) for the code of `name`, one of Set; returns what f returns (the same
// type for every code of the set). Code is any integer type: device tables hold int64 codes,
// compared as they are.
FM_NO_EXEC_CHECK
template <class Set = AllDTypes, class Code, class F>
FM_DISPATCH_INLINE decltype(auto) dispatch_dtype(Code code, const char* name, F&& f) {
  static_assert(std::is_integral<Code>::value, "a dtype code is an integer");
  return detail::dispatch_in(Set{}, code, name, f);
}

// Nested dispatch over two codes (an input and an output dtype): f(tag_a, tag_b).
// (Host code only: the kernels' entry points.)
template <class SetA = AllDTypes, class SetB = AllDTypes, class F>
inline decltype(auto) dispatch_dtypes(int32_t a, const char* name_a, int32_t b,
                                     const char* name_b, F&& f) {
  return dispatch_dtype<SetA>(a, name_a, [&](auto ta) {
    return dispatch_dtype<SetB>(b, name_b, [&](auto tb) { return f(ta, tb); });
  });
}

// Throws UnsupportedDType unless code is one of Set: for codes that are dispatched later on
// pool workers.
template <class Set = AllDTypes>
inline void check_dtype(int64_t code, const char* name) {
  dispatch_dtype<Set>(code, name, [](auto) {});
}

#if defined(__CUDACC__)
// Element i of a buffer whose dtype code the kernel reads at run time (from a tensor table),
// as C; the code is uniform across the grid, so this never diverges. Written out as the
// switch the kernels had rather than through dispatch_dtype: through the lambda nvcc
// schedules the float32 kernels' loads differently (same values, other code), and without
// a GPU here to time them the kernels keep their code.
template <typename C, class Code>
__device__ __forceinline__ C load_any(const void* x, Code code, int64_t i) {
  switch (code) {
    case kFloat16:
      return static_cast<C>(load_as_double<kFloat16>(x, i));
    case kBFloat16:
      return static_cast<C>(load_as_double<kBFloat16>(x, i));
    case kFloat32:
      return static_cast<C>(load_as_double<kFloat32>(x, i));
    default:
      return static_cast<C>(load_as_double<kFloat64>(x, i));
  }
}
#endif

}  // namespace fastmerge
