"""linear_assignment against scipy.optimize.linear_sum_assignment.

Costs are compared, not indices: ties allow several optimal assignments.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmerge
from fastmerge.backends import BackendUnavailableError
from fastmerge.ops.linear_assignment import _run_cpu

scipy_optimize = pytest.importorskip("scipy.optimize")

from ..conftest import HAS_CUDA  # noqa: E402


def _solve_generic(cost: torch.Tensor, maximize: bool):
    """The GPU kernel's code path (zero duals, team-generic scan) run on one CPU thread."""
    problems = cost if cost.dim() == 3 else cost.unsqueeze(0)
    rows, cols, _, failed = _run_cpu(problems.to(torch.float64).contiguous(), maximize, True)
    if failed >= 0:
        raise ValueError("infeasible or invalid")
    return (rows, cols) if cost.dim() == 3 else (rows[0], cols[0])


SOLVERS = {
    "cpu": lambda c, mx: fastmerge.linear_assignment(c, maximize=mx, backend="cpu"),
    "gpu-path-on-cpu": _solve_generic,
    "reference": lambda c, mx: fastmerge.linear_assignment(c, maximize=mx, backend="reference"),
}
if HAS_CUDA:
    SOLVERS["cuda"] = lambda c, mx: fastmerge.linear_assignment(
        c.cuda(), maximize=mx, backend="cuda"
    )


def _check(cost: np.ndarray, rows, cols, maximize: bool, rtol: float = 1e-12) -> None:
    rows, cols = np.asarray(rows.cpu()), np.asarray(cols.cpu())
    want_rows, want_cols = scipy_optimize.linear_sum_assignment(cost, maximize=maximize)
    assert rows.shape == (min(cost.shape),) and cols.shape == rows.shape
    assert np.all(np.diff(rows) > 0), "rows must be ascending and distinct"
    assert len(set(cols.tolist())) == len(cols), "a column is used twice"
    want = cost[want_rows, want_cols].sum()
    got = cost[rows, cols].sum()
    assert math.isclose(got, want, rel_tol=rtol, abs_tol=1e-9), (got, want)


def _family(name: str, n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    if name == "uniform":
        return rng.random((n, m))
    if name == "integer":  # many ties
        return rng.integers(0, 5, (n, m)).astype(np.float64)
    if name == "spatial":  # squared distances between two point clouds
        a, b = rng.random((n, 2)), rng.random((m, 2))
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    if name == "logarithmic":  # entries spanning 1e-20 .. 1e20
        return 10.0 ** rng.uniform(-20, 20, (n, m))
    if name == "binary":
        return rng.integers(0, 2, (n, m)).astype(np.float64)
    if name == "constant":
        return np.full((n, m), 3.5)
    raise ValueError(name)


FAMILIES = ["uniform", "integer", "spatial", "logarithmic", "binary", "constant"]
SHAPES = [(1, 1), (7, 7), (40, 40), (97, 97), (5, 9), (9, 5), (33, 64), (64, 33)]


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_families_match_scipy(solver, family, shape, maximize):
    if solver == "reference" and shape[0] * shape[1] > 1600:
        pytest.skip("the reference is slow; small shapes are enough for it")
    rng = np.random.default_rng(hash((family, shape)) % 2**32)
    cost = _family(family, *shape, rng)
    rows, cols = SOLVERS[solver](torch.from_numpy(cost), maximize)
    _check(cost, rows, cols, maximize, rtol=1e-9 if family == "logarithmic" else 1e-12)


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("shape", [(30, 30), (12, 20), (20, 12)], ids=str)
def test_forbidden_pairs(solver, shape):
    rng = np.random.default_rng(7)
    cost = rng.random(shape)
    cost[rng.random(shape) < 0.4] = np.inf
    # Keep it feasible: a forbidden-free diagonal.
    for k in range(min(shape)):
        cost[k, k] = rng.random()
    rows, cols = SOLVERS[solver](torch.from_numpy(cost), False)
    assert np.isfinite(cost[rows.cpu().numpy(), cols.cpu().numpy()]).all()
    _check(cost, rows, cols, False)


@pytest.mark.parametrize("solver", ["cpu", "gpu-path-on-cpu"])
def test_batches_mixing_families(solver):
    rng = np.random.default_rng(3)
    batch = np.stack([_family(f, 24, 31, rng) for f in FAMILIES for _ in range(2)])
    rows, cols = SOLVERS[solver](torch.from_numpy(batch), False)
    assert rows.shape == cols.shape == (len(batch), 24)
    for b in range(len(batch)):
        _check(batch[b], rows[b], cols[b], False, rtol=1e-9)


def test_float32_is_solved_as_its_float64_cast():
    rng = np.random.default_rng(4)
    cost32 = (rng.random((300, 300)) * 100).astype(np.float32)
    rows, cols = fastmerge.linear_assignment(torch.from_numpy(cost32))
    _check(cost32.astype(np.float64), rows, cols, False)


def test_large_square_problem():
    rng = np.random.default_rng(5)
    cost = rng.random((600, 600))
    rows, cols = fastmerge.linear_assignment(cost)
    _check(cost, rows, cols, False)


@pytest.mark.parametrize("shape", [(1600, 1600), (1100, 1700)], ids=str)
def test_large_problem_searched_by_a_thread_team(shape):
    # From 1536 columns a lone problem is searched by all threads together.
    rng = np.random.default_rng(6)
    cost = rng.integers(0, 50, shape).astype(np.float64)
    if shape[0] != shape[1]:
        cost[rng.random(shape) < 0.3] = np.inf
    fastmerge.set_num_threads(2)
    rows, cols = fastmerge.linear_assignment(cost)
    _check(cost, rows, cols, False)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 9),
    m=st.integers(1, 9),
    maximize=st.booleans(),
    data=st.data(),
)
def test_property_random_small_matrices(n, m, maximize, data):
    values = st.one_of(st.integers(-5, 5).map(float), st.floats(-1e3, 1e3, allow_nan=False))
    cost = np.array(data.draw(st.lists(values, min_size=n * m, max_size=n * m))).reshape(n, m)
    forbid = np.array(data.draw(st.lists(st.booleans(), min_size=n * m, max_size=n * m)))
    cost[forbid.reshape(n, m) & (np.arange(n * m).reshape(n, m) % 3 == 0)] = (
        -np.inf if maximize else np.inf
    )
    try:
        scipy_optimize.linear_sum_assignment(cost, maximize=maximize)
    except ValueError:
        for solver in ("cpu", "gpu-path-on-cpu"):
            with pytest.raises(ValueError):
                SOLVERS[solver](torch.from_numpy(cost), maximize)
        return
    for solver in ("cpu", "gpu-path-on-cpu"):
        rows, cols = SOLVERS[solver](torch.from_numpy(cost), maximize)
        _check(cost, rows, cols, maximize, rtol=1e-9)


