"""Triton kernels of fastmerge, shipped in the wheel as ``fastmerge.kernels``.

One file per op, named like the op; each holds its ``@triton.jit`` kernels and the
launcher that the op's ``triton`` backend calls. On a CPU-only machine they run under
``TRITON_INTERPRET=1`` with CPU tensors; ``AOT_SIGNATURES`` lets the tests compile
every kernel ahead of time for sm_80/sm_90 without a GPU.

Example:
    >>> from fastmerge import kernels  # needs triton
    >>> "scope_stats" in kernels.KERNEL_MODULES, callable(kernels.scope_stats.scope_stats)
    (True, True)
"""

# Why this file lives in python/fastmerge/kernels/ and not in the top-level kernels/:
# the kernel modules stay in the repository's top-level kernels/ folder (one file per
# op; CMakeLists.txt installs them beside this file as fastmerge/kernels/<op>.py), but
# that folder must not be a regular package. `python -m pytest` (and any script run from
# the repository root) puts the root on sys.path first, and a top-level kernels/ with an
# __init__.py would then shadow the PyPI package `kernels` that transformers imports.
# Without an __init__.py the folder is at most a namespace-package portion, which never
# wins over an installed regular package. tests/test_packaging.py guards this.

from __future__ import annotations

import importlib

# The kernel modules, one per op (kernels/<op>.py). To add a kernel, add its name here:
# it is imported as fastmerge.kernels.<name> and its AOT_SIGNATURES are collected below.
KERNEL_MODULES = (
    "conv_gram",
    "feature_center",
    "feature_cost",
    "gram",
    "gta_combine",
    "lowrank_mixture",
    "magnitude_threshold",
    "magprune",
    "nearswap",
    "sce_combine",
    "scope_grad",
    "scope_stats",
    "ties_combine",
    "weighted_sum",
)

# Importing a submodule binds it as an attribute of this package (fastmerge.kernels.<op>).
_modules = [importlib.import_module(f"{__name__}.{name}") for name in KERNEL_MODULES]

#: name -> (kernel, signature, constexprs) for ahead-of-time compilation checks.
AOT_SIGNATURES: dict = {}
for _module in _modules:
    _duplicates = AOT_SIGNATURES.keys() & _module.AOT_SIGNATURES.keys()
    if _duplicates:  # a silent overwrite would drop a kernel from the AOT check
        raise RuntimeError(f"{_module.__name__} redefines AOT kernels {sorted(_duplicates)}")
    AOT_SIGNATURES.update(_module.AOT_SIGNATURES)
del _module, _modules, _duplicates

__all__ = ["AOT_SIGNATURES", "KERNEL_MODULES", *KERNEL_MODULES]
