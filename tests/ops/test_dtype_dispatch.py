"""Every native entry point rejects an unsupported dtype code with the dispatch's message.

The ops validate dtypes in Python, so these paths are reachable only by calling the
bindings directly: each call passes one bad code (7) and otherwise plausible arguments,
and must raise TypeError naming the argument and the code before it touches a buffer
(csrc/include/fastmerge/dispatch.h). The CUDA cases need only an importable
``fastmerge._cuda``: the host dispatch raises before any CUDA call, so they run without a GPU.
"""

from __future__ import annotations

import importlib

import pytest
import torch

BAD = 7
ALL = r"supported codes are 0 \(float16\), 1 \(bfloat16\), 2 \(float32\), 3 \(float64\)$"
FLOAT = r"supported codes are 2 \(float32\), 3 \(float64\)$"
F32, F64 = 2, 3


def _message(name: str, supported: str, bad: int) -> str:
    return rf"^{name} has unsupported dtype code {bad}; {supported}"


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as error:
        pytest.skip(f"{name} is not built ({error})")


@pytest.fixture(scope="module")
def buf() -> torch.Tensor:
    # Never read: every call raises first. Real memory all the same, in case one did not.
    return torch.zeros(4096, dtype=torch.float64)


GEOMETRY = [1, 1, 4, 4, 1, 4, 4, 1, 1, 1, 1, 0, 0, 1, 1, 0]  # a 1x1 convolution of 4x4

CPU_CASES = {
    "scope_stats": (lambda C, p: C.scope_stats([p], [4], [BAD], p), "scope_stats: dtypes", ALL),
    "scope_grad": (
        lambda C, p: C.scope_grad([p], [p], [4], [BAD], p),
        "scope_grad: dtypes",
        ALL,
    ),
    "feature_center dtype": (
        lambda C, p: C.feature_center(p, BAD, 2, 2, 2, p, p, F32, 2, p),
        "feature_center: dtype",
        ALL,
    ),
    "feature_center out_dtype": (
        lambda C, p: C.feature_center(p, F32, 2, 2, 2, p, p, 0, 2, p),
        "feature_center: out_dtype",
        FLOAT,
        0,
    ),
    "conv_gram": (lambda C, p: C.conv_gram(p, p, BAD, GEOMETRY, p), "conv_gram: dtype", FLOAT),
    "gram dtypes": (
        lambda C, p: C.gram([p, p], [F32, BAD], 0, 0, 1, 4, 0, False, p),
        "gram: dtypes",
        ALL,
    ),
    "gram base_dtype": (
        lambda C, p: C.gram([p, p], [F32, F32], p, BAD, 1, 4, 0, False, p),
        "gram: base_dtype",
        ALL,
    ),
    "lowrank_gate_scale": (
        lambda C, p: C.lowrank_gate_scale(p, BAD, 1, 1, 1, 1, p, 1, 1),
        "lowrank_gate_scale: dtype",
        FLOAT,
    ),
    "lowrank_rows gather": (
        lambda C, p: C.lowrank_rows(False, p, 1, p, 1, p, 1, 1, 1, BAD),
        "lowrank_gather_rows: dtype",
        FLOAT,
    ),
    "lowrank_rows scatter_add": (
        lambda C, p: C.lowrank_rows(True, p, 1, p, 1, p, 1, 1, 1, BAD),
        "lowrank_scatter_add_rows: dtype",
        FLOAT,
    ),
    "magnitude_threshold": (
        lambda C, p: C.magnitude_threshold(p, [p], 4, BAD, 1, p),
        "magnitude_threshold: dtype",
        ALL,
    ),
    "ties_combine dtype": (
        lambda C, p: C.ties_combine(p, [p], 4, BAD, p, 1.0, p, F32),
        "ties_combine: dtype",
        ALL,
    ),
    "ties_combine out_dtype": (
        lambda C, p: C.ties_combine(p, [p], 4, F32, p, 1.0, p, BAD),
        "ties_combine: out_dtype",
        ALL,
    ),
    "gta_combine dtype": (
        lambda C, p: C.gta_combine(p, [p], 4, BAD, p, 0, 0, False, False, False, 1.0, p, F32),
        "gta_combine: dtype",
        ALL,
    ),
    "gta_combine out_dtype": (
        lambda C, p: C.gta_combine(p, [p], 4, F32, p, 0, 0, False, False, False, 1.0, p, BAD),
        "gta_combine: out_dtype",
        ALL,
    ),
    "weighted_sum dtypes": (
        lambda C, p: C.weighted_sum([p, p], [F32, BAD], [1.0, 1.0], 4, False, p, F32),
        "weighted_sum: dtypes",
        ALL,
    ),
    "weighted_sum out_dtype": (
        lambda C, p: C.weighted_sum([p], [F32], [1.0], 4, False, p, BAD),
        "weighted_sum: out_dtype",
        ALL,
    ),
    "nearswap a_dtype": (
        lambda C, p: C.nearswap(p, BAD, p, F32, 0.5, 4, False, p, F32),
        "nearswap: a_dtype",
        ALL,
    ),
    "nearswap b_dtype": (
        lambda C, p: C.nearswap(p, F32, p, BAD, 0.5, 4, False, p, F32),
        "nearswap: b_dtype",
        ALL,
    ),
    "nearswap out_dtype": (
        lambda C, p: C.nearswap(p, F32, p, F32, 0.5, 4, False, p, BAD),
        "nearswap: out_dtype",
        ALL,
    ),
    "sce_variance dtype": (
        lambda C, p: C.sce_variance(p, [p], 4, BAD, p),
        "sce_variance: dtype",
        ALL,
    ),
    "sce_energies dtype": (
        lambda C, p: C.sce_energies(p, [p], 4, BAD, False, 0, p),
        "sce_energies: dtype",
        ALL,
    ),
    "sce_combine dtype": (
        lambda C, p: C.sce_combine(p, [p], 4, BAD, False, 0, p, p, F32),
        "sce_combine: dtype",
        ALL,
    ),
    "sce_combine out_dtype": (
        lambda C, p: C.sce_combine(p, [p], 4, F32, False, 0, p, p, BAD),
        "sce_combine: out_dtype",
        ALL,
    ),
    "magprune base_dtype": (
        lambda C, p: C.magprune(p, BAD, p, F32, 4, 4, 1, False, 1, 0, 0, 0, p, F32, p),
        "magprune: base_dtype",
        ALL,
    ),
    "magprune expert_dtype": (
        lambda C, p: C.magprune(p, F32, p, BAD, 4, 4, 1, False, 1, 0, 0, 0, p, F32, p),
        "magprune: expert_dtype",
        ALL,
    ),
    "magprune out_dtype": (
        lambda C, p: C.magprune(p, F32, p, F32, 4, 4, 1, False, 1, 0, 0, 0, p, BAD, p),
        "magprune: out_dtype",
        ALL,
    ),
}

