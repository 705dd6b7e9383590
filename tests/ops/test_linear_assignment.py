"""linear_assignment against scipy.optimize.linear_sum_assignment.

Costs are compared, not indices: ties allow several optimal assignments.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys

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
        (torch.full((2, 2), 2**53 + 1, dtype=torch.int64), False, ValueError, "beyond 2\\*\\*53"),
        (np.full((2, 2), -(2**53) - 1, dtype=np.int64), False, ValueError, "beyond 2\\*\\*53"),
        (np.full((2, 2), 2**63, dtype=np.uint64), True, ValueError, "beyond 2\\*\\*53"),
        (torch.ones(2, 2, dtype=torch.complex64), False, TypeError, "cost"),
        ("abc", False, TypeError, "cost"),
        ([[1.0, None]], False, TypeError, "dtype object"),
    ],
)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_input(cost, maximize, error, words, backend):
    with pytest.raises(error, match=words):
        fastmerge.linear_assignment(cost, maximize=maximize, backend=backend)


# scipy's exception types and the leading words its own tests match, on every path: the
# CPU fast path (numpy and torch inputs), the general path (lists) and the reference.
SCIPY_ERRORS = [
    (np.array([1.0, 2.0, 3.0]), ValueError, "^expected a matrix"),
    (np.ones((2, 2, 2, 2)), ValueError, "^expected a matrix"),
    (np.diag([np.nan, 1.0, 1.0]), ValueError, "^matrix contains invalid numeric entries"),
    (np.diag([1.0, -np.inf, 1.0]), ValueError, "^matrix contains invalid numeric entries"),
    (np.array([[np.inf, 1.0], [np.inf, 2.0]]), ValueError, "^cost matrix is infeasible"),
    (np.identity(3).astype(str), TypeError, "^Cannot cast array data"),
    (np.ones((2, 2), dtype=complex), TypeError, "^Cannot cast array data"),
]


@pytest.mark.parametrize("convert", ["numpy", "torch", "list"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(("cost", "error", "words"), SCIPY_ERRORS)
def test_errors_lead_with_scipys_words(cost, error, words, convert, backend):
    if convert == "torch":
        if cost.dtype.kind not in "fc":
            pytest.skip("torch has no string dtype")
        cost = torch.from_numpy(cost)
    elif convert == "list":
        if cost.dtype.kind not in "f":
            # scipy parses lists of number strings and drops imaginary parts of complex
            # lists; fastmerge refuses both (noted in the README).
            pytest.skip("scipy converts string and complex lists element by element")
        cost = cost.tolist()
    with pytest.raises(error, match=words):
        fastmerge.linear_assignment(cost, backend=backend)
    with pytest.raises(error, match=words):  # scipy agrees
        scipy_optimize.linear_sum_assignment(cost if convert != "torch" else cost.numpy())


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_forbidden_value_follows_the_sense(maximize):
    # -inf is forbidden when maximizing and invalid when minimizing (and +inf the reverse).
    cost = np.array([[1.0, 2.0], [3.0, 4.0]])
    cost[0, 1] = -np.inf if maximize else np.inf
    rows, cols = fastmerge.linear_assignment(cost, maximize=maximize)
    assert cols.tolist() == [0, 1]
    cost[0, 1] = -cost[0, 1]
    with pytest.raises(ValueError, match="invalid numeric entries"):
        fastmerge.linear_assignment(cost, maximize=maximize)


def test_infeasible_integer_problem_of_a_batch_is_named_on_the_reference():
    batch = torch.zeros(3, 2, 2, dtype=torch.int64)
    batch[1, 0, 0] = 2**60
    with pytest.raises(ValueError, match="batch index 1"):
        fastmerge.linear_assignment(batch, backend="reference")


INTEGER_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [*INTEGER_DTYPES, "bool"])
@pytest.mark.parametrize("convert", ["numpy", "torch"])
@pytest.mark.parametrize("shape", [(6, 6), (4, 7), (7, 4)], ids=str)
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_integer_and_boolean_costs_are_solved_exactly(backend, dtype, convert, shape, maximize):
    rng = np.random.default_rng(11)
    if dtype == "bool":
        cost = rng.random(shape) < 0.5
    else:
        info = np.iinfo(dtype)
        # Extremes of the type where float32 rounding would make the answer wrong: the
        # solver must widen to float64 (and 64-bit values stay within 2**53).
        low, high = max(info.min, -(2**53)), min(info.max, 2**53)
        cost = rng.integers(low, high, shape, dtype=dtype, endpoint=True)
    cost_in = torch.from_numpy(cost) if convert == "torch" else cost
    rows, cols = fastmerge.linear_assignment(cost_in, maximize=maximize, backend=backend)
    exact = cost.astype(object)  # Python integers: no rounding in the comparison
    want_r, want_c = scipy_optimize.linear_sum_assignment(exact.astype(np.float64), maximize)
    assert rows.tolist() == sorted(set(rows.tolist())) and len(rows) == min(shape)
    got = exact[rows.numpy(), cols.numpy()].sum()
    # scipy rounds 64-bit integers to float64; compare against the exact optimum by
    # brute force on these small shapes instead of trusting its cost.
    assert got == _brute_force(exact, maximize), (got, exact[want_r, want_c].sum())


def _brute_force(cost: np.ndarray, maximize: bool):
    import itertools

    n, m = cost.shape
    if n > m:
        return _brute_force(cost.T, maximize)
    totals = (sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
    return max(totals) if maximize else min(totals)


def test_exactly_two_to_the_53_is_accepted():
    cost = np.array([[2**53, 0], [0, 2**53]], dtype=np.int64)
    rows, cols = fastmerge.linear_assignment(cost, maximize=True)
    assert cols.tolist() == [0, 1]


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_scipy_inputs_nested_lists_and_matrix(backend):
    cost = [[4, 1, 3], [2, 0, 5], [3, 2, 2]]
    for cost_like in (cost, np.matrix(cost), tuple(map(tuple, cost))):
        rows, cols = fastmerge.linear_assignment(cost_like, backend=backend)
        assert np.asarray(cost)[rows.numpy(), cols.numpy()].sum() == 5


@pytest.mark.parametrize("solver", ["cpu", "reference"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (8, 8), (33, 33), (5, 8), (8, 5)], ids=str)
def test_constant_matrix_gives_the_identity(solver, shape):
    # scipy's contract (its test_constant_cost_matrix): ties resolve to the identity.
    rows, cols = SOLVERS[solver](torch.full(shape, 7.0, dtype=torch.float64), False)
    k = min(shape)
    assert rows.tolist() == list(range(k)) and cols.tolist() == list(range(k))


LAYOUTS = {
    "transposed": lambda a: a.T,
    "reversed-rows": lambda a: a[::-1],
    "every-other-column": lambda a: a[:, ::2],
    "fortran": np.asfortranarray,
    "big-endian": lambda a: a.astype(a.dtype.newbyteorder(">")),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "int32"])
@pytest.mark.parametrize("convert", ["numpy", "torch"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_any_layout_and_dtype_is_read_in_place(layout, dtype, convert, maximize):
    rng = np.random.default_rng(12)
    base = (rng.random((9, 14)) * 50).astype(dtype)
    view = LAYOUTS[layout](base)
    if convert == "torch":
        if not view.dtype.isnative:
            pytest.skip("torch tensors are native-endian")
        # torch has no negative strides: its flip copies; the others are strided views.
        cost_in = torch.from_numpy(base).flip(0) if layout == "reversed-rows" else None
        cost_in = torch.from_numpy(view) if cost_in is None else cost_in
    else:
        cost_in = view
    rows, cols = fastmerge.linear_assignment(cost_in, maximize=maximize)
    _check(np.ascontiguousarray(view).astype(np.float64), rows, cols, maximize)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors_are_solved_as_their_float64_cast(dtype):
    cost = (torch.rand(20, 30, generator=torch.Generator().manual_seed(1)) * 8).to(dtype)
    rows, cols = fastmerge.linear_assignment(cost)
    _check(cost.double().numpy(), rows, cols, False)


def test_batched_strided_tensor():
    rng = np.random.default_rng(13)
    batch = torch.from_numpy(rng.random((4, 12, 9))).transpose(1, 2)  # (4, 9, 12), strided
    rows, cols = fastmerge.linear_assignment(batch, maximize=True)
    for b in range(4):
        _check(batch[b].numpy(), rows[b], cols[b], True)


def test_scipys_own_test_file_passes(tmp_path):
    """scipy's test_linear_assignment.py, run against fastmerge through a wrapper."""
    source = pathlib.Path(scipy_optimize.__file__).parent / "tests" / "test_linear_assignment.py"
    if not source.exists():
        pytest.skip("this scipy was installed without its tests")
    text = source.read_text()
    line = "from scipy.optimize import linear_sum_assignment\n"
    assert text.count(line) == 1, "scipy's test file changed its import; update the redirect"
    (tmp_path / "test_scipy_lsap.py").write_text(
        text.replace(line, "from fastmerge_as_scipy import linear_sum_assignment\n")
    )
    (tmp_path / "fastmerge_as_scipy.py").write_text(
        "import fastmerge\n\n\n"
        "def linear_sum_assignment(cost_matrix, maximize=False):\n"
        "    rows, cols = fastmerge.linear_assignment(cost_matrix, maximize=maximize)\n"
        "    return rows.numpy(), cols.numpy()\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-W",
            "ignore::DeprecationWarning",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 22 and "failed" not in summary, summary


def test_infeasible_problem_in_a_batch_is_named():
    batch = torch.rand(4, 3, 3)
    batch[2, 1, :] = math.inf
    with pytest.raises(ValueError, match="batch index 2"):
        fastmerge.linear_assignment(batch)


def test_triton_is_not_a_backend_of_this_op():
    with pytest.raises(BackendUnavailableError, match="no triton backend"):
        fastmerge.linear_assignment(torch.rand(3, 3), backend="triton")


@pytest.mark.parametrize("convert", ["numpy", "torch"])
def test_environment_backend_is_honoured_by_the_fast_path(monkeypatch, convert):
    module = sys.modules["fastmerge.ops.linear_assignment"]
    calls = []
    original = module._IMPLEMENTATIONS["reference"]

    def recording(cost, maximize):
        calls.append(cost.shape)
        return original(cost, maximize)

    monkeypatch.setitem(module._IMPLEMENTATIONS, "reference", recording)
    cost = np.random.default_rng(14).random((4, 4))
    monkeypatch.setenv("FASTMERGE_BACKEND", "reference")
    fastmerge.linear_assignment(cost if convert == "numpy" else torch.from_numpy(cost))
    assert calls == [(1, 4, 4)]
    monkeypatch.delenv("FASTMERGE_BACKEND")
    fastmerge.linear_assignment(cost if convert == "numpy" else torch.from_numpy(cost))
    assert calls == [(1, 4, 4)]  # the CPU backend again
