"""Reference linear assignment: the textbook shortest augmenting path method.

Crouse's rectangular form of Jonker-Volgenant (the algorithm scipy uses), written
plainly with torch vector operations over the columns. Slow (Python loop per step);
for tests on small matrices.
"""

from __future__ import annotations

import math

import torch


def solve(cost: torch.Tensor) -> torch.Tensor | None:
    """Column of each row for an (nr, nc) float64 minimization with nr <= nc, or None
    when no assignment avoids every +inf entry."""
    nr, nc = cost.shape
    u = torch.zeros(nr, dtype=torch.float64)
    v = torch.zeros(nc, dtype=torch.float64)
    col4row = torch.full((nr,), -1, dtype=torch.int64)
    row4col = torch.full((nc,), -1, dtype=torch.int64)
    for start in range(nr):
        shortest = torch.full((nc,), math.inf, dtype=torch.float64)
        path = torch.full((nc,), -1, dtype=torch.int64)
        settled = torch.zeros(nc, dtype=torch.bool)
        visited_rows = []
        row, min_val, sink = start, 0.0, -1
        while sink < 0:
            visited_rows.append(row)
            reduced = min_val + cost[row] - u[row] - v
            improve = (reduced < shortest) & ~settled
            shortest = torch.where(improve, reduced, shortest)
            path = torch.where(improve, torch.full_like(path, row), path)
            candidates = torch.where(settled, torch.full_like(shortest, math.inf), shortest)
            j = int(torch.argmin(candidates))
            min_val = float(candidates[j])
            if math.isinf(min_val):
                return None
            settled[j] = True
            if row4col[j] < 0:
                sink = j
            else:
                row = int(row4col[j])
        for i in visited_rows:
            u[i] += min_val if i == start else min_val - shortest[col4row[i]]
        v[settled] -= min_val - shortest[settled]
        j = sink
        while True:
            i = int(path[j])
            row4col[j] = i
            col4row[i], j = j, int(col4row[i])
            if i == start:
                break
    return col4row


def linear_assignment(
    cost: torch.Tensor, maximize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, status) for a float64 (B, n, m) batch; status 0 ok, 1 infeasible,
    2 invalid entry — the contract of the native backends."""
    batch, n, m = cost.shape
    pairs = min(n, m)
    rows = torch.zeros((batch, pairs), dtype=torch.int64)
    cols = torch.zeros((batch, pairs), dtype=torch.int64)
    status = torch.zeros(batch, dtype=torch.int32)
    for b in range(batch):
        c = -cost[b] if maximize else cost[b]
        if bool(torch.isnan(c).any()) or bool((c == -math.inf).any()):
            status[b] = 2
            continue
        transpose = n > m
        col4row = solve(c.t().contiguous() if transpose else c.cpu())
        if col4row is None:
            status[b] = 1
            continue
        if transpose:
            order = torch.argsort(col4row)
            rows[b], cols[b] = col4row[order], order
        else:
            rows[b], cols[b] = torch.arange(pairs), col4row
    return rows, cols, status