# The CUDA entry points whose dtype codes the host holds (the tensor-table ones keep theirs
# in device memory); stream 0. conv_gram clears its output before it dispatches, so it
# needs a GPU and is not here.
CUDA_CASES = {
    "feature_center dtype": (
        lambda G, p: G.feature_center(p, BAD, 2, 2, 2, p, p, F32, 2, 1, p, 0),
        "feature_center: dtype",
        ALL,
    ),
    "feature_center out_dtype": (
        lambda G, p: G.feature_center(p, F32, 2, 2, 2, p, p, 0, 2, 1, p, 0),
        "feature_center: out_dtype",
        FLOAT,
        0,
    ),
    "lowrank_mixture": (
        lambda G, p: G.lowrank_mixture(p, BAD, 1, 1, 1, 1, 1, 1, p, p, p, p, p, 0),
        "lowrank_mixture: dtype",
        ALL,
    ),
    "magnitude_threshold": (
        lambda G, p: G.magnitude_threshold(p, p, 1, 4, BAD, 1, p, p, p, p, 0),
        "magnitude_threshold: dtype",
        ALL,
    ),
    "ties_combine dtype": (
        lambda G, p: G.ties_combine(p, p, 1, 4, BAD, p, 1.0, p, F32, 0),
        "ties_combine: dtype",
        ALL,
    ),
    "ties_combine out_dtype": (
        lambda G, p: G.ties_combine(p, p, 1, 4, F32, p, 1.0, p, BAD, 0),
        "ties_combine: out_dtype",
        ALL,
    ),
    "gta_combine dtype": (
        lambda G, p: G.gta_combine(p, p, 1, 4, BAD, p, 0, 0, False, False, False, 1.0, p, F32, 0),
        "gta_combine: dtype",
        ALL,
    ),
    "gta_combine out_dtype": (
        lambda G, p: G.gta_combine(p, p, 1, 4, F32, p, 0, 0, False, False, False, 1.0, p, BAD, 0),
        "gta_combine: out_dtype",
        ALL,
    ),
    "gram base_dtype": (
        lambda G, p: G.gram(p, 1, p, BAD, 1, 4, 0, 1, False, 0, p, 0),
        "gram: base_dtype",
        ALL,
    ),
    "weighted_sum out_dtype": (
        lambda G, p: G.weighted_sum(p, 1, 4, False, p, BAD, 0),
        "weighted_sum: out_dtype",
        ALL,
    ),
    "nearswap a_dtype": (
        lambda G, p: G.nearswap(p, BAD, p, F32, 0.5, 4, False, p, F32, 0),
        "nearswap: a_dtype",
        ALL,
    ),
    "nearswap b_dtype": (
        lambda G, p: G.nearswap(p, F32, p, BAD, 0.5, 4, False, p, F32, 0),
        "nearswap: b_dtype",
        ALL,
    ),
    "nearswap out_dtype": (
        lambda G, p: G.nearswap(p, F32, p, F32, 0.5, 4, False, p, BAD, 0),
        "nearswap: out_dtype",
        ALL,
    ),
}


def _check(module, case, buf):
    call, name, supported, *code = case  # code: the bad one where it is not BAD
    bad = code[0] if code else BAD
    with pytest.raises(TypeError, match=_message(name, supported, bad)):
        call(module, buf.data_ptr())


@pytest.mark.parametrize("case", CPU_CASES.values(), ids=CPU_CASES.keys())
def test_cpu_entry_point_rejects_an_unsupported_dtype_code(case, buf):
    _check(_module("fastmerge._C"), case, buf)


@pytest.mark.parametrize("case", CUDA_CASES.values(), ids=CUDA_CASES.keys())
def test_cuda_entry_point_rejects_an_unsupported_dtype_code(case, buf):
    _check(_module("fastmerge._cuda"), case, buf)
