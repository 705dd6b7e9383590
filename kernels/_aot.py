"""The entries of the kernel modules' ``AOT_SIGNATURES`` tables, written by one helper.

Each kernel module lists, per compiled variant, ``name -> (kernel, signature,
constexprs)``: Triton's type of every argument (``"*fp32"``, ``"i64"``, or
``"constexpr"``) and the values of the constexpr arguments, which the tests compile ahead
of time for sm_80/sm_90 (tests/test_gpu_build.py). :func:`aot_entry` writes the
``"constexpr"`` types from the constexpr values and checks the signature against the
kernel's own argument list, so a module states only its argument types and the values
that make the variant; :data:`FLOAT_TYPES` and :func:`compute_name` are the dtype tables
that every module used to write out
(with :func:`compute_type`).
"""

from __future__ import annotations

from typing import Any

import triton.language as tl

#: Triton's name of each floating element type the kernels take, with its ``tl`` type.
FLOAT_TYPES = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32, "fp64": tl.float64}


def compute_name(name: str) -> str:
    """The type a kernel computes in for elements of type `name` (a key of
    :data:`FLOAT_TYPES`): float64 for float64, float32 for the others.

    Example:
        >>> compute_name("bf16"), compute_name("fp64")
        ('fp32', 'fp64')
    """
    return "fp64" if name == "fp64" else "fp32"


def compute_type(name: str) -> Any:
    """The ``tl`` type of :func:`compute_name`, the value of a ``COMPUTE`` constexpr.

    Example:
        >>> compute_type("fp16") == tl.float32
        True
    """
    return FLOAT_TYPES[compute_name(name)]


def aot_entry(
    kernel: Any, types: dict[str, str], constexprs: dict[str, Any]
) -> tuple[Any, dict[str, str], dict[str, Any]]:
    """``(kernel, signature, constexprs)`` for one ``AOT_SIGNATURES`` entry: the
    signature is `types` (the runtime arguments) followed by ``"constexpr"`` for each
    name of `constexprs`, and must name the kernel's arguments in the kernel's order
    (a :class:`ValueError` naming the kernel otherwise).

    Example:
        >>> from types import SimpleNamespace
        >>> k = SimpleNamespace(__name__="k", arg_names=["x_ptr", "n", "BLOCK"])
        >>> aot_entry(k, {"x_ptr": "*fp32", "n": "i64"}, {"BLOCK": 1024})[1:]
        ({'x_ptr': '*fp32', 'n': 'i64', 'BLOCK': 'constexpr'}, {'BLOCK': 1024})
    """
    signature = {**types, **dict.fromkeys(constexprs, "constexpr")}
    expected = list(kernel.arg_names)
    if list(signature) != expected:
        raise ValueError(
            f"AOT signature of {kernel.__name__} names the arguments {list(signature)}, "
            f"but the kernel takes {expected}"
        )
    return kernel, signature, constexprs
