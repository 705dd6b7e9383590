"""lowrank_mixture: every backend against the reference (errors judged against plain float32
torch, both measured against float64), the cpu paths (dense, routed in place, routed
gathered), gradients, the merged-weight helper and bad input."""

from __future__ import annotations

import importlib
import math
from typing import NamedTuple, Optional

import pytest
import torch

import fastmerge
from fastmerge.reference.lowrank_mixture import lowrank_mixture as reference

from ..conftest import backend_params

# The module (fastmerge.ops.lowrank_mixture as an attribute is the function).
OP = importlib.import_module("fastmerge.ops.lowrank_mixture")


class Case(NamedTuple):
    n: int
    tokens: tuple[int, ...]  # token dims between N and d_in; () for (N, d_in) input
    d_in: int
    d_out: int
    tasks: int
    rank: int
    gates: str  # "dense", "top1", "top2", "zero-rows", "zero", "sorted-top2"
    bias: bool = True


CASES = [
    Case(1, (), 5, 3, 1, 1, "dense"),
    Case(3, (4,), 7, 6, 2, 3, "dense", bias=False),
    Case(3, (2, 3), 9, 5, 5, 2, "top2"),
    Case(97, (), 17, 13, 5, 4, "top2"),
    Case(97, (), 8, 11, 2, 1, "zero-rows"),
    Case(5, (3,), 6, 4, 5, 3, "zero"),
    Case(20, (8,), 12, 10, 5, 3, "sorted-top2"),
    Case(7, (5,), 33, 65, 5, 6, "top1", bias=False),
    Case(97, (3,), 20, 9, 5, 2, "dense"),
]
# The Triton interpreter runs every program in Python: keep its cases small.
SMALL_CASES = [c for c in CASES if c.n * math.prod(c.tokens) <= 300 and c.d_in * c.d_out <= 2200]


def _ids(case: Case) -> str:
    tokens = "x".join(map(str, case.tokens)) or "none"
    return (
        f"n{case.n}-tok{tokens}-{case.d_in}to{case.d_out}-T{case.tasks}-r{case.rank}-"
        f"{case.gates}{'' if case.bias else '-nobias'}"
    )


def _gates(kind: str, n: int, tasks: int, gen: torch.Generator) -> torch.Tensor:
    logits = torch.randn(n, tasks, generator=gen, dtype=torch.float64)
    gates = torch.softmax(logits, dim=1)
    if kind in ("top1", "top2", "sorted-top2"):
        k = min(tasks, 1 if kind == "top1" else 2)
        top = gates.topk(k, dim=1)
        gates = torch.zeros_like(gates).scatter(1, top.indices, torch.softmax(top.values, 1))
        if kind == "sorted-top2":  # samples of one task side by side: whole tiles skip tasks
            gates = gates[gates.argmax(1).argsort(stable=True)]
    elif kind == "zero-rows":
        gates[::3] = 0.0
    elif kind == "zero":
        gates.zero_()
    return gates


