"""The PTX check shared by the ops whose Triton kernels must round like their references:
compile every ahead-of-time signature of a kernel module for sm_90 (no GPU needed) and
look for fused multiply-adds and inexact divisions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import re, sys
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module("fastmerge.kernels." + sys.argv[1])
    for name, (kernel, signature, constexprs) in module.AOT_SIGNATURES.items():
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32),
            options=module.COMPILE_OPTIONS,
        )
        ptx = compiled.asm["ptx"]
        assert not re.search(r"\\bfma\\.", ptx), name
        if name not in sys.argv[2:]:  # the kernels that divide
            assert re.search(r"\\bdiv\\.rn\\.f(32|64)\\b", ptx), name
        assert not re.search(r"\\bdiv\\.(full|approx)\\.", ptx), name
        print("checked", name)
    """
)


def triton_kernels_checked(module: str, without_division: tuple[str, ...] = ()) -> int:
    """How many signatures of ``fastmerge.kernels.<module>`` compiled with no FMA and with
    correctly rounded divisions (an AssertionError with the compiler's message otherwise);
    the signatures named in `without_division` need not divide at all."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, module, *without_division], env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.count("checked")
