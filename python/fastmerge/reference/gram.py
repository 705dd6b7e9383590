"""Reference Gram matrices: the pairwise dot products of k vectors, in float64."""

from __future__ import annotations

from typing import Optional

import torch

#: How a (rows, cols) layout is cut into vectors: the whole of it, each row, each column.
MODES = ("whole", "rows", "columns")


def compute_dtype(tensors: list[torch.Tensor], base: Optional[torch.Tensor] = None) -> torch.dtype:
    """float64 when any input (or the base) is float64, else float32: the dtype in which
    ``t_i - base`` is formed and rounded."""
    everything = [*tensors, *([] if base is None else [base])]
    return torch.float64 if any(t.dtype == torch.float64 for t in everything) else torch.float32


def gram(
    tensors: list[torch.Tensor],
    base: Optional[torch.Tensor],
    mode: str,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Float64 Gram matrices of k same-shaped (rows, cols) tensors.

    x_i = ``tensors[i]`` converted to `dtype` (default :func:`compute_dtype`), or
    ``tensors[i].to(dtype) - base.to(dtype)`` rounded in `dtype`; then widened to float64,
    where every product and sum is formed. `mode` ``"whole"``: (1, k, k), G[0, i, j] =
    Σ_{r,c} x_i[r, c] x_j[r, c]; ``"rows"``: (rows, k, k), G[r, i, j] = Σ_c x_i[r, c]
    x_j[r, c]; ``"columns"``: (cols, k, k), G[c, i, j] = Σ_r x_i[r, c] x_j[r, c].
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dtype = dtype or compute_dtype(tensors, base)
    if base is None:
        xs = [t.to(dtype).double() for t in tensors]
    else:
        b = base.to(dtype)
        xs = [(t.to(dtype) - b).double() for t in tensors]
    x = torch.stack(xs)  # (k, rows, cols)
    if mode == "whole":
        flat = x.reshape(len(xs), -1)
        return (flat @ flat.T).unsqueeze(0)
    if mode == "rows":
        return torch.einsum("irc,jrc->rij", x, x)
    return torch.einsum("irc,jrc->cij", x, x)