def _problem(case: Case, dtype: torch.dtype, seed: int = 0) -> list[Optional[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.n, *case.tokens, case.d_in, generator=gen, dtype=torch.float64)
    weight = torch.randn(case.d_out, case.d_in, generator=gen, dtype=torch.float64) / case.d_in**0.5
    bias = torch.randn(case.d_out, generator=gen, dtype=torch.float64) if case.bias else None
    us = torch.randn(case.tasks, case.d_out, case.rank, generator=gen, dtype=torch.float64)
    vs = torch.randn(case.tasks, case.rank, case.d_in, generator=gen, dtype=torch.float64)
    gates = _gates(case.gates, case.n, case.tasks, gen)
    return [None if t is None else t.to(dtype) for t in (x, weight, bias, us, vs, gates)]


def _reference64(inputs: list[Optional[torch.Tensor]]) -> torch.Tensor:
    """The float64 reference of (possibly lower-precision) inputs, shaped like the output."""
    x, weight, bias, us, vs, gates = (None if t is None else t.double() for t in inputs)
    n, d_in = x.shape[0], x.shape[-1]
    y = reference(x.reshape(n, -1, d_in), weight, bias, us, vs, gates)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _check_against_reference(y: torch.Tensor, inputs: list[Optional[torch.Tensor]]) -> None:
    """float64: tight. float32: the error against float64 at most a few times plain float32
    torch's error (flash-attention's criterion)."""
    x = inputs[0]
    want = _reference64(inputs)
    assert y.shape == want.shape and y.dtype == x.dtype
    error = (y.cpu().double() - want).abs().max().item() if y.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    if x.dtype == torch.float64:
        assert error <= 1e-12 * (1 + scale)
        return
    plain = _reference64([None if t is None else t.float() for t in inputs])  # rounded inputs
    torch_y = reference(
        x.float().reshape(x.shape[0], -1, x.shape[-1]),
        *(None if t is None else t.float() for t in inputs[1:]),
    ).reshape(want.shape)
    torch_error = (torch_y.double() - plain).abs().max().item() if y.numel() else 0.0
    assert error <= 4 * torch_error + 1e-6 * (1 + scale), (error, torch_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_equals_per_sample_merged_weights(case, dtype):
    """The einsum reference against the naive definition: merge, then multiply."""
    x, weight, bias, us, vs, gates = _problem(case, torch.float64)
    y = fastmerge.lowrank_mixture(x, weight, bias, us, vs, gates, backend="reference")
    for n in range(case.n):
        merged = fastmerge.merge_lowrank(weight, us, vs, gates[n])
        want = x[n] @ merged.T + (0 if bias is None else bias)
        torch.testing.assert_close(y[n], want, rtol=1e-12, atol=1e-12)


def _backend_cases():
    return [
        pytest.param(backend, device, case, id=f"{param.id}-{_ids(case)}", marks=param.marks)
        for param in backend_params()
        for backend, device in [param.values]
        for case in (SMALL_CASES if backend == "triton" else CASES)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,device,case", _backend_cases())
def test_matches_reference(backend, device, case, dtype):
    inputs = _problem(case, dtype)
    on_device = [None if t is None else t.to(device) for t in inputs]
    y = fastmerge.lowrank_mixture(*on_device, backend=backend)
    assert y.device.type == device
    _check_against_reference(y, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_density", [0.0, 1.0], ids=["dense-path", "routed-path"])
@pytest.mark.parametrize("gates", ["top1", "top2", "sorted-top2", "zero-rows", "dense"])
@pytest.mark.parametrize("tokens", [(), (4,)], ids=["tok-none", "tok4"])
def test_cpu_paths_agree(monkeypatch, tokens, gates, max_density, dtype):
    """Force each cpu path (dense stacked GEMMs, routed gather/scatter) on the same inputs."""
    monkeypatch.setattr(OP, "SPARSE_MAX_DENSITY", max_density)
    inputs = _problem(Case(23, tokens, 10, 7, 5, 3, gates), dtype, seed=3)
    _check_against_reference(fastmerge.lowrank_mixture(*inputs, backend="cpu"), inputs)


def test_cpu_routed_path_with_strided_input(monkeypatch):
    monkeypatch.setattr(OP, "SPARSE_MAX_DENSITY", 1.0)
    x, weight, bias, us, vs, gates = _problem(Case(9, (3,), 6, 5, 4, 2, "top2"), torch.float64)
    wide = torch.cat([x, x], dim=-1)[..., 3:9]  # row stride 12, columns contiguous
    transposed = x.transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous
    for xs in (wide, transposed):
        y = fastmerge.lowrank_mixture(xs, weight, bias, us, vs, gates, backend="cpu")
        _check_against_reference(y, [xs, weight, bias, us, vs, gates])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "backend",
    ["reference", "cpu", pytest.param("triton", marks=pytest.mark.triton)],
)
def test_half_precision_is_computed_in_float32(backend, dtype):
    inputs = _problem(Case(6, (3,), 16, 8, 3, 2, "top2"), dtype)
    y = fastmerge.lowrank_mixture(*inputs, backend=backend)
    want = _reference64(inputs)
    assert y.dtype == dtype
    # One rounding of the float32 result to the half type, plus float32 noise.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), want, rtol=2 * eps, atol=2 * eps * want.abs().max())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(
    "case",
    [
        Case(3, (2,), 4, 3, 3, 2, "dense"),
        Case(4, (), 5, 3, 3, 2, "top2", bias=False),
        Case(3, (1, 2), 3, 4, 2, 1, "zero-rows"),
    ],
    ids=_ids,
)
def test_gradcheck(backend, case):
    inputs = [
        None if t is None else t.requires_grad_() for t in _problem(case, torch.float64, seed=5)
    ]
    assert torch.autograd.gradcheck(
        lambda *args: fastmerge.lowrank_mixture(*args, backend=backend), inputs
    )


def test_gradients_of_some_inputs_only():
    x, weight, bias, us, vs, gates = _problem(Case(3, (2,), 4, 3, 3, 2, "dense"), torch.float64)
    gates.requires_grad_()
    fastmerge.lowrank_mixture(x, weight, bias, us, vs, gates).sum().backward()
    gates_ref = gates.detach().clone().requires_grad_()
    reference(x, weight, bias, us, vs, gates_ref).sum().backward()
    torch.testing.assert_close(gates.grad, gates_ref.grad)
    assert x.grad is None and us.grad is None


def test_cached_factors_follow_in_place_changes():
    x, weight, bias, us, vs, gates = _problem(Case(4, (3,), 6, 5, 3, 2, "dense"), torch.float64)
    first = fastmerge.lowrank_mixture(x, weight, bias, us, vs, gates, backend="cpu")
    us.mul_(2.0)  # bumps the version counter: the prepared copy must be rebuilt
    second = fastmerge.lowrank_mixture(x, weight, bias, us, vs, gates, backend="cpu")
    _check_against_reference(second, [x, weight, bias, us, vs, gates])
    assert not torch.allclose(first, second)
    us.data.mul_(0.5)  # invisible to the version counter: clear the cache by hand
    fastmerge.ops.clear_lowrank_cache()
    third = fastmerge.lowrank_mixture(x, weight, bias, us, vs, gates, backend="cpu")
    torch.testing.assert_close(third, first)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("gates", ["dense", "top1"])
def test_empty_batch_and_empty_token_dims(backend, gates):
    x, weight, bias, us, vs, g = _problem(Case(2, (3,), 4, 5, 2, 2, gates), torch.float32)
    y = fastmerge.lowrank_mixture(x[:0], weight, bias, us, vs, g[:0], backend=backend)
    assert y.shape == (0, 3, 5)
    y = fastmerge.lowrank_mixture(x[:, :0], weight, bias, us, vs, g, backend=backend)
    assert y.shape == (2, 0, 5)


def test_numpy_inputs_and_output_shape():
    inputs = _problem(Case(2, (3, 2), 4, 5, 2, 2, "dense"), torch.float32)
    y = fastmerge.lowrank_mixture(*(None if t is None else t.numpy() for t in inputs))
    assert y.shape == (2, 3, 2, 5)


def test_bad_input_names_the_argument():
    x, weight, bias, us, vs, gates = _problem(Case(4, (2,), 6, 5, 3, 2, "dense"), torch.float32)
    f = fastmerge.lowrank_mixture
    with pytest.raises(ValueError, match=r"gates .*T = 3"):
        f(x, weight, bias, us, vs, gates[:, :2])
    with pytest.raises(ValueError, match=r"gates .*one row per sample .*N = 4"):
        f(x, weight, bias, us, vs, gates[:3])
    with pytest.raises(TypeError, match="vs has dtype torch.float64 but x has torch.float32"):
        f(x, weight, bias, us, vs.double(), gates)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        f(x.long(), weight, bias, us, vs, gates)
    with pytest.raises(ValueError, match="at least 2 dims"):
        f(x[0, 0], weight, bias, us, vs, gates)
    with pytest.raises(ValueError, match=r"weight must be \(d_out, d_in=6\)"):
        f(x, weight[:, :5], bias, us, vs, gates)
    with pytest.raises(ValueError, match="bias"):
        f(x, weight, bias[:4], us, vs, gates)
    with pytest.raises(ValueError, match=r"us must be \(T, d_out=5, r\)"):
        f(x, weight, bias, us[:, :4], vs, gates)
    with pytest.raises(ValueError, match=r"vs must be \(T, r, d_in\) = \(3, 2, 6\)"):
        f(x, weight, bias, us, vs[:, :1], gates)
    with pytest.raises(ValueError, match="gates is on meta but x is on cpu"):
        f(x, weight, bias, us, vs, gates.to("meta"))
    with pytest.raises(TypeError, match="gates must be a torch.Tensor"):
        f(x, weight, bias, us, vs, [[1.0]])
    with pytest.raises(ValueError, match="gate_row must be 1-D"):
        fastmerge.merge_lowrank(weight, us, vs, gates)
    with pytest.raises(ValueError, match="gates must be"):
        fastmerge.merge_lowrank(weight, us, vs, gates[0, :2])
