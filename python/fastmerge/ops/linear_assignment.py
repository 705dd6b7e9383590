"""``linear_assignment``: exact, batched linear sum assignment with scipy's semantics."""

from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from .._tensors import TensorLike, as_tensor
from ..reference import linear_assignment as reference

IMPLEMENTED = ("reference", "cpu", "cuda")
_SOLVED, _INFEASIBLE, _INVALID = 0, 1, 2


def linear_assignment(
    cost: TensorLike, *, maximize: bool = False, backend: Optional[str] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve the linear sum assignment problem exactly, one matrix or a batch.

    Same contract as ``scipy.optimize.linear_sum_assignment``: for an (n, m) cost matrix
    it returns ``(row_ind, col_ind)`` with ``min(n, m)`` pairs, rows ascending, minimizing
    ``cost[row_ind, col_ind].sum()`` (maximizing with ``maximize=True``). Rectangular
    matrices work in both orientations; ``+inf`` marks a forbidden pair. A (B, n, m)
    input solves all B problems and returns two (B, min(n, m)) index tensors. Costs are
    solved in float64, so float32 input gives the optimum of its float64 cast.

    CPU: Jonker-Volgenant (column reduction, reduction transfer, augmenting row
    reduction, then shortest augmenting paths), problems of a batch spread over threads.
    GPU (``cuda``): one thread block per problem running the same augmenting-path core.

    Args:
        cost: (n, m) or (B, n, m) real floating tensor, numpy array or DLPack array.
        maximize: maximize the total instead of minimizing it.
        backend: ``"reference"``, ``"cpu"`` or ``"cuda"``; default by device.

    Returns:
        ``(row_ind, col_ind)`` int64 tensors on the cost's device.

    Raises:
        ValueError: NaN or ``-inf`` entries (``+inf`` when maximizing), a problem with no
            finite complete assignment (its batch index is named), or a cost that is not
            2-D or 3-D.
        TypeError: an integer, boolean or complex cost.

    Example:
        >>> import torch, fastmerge
        >>> cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
        >>> rows, cols = fastmerge.linear_assignment(cost)
        >>> cols.tolist(), cost[rows, cols].sum().item()
        ([1, 0, 2], 5.0)
    """
    c = as_tensor(cost, "cost")
    if c.is_complex() or not c.is_floating_point():
        raise TypeError(f"cost must be a real floating tensor, got dtype {c.dtype}")
    if c.dim() not in (2, 3):
        raise ValueError(f"cost must be 2-D (n, m) or 3-D (B, n, m), got shape {tuple(c.shape)}")
    batched = c.dim() == 3
    problems = c if batched else c.unsqueeze(0)
    batch, n, m = problems.shape
    name = backends.resolve_backend(backend, c.device, IMPLEMENTED)
    if batch == 0 or n == 0 or m == 0:
        empty = torch.zeros((batch, 0), dtype=torch.int64, device=c.device)
        return (empty, empty.clone()) if batched else (empty[0], empty[0].clone())
    # float32 stays float32 for the CPU solver (it widens exactly while reading); other
    # dtypes become float64.
    keep = name == "cpu" and problems.dtype == torch.float32
    problems = (problems if keep else problems.to(torch.float64)).contiguous()
    rows, cols, status, failed = _IMPLEMENTATIONS[name](problems, bool(maximize))
    if failed >= 0:
        _raise_for_status(int(status[failed]), failed, batched, maximize)
    return (rows, cols) if batched else (rows[0], cols[0])


def _first_failure(status: torch.Tensor) -> int:
    bad = torch.nonzero(status.cpu() != _SOLVED)
    return int(bad[0]) if bad.numel() else -1


def _raise_for_status(code: int, b: int, batched: bool, maximize: bool) -> None:
    where = f" (batch index {b})" if batched else ""
    if code == _INVALID:
        forbidden = "+inf (with maximize=True)" if maximize else "-inf"
        raise ValueError(f"cost contains NaN or {forbidden}{where}; use +inf for forbidden pairs")
    raise ValueError(f"cost matrix is infeasible{where}: no assignment avoids the +inf entries")


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
    status = torch.empty(batch, dtype=torch.int32)
    failed = backends.cpu_extension().linear_assignment(
        cost.data_ptr(),
        cost.dtype == torch.float32,
        batch,
        n,
        m,
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
