"""Triton kernels of fastmerge, shipped in the wheel as ``fastmerge.kernels``.

One file per op, named like the op; each holds its ``@triton.jit`` kernels and the
launcher that the op's ``triton`` backend calls. On a CPU-only machine they run under
``TRITON_INTERPRET=1`` with CPU tensors; ``AOT_SIGNATURES`` lets the tests compile
every kernel ahead of time for sm_80/sm_90 without a GPU.
"""

from . import (
    conv_gram,
    feature_center,
    feature_cost,
    lowrank_mixture,
    magnitude_threshold,
    scope_grad,
    scope_stats,
    ties_combine,
)

# name -> (kernel, signature, constexprs) for ahead-of-time compilation checks.
AOT_SIGNATURES = {
    **scope_stats.AOT_SIGNATURES,
    **scope_grad.AOT_SIGNATURES,
    **feature_center.AOT_SIGNATURES,
    **feature_cost.AOT_SIGNATURES,
    **conv_gram.AOT_SIGNATURES,
    **lowrank_mixture.AOT_SIGNATURES,
    **magnitude_threshold.AOT_SIGNATURES,
    **ties_combine.AOT_SIGNATURES,
}

__all__ = [
    "AOT_SIGNATURES",
    "conv_gram",
    "feature_center",
    "feature_cost",
    "lowrank_mixture",
    "magnitude_threshold",
    "scope_grad",
    "scope_stats",
    "ties_combine",
]