@pytest.mark.parametrize("shape", [(0, 0), (0, 4), (4, 0), (2, 0, 3)], ids=str)
def test_empty_shapes_give_empty_results(shape):
    rows, cols = fastmerge.linear_assignment(torch.zeros(shape))
    expected = (shape[0], 0) if len(shape) == 3 else (0,)
    assert rows.shape == cols.shape == expected
    assert rows.dtype == torch.int64


def test_numpy_input_and_maximize():
    cost = np.array([[1.0, 2.0], [3.0, 5.0]])
    rows, cols = fastmerge.linear_assignment(cost, maximize=True)
    assert rows.tolist() == [0, 1] and cols.tolist() == [0, 1]


@pytest.mark.parametrize(
    "cost,maximize,error,words",
    [
        (torch.tensor([[1.0, math.nan], [0.0, 1.0]]), False, ValueError, "NaN"),
        (torch.tensor([[1.0, -math.inf], [0.0, 1.0]]), False, ValueError, "-inf"),
        (torch.tensor([[1.0, math.inf], [0.0, 1.0]]), True, ValueError, r"\+inf"),
        (torch.tensor([[math.inf, math.inf], [0.0, 1.0]]), False, ValueError, "infeasible"),
        (torch.ones(3), False, ValueError, "cost must be 2-D"),
        (torch.ones(2, 2, 2, 2), False, ValueError, "cost must be 2-D"),
        (torch.ones(2, 2, dtype=torch.int64), False, TypeError, "cost"),
        (torch.ones(2, 2, dtype=torch.complex64), False, TypeError, "cost"),
        ("abc", False, TypeError, "cost"),
    ],
)
def test_bad_input(cost, maximize, error, words):
    with pytest.raises(error, match=words):
        fastmerge.linear_assignment(cost, maximize=maximize)


def test_infeasible_problem_in_a_batch_is_named():
    batch = torch.rand(4, 3, 3)
    batch[2, 1, :] = math.inf
    with pytest.raises(ValueError, match="batch index 2"):
        fastmerge.linear_assignment(batch)


def test_triton_is_not_a_backend_of_this_op():
    with pytest.raises(BackendUnavailableError, match="no triton backend"):
        fastmerge.linear_assignment(torch.rand(3, 3), backend="triton")
