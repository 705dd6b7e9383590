"""``linear_assignment``: exact, batched linear sum assignment with scipy's contract."""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch

from .. import backends
from .._tensors import TensorLike
from ..reference import linear_assignment as reference
from ._library import define, resolve, tracing

IMPLEMENTED = ("reference", "cpu", "cuda")
_SOLVED, _INFEASIBLE, _INVALID, _TOO_LARGE = 0, 1, 2, 3
# Cost element types the CPU solver reads in place (CostType, csrc/cpu/linear_assignment.h).
_COST_TYPES: dict[torch.dtype, int] = {
    torch.float64: 0,
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int8: 4,
    torch.int16: 5,
    torch.int32: 6,
    torch.int64: 7,
    torch.uint8: 8,
    torch.uint16: 9,
    torch.uint32: 10,
    torch.uint64: 11,
    torch.bool: 12,
}
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_from_numpy = torch.from_numpy
# float64 holds every integer up to this magnitude exactly.
_EXACT_INT = 2**53


def linear_assignment(
    cost: TensorLike, *, maximize: bool = False, backend: Optional[str] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve the linear sum assignment problem exactly, one matrix or a batch.

    A drop-in for ``scipy.optimize.linear_sum_assignment``: for an (n, m) cost matrix it
    returns ``(row_ind, col_ind)`` with ``min(n, m)`` pairs, rows ascending, minimizing
    ``cost[row_ind, col_ind].sum()`` (maximizing with ``maximize=True``). It takes what
    scipy takes (nested lists, ``np.matrix``, floating, integer and boolean arrays) and
    raises the errors scipy raises, with the same leading words. Rectangular matrices work
    in both orientations; ``+inf`` marks a forbidden pair (``-inf`` when maximizing). A
    constant matrix gives the identity assignment, as in scipy. Beyond scipy: a
    (B, n, m) input solves all B problems and returns two (B, min(n, m)) index tensors,
    and torch tensors (CPU or CUDA) and DLPack arrays are read in place.

    Every problem is solved exactly in float64: float16, bfloat16, float32, booleans and
    integers widen without rounding; integers beyond 2**53 in magnitude, which float64
    cannot hold, raise instead of being rounded.

    CPU: Jonker-Volgenant (column reduction, reduction transfer, augmenting row
    reduction, then shortest augmenting paths), problems of a batch spread over threads.
    GPU (``cuda``): one thread block per problem running the same augmenting-path core.

    Args:
        cost: (n, m) or (B, n, m) real costs: torch tensor, numpy array, DLPack array or
            anything ``numpy.asarray`` turns into a numeric array.
        maximize: maximize the total instead of minimizing it.
        backend: ``"reference"``, ``"cpu"`` or ``"cuda"``; default by device.

    Returns:
        ``(row_ind, col_ind)`` int64 tensors on the cost's device.

    Raises:
        ValueError: ``"matrix contains invalid numeric entries"`` (NaN, ``-inf``; ``+inf``
            when maximizing), ``"cost matrix is infeasible"`` (no assignment avoids the
            forbidden pairs; a batch names the problem's index), ``"expected a matrix"``
            (not 2-D or 3-D), or an integer beyond 2**53 in magnitude.
        TypeError: ``"Cannot cast array data"``: a complex, string or object cost.

    Example:
        >>> import fastmerge
        >>> rows, cols = fastmerge.linear_assignment([[4, 1, 3], [2, 0, 5], [3, 2, 2]])
        >>> rows.tolist(), cols.tolist()
        ([0, 1, 2], [1, 0, 2])
    """
    if maximize is not True and maximize is not False:
        maximize = bool(maximize)
    # Fast path: a CPU tensor or numpy array for the CPU backend is validated and solved
    # in C++ in one call (it reads every dtype and layout in place), which keeps a tiny
    # problem's call near a microsecond instead of 20.
    if (backend is None or backend == "cpu") and not tracing():  # tracing(): compiling
        ext = _fast_cpu(backend)
        if ext is not None:
            kind = type(cost)
            if kind is np.ndarray:
                if cost.ndim in (2, 3):
                    out = ext.linear_assignment_array(cost, maximize)
                    if out is not None:
                        if out[2] < 0:  # solved (inlined _finish: this path is the hot one)
                            return _from_numpy(out[0]), _from_numpy(out[1])
                        return _finish(out, cost.ndim == 3, maximize)
            elif kind in _PLAIN_TENSORS and cost.is_cpu and cost.dim() in (2, 3):
                code = _COST_TYPES.get(cost.dtype)
                if code is not None and not cost.is_neg():
                    out = ext.linear_assignment_solve(
                        cost.data_ptr(), code, cost.shape, cost.stride(), maximize
                    )
                    if out[2] < 0:
                        return _from_numpy(out[0]), _from_numpy(out[1])
                    return _finish(out, cost.dim() == 3, maximize)
    c = _as_cost_tensor(cost)
    batched = c.dim() == 3
    if tracing(c):
        return _traced(c, batched, maximize, backend)
    name = backends.resolve_backend(backend, c.device, IMPLEMENTED)
    if name == "cpu":  # the C++ entry reads every dtype and layout in place
        c = c.resolve_neg()
        out = backends.cpu_extension().linear_assignment_solve(
            c.data_ptr(), _COST_TYPES[c.dtype], tuple(c.shape), c.stride(), maximize
        )
        return _finish(out, batched, maximize)
    problems = c if batched else c.unsqueeze(0)
    batch, n, m = problems.shape
    if batch == 0 or n == 0 or m == 0:
        empty = torch.zeros((batch, 0), dtype=torch.int64, device=c.device)
        return (empty, empty.clone()) if batched else (empty[0], empty[0].clone())
    _check_exact(problems, batched)
    problems = problems.to(torch.float64).contiguous()
    rows, cols, status, failed = _IMPLEMENTATIONS[name](problems, maximize)
    if failed >= 0:
        _raise_for_status(int(status[failed]), failed, batched, maximize)
    return (rows, cols) if batched else (rows[0], cols[0])


def _traced(
    c: torch.Tensor, batched: bool, maximize: bool, backend: Optional[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Under torch.compile / torch.export (or for fake tensors): the registered op, with
    the failure checks as graph asserts (a traced graph cannot raise on data)."""
    problems = c if batched else c.unsqueeze(0)
    if c.dtype in (torch.int64, torch.uint64):
        magnitude = problems.view(torch.int64).abs()
        torch._assert_async(
            (magnitude <= _EXACT_INT).all(),
            "linear_assignment: cost has integer entries beyond 2**53 in magnitude",
        )
    rows, cols, status = _OP(problems.to(torch.float64), maximize, backend)
    torch._assert_async(
        status.eq(_SOLVED).all(),
        "linear_assignment: matrix contains invalid numeric entries (NaN, or -inf; +inf "
        "with maximize=True) or the cost matrix is infeasible",
    )
    return (rows, cols) if batched else (rows[0], cols[0])


def _kernel(
    problems: torch.Tensor, maximize: bool, backend: Optional[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The registered kernel: (B, n, m) float64 problems -> rows, cols, per-problem status
    (0 solved, else the failure's code); it never raises on a failed problem."""
    batch, n, m = problems.shape
    if batch == 0 or n == 0 or m == 0:
        pairs = problems.new_zeros((batch, 0), dtype=torch.int64)
        return pairs, pairs.clone(), problems.new_zeros((batch,), dtype=torch.int32)
    name = resolve(backend, problems.device, IMPLEMENTED)
    rows, cols, status, _ = _IMPLEMENTATIONS[name](problems.contiguous(), maximize)
    device = problems.device  # the reference solves on the CPU
    return rows.to(device), cols.to(device), status.to(device)


def _fake(
    problems: torch.Tensor, maximize: bool, backend: Optional[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, n, m = problems.shape
    pairs = problems.new_empty((batch, torch.sym_min(n, m)), dtype=torch.int64)
    return pairs, torch.empty_like(pairs), problems.new_empty((batch,), dtype=torch.int32)


_OP = define(
    "linear_assignment",
    "(Tensor problems, bool maximize, str? backend) -> (Tensor, Tensor, Tensor)",
    _kernel,
    _fake,
)


def _fast_cpu(backend: Optional[str]) -> Any:
    """The CPU extension when this call goes to the CPU backend by default or by name,
    else None (then the general path resolves the backend and words any error)."""
    if backend is None:
        requested = _ENVIRON_DATA.get(_ENV_KEY) if _ENVIRON_DATA is not None else None
        if requested is None and _ENVIRON_DATA is None:
            requested = os.environ.get(backends.ENV_BACKEND)
        if requested and requested not in ("cpu", b"cpu"):
            return None
    return backends._import("fastmerge._C")[0]


# os.environ.get costs a microsecond when the variable is unset (it raises and catches a
# KeyError); os.environ's own dict (kept in step by os.environ and monkeypatch.setenv)
# answers in 20 ns. Python builds without it use os.environ.get.
_ENVIRON_DATA: Optional[dict] = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(backends.ENV_BACKEND) if _ENVIRON_DATA is not None else None


def _finish(out: tuple, batched: bool, maximize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols, failed, code = out
    if failed >= 0:
        _raise_for_status(code, failed, batched, maximize)
    return _from_numpy(rows), _from_numpy(cols)


def _cast_error(dtype: object) -> TypeError:
    # scipy's words (numpy's safe-cast error), then what fastmerge takes.
    return TypeError(
        f"Cannot cast array data from {dtype!r} to dtype('float64') according to the rule "
        "'safe': cost must hold real numbers (a floating, integer or boolean dtype), got "
        f"dtype {dtype}"
    )


def _as_cost_tensor(cost: TensorLike) -> torch.Tensor:
    """`cost` as a real tensor of rank 2 or 3 (in place when possible), with scipy's
    conversions (``numpy.asarray``) and errors, checked in scipy's order."""
    if isinstance(cost, torch.Tensor):
        c = cost
    elif not isinstance(cost, np.ndarray) and hasattr(cost, "__dlpack__"):
        c = torch.from_dlpack(cost)
    else:
        array = np.asarray(cost)  # nested lists, np.matrix, scalars
        if array.dtype.kind not in "biuf" or array.dtype.itemsize > 8:
            raise _cast_error(array.dtype)
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        c = torch.from_numpy(array)
    if c.dtype not in _COST_TYPES:
        raise _cast_error(c.dtype)
    if c.dim() not in (2, 3):
        raise ValueError(
            f"expected a matrix (2-D array), got a {c.dim()}-D array: cost must be 2-D "
            f"(n, m) or 3-D (B, n, m), got shape {tuple(c.shape)}"
        )
    return c


def _check_exact(c: torch.Tensor, batched: bool) -> None:
    """Raise for 64-bit integers that float64 cannot hold (the C++ path checks its own);
    `c` is (B, n, m)."""
    if c.dtype not in (torch.int64, torch.uint64) or c.numel() == 0:
        return
    as_int = c.view(torch.int64)  # uint64 entries from 2**63 on read as negative
    low = -_EXACT_INT if c.dtype == torch.int64 else 0
    bad = ((as_int > _EXACT_INT) | (as_int < low)).flatten(1).any(1).nonzero()
    if bad.numel():
        _raise_for_status(_TOO_LARGE, int(bad[0]), batched, False)


def _first_failure(status: torch.Tensor) -> int:
    bad = torch.nonzero(status.cpu() != _SOLVED)
    return int(bad[0]) if bad.numel() else -1


def _raise_for_status(code: int, b: int, batched: bool, maximize: bool) -> None:
    # scipy's words first (its tests match them), then fastmerge's detail.
    where = f" (batch index {b})" if batched else ""
    forbidden = "-inf" if maximize else "+inf"
    if code == _INVALID:
        bad = "+inf (with maximize=True)" if maximize else "-inf"
        raise ValueError(
            f"matrix contains invalid numeric entries{where}: cost contains NaN or {bad}; "
            f"use {forbidden} for forbidden pairs"
        )
    if code == _TOO_LARGE:
        raise ValueError(
            f"cost has integer entries beyond 2**53 in magnitude{where}, which float64 "
            "cannot hold exactly; convert cost to float64 first to accept the rounding"
        )
    raise ValueError(
        f"cost matrix is infeasible{where}: no complete assignment avoids the forbidden "
        f"({forbidden}) entries"
    )


# Each backend returns (rows, cols, status, index of the first failed problem or -1).


def _run_reference(cost: torch.Tensor, maximize: bool):
    rows, cols, status = reference.linear_assignment(cost.cpu(), maximize)
    return rows, cols, status, _first_failure(status)


def _run_cpu(cost: torch.Tensor, maximize: bool, generic: bool = False):
    """`generic=True` runs the GPU kernel's exact code path on one CPU thread (tests)."""
    batch, n, m = cost.shape
    pairs = min(n, m)
    rows = torch.empty((batch, pairs), dtype=torch.int64)
    cols = torch.empty((batch, pairs), dtype=torch.int64)
    status = torch.zeros(batch, dtype=torch.int32)
    failed = backends.cpu_extension().linear_assignment(
        cost.data_ptr(),
        _COST_TYPES[cost.dtype],
        batch,
        n,
        m,
        *cost.stride(),
        maximize,
        generic,
        rows.data_ptr(),
        cols.data_ptr(),
        status.data_ptr(),
    )
    return rows, cols, status, failed


def _run_cuda(cost: torch.Tensor, maximize: bool):
    batch, n, m = cost.shape
    transpose = n > m
    # The kernel takes minimizations with rows <= cols; orient on the device first.
    oriented = cost.transpose(1, 2) if transpose else cost
    oriented = (-oriented if maximize else oriented).contiguous()
    nr, nc = oriented.shape[1:]
    invalid = torch.isnan(oriented) | (oriented == float("-inf"))
    device = cost.device
    dual = torch.empty((batch, nr + 3 * nc), dtype=torch.float64, device=device)
    index_work = torch.empty((batch, 2 * nc), dtype=torch.int64, device=device)
    flags = torch.empty((batch, nr), dtype=torch.uint8, device=device)
    col4row = torch.empty((batch, nr), dtype=torch.int64, device=device)
    status = torch.zeros(batch, dtype=torch.int32, device=device)
    with torch.cuda.device(device):
        backends.cuda_extension().linear_assignment(
            oriented.data_ptr(),
            batch,
            nr,
            nc,
            dual.data_ptr(),
            index_work.data_ptr(),
            flags.data_ptr(),
            col4row.data_ptr(),
            status.data_ptr(),
            torch.cuda.current_stream(device).cuda_stream,
        )
    status = torch.where(invalid.flatten(1).any(1), torch.full_like(status, _INVALID), status)
    failed = _first_failure(status)
    if not transpose:
        rows = torch.arange(nr, device=device).expand(batch, nr).clone()
        return rows, col4row, status, failed
    # Transposed: col4row gives each original column its row; report rows ascending.
    rows, order = torch.sort(col4row, dim=1)
    return rows, order, status, failed


_IMPLEMENTATIONS = {"reference": _run_reference, "cpu": _run_cpu, "cuda": _run_cuda}
