"""Reference MAGPRUNE (DELLA's rank-based random drop) of one expert's delta.

Per row of τ = expert - base (the compute dtype), the entry of ascending magnitude rank r
is kept iff ``(h >> 11) < below + r * step``, h the counter-based hash of the random keep
of :mod:`fastmerge.reference.gta_combine` (key, flat entry index); ties in ``|τ|`` are
ranked by their index in the row (a stable sort). See :func:`fastmerge.ops.magprune`.
"""

from __future__ import annotations

import torch

from .gta_combine import UNIFORM_BITS, _shr, hash_bits
from .magnitude_threshold import compute_dtype


def rows_view(x: torch.Tensor, width: int, inner: int) -> torch.Tensor:
    """The (rows, width) view of a contiguous tensor of ``outer * width * inner`` entries
    whose rows run along the middle axis (stride `inner`), as a copy when inner > 1."""
    x = x.reshape(-1, width, inner)
    return x.transpose(1, 2).reshape(-1, width) if inner > 1 else x.reshape(-1, width)


def ranks(magnitude: torch.Tensor) -> torch.Tensor:
    """int64 ascending rank of every entry in its row of a (rows, width) tensor; ties (and
    NaNs, which rank above +inf) ordered by index."""
    order = torch.argsort(magnitude, dim=1, stable=True)
    out = torch.empty_like(order)
    positions = torch.arange(magnitude.shape[1], device=magnitude.device)
    out.scatter_(1, order, positions.expand_as(order))
    return out


def magprune(
    base: torch.Tensor,
    expert: torch.Tensor,
    key: int,
    below: int,
    step: int,
    offset: int,
    width: int,
    inner: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write the kept τ (0 elsewhere) into `out` (base's entries, contiguous, any float
    dtype) and return the float64 (2,) ``[Σ|τ|, Σ kept |τ|]``.

    base and expert: contiguous, ``outer * width * inner`` entries, rows of `width`
    entries at stride `inner`; key: the expert's 64-bit key (signed int64 pattern);
    below, step: the integer keep bounds (``below + r * step`` for rank r); offset: flat
    index of base's first entry in the whole tensor."""
    dtype = compute_dtype(base, [expert])
    tau = expert.reshape(-1).to(dtype) - base.reshape(-1).to(dtype)
    n = tau.numel()
    magnitude = tau.abs()
    before = magnitude.to(torch.float64).sum()
    if n == 0:
        out.zero_()
        return torch.stack([before, before])
    index = torch.arange(offset, offset + n, dtype=torch.int64, device=tau.device)
    rank = ranks(rows_view(magnitude, width, inner))
    bits = _shr(hash_bits(key, rows_view(index, width, inner)), 64 - UNIFORM_BITS)
    keep_rows = bits < below + rank * step
    keep = torch.empty(n, dtype=torch.bool, device=tau.device)
    if inner > 1:
        keep.view(-1, width, inner).copy_(keep_rows.view(-1, inner, width).transpose(1, 2))
    else:
        keep.copy_(keep_rows.reshape(-1))
    kept = torch.where(keep, tau, torch.zeros_like(tau))
    out.copy_(kept.reshape(out.shape).to(out.dtype))
    after = torch.where(keep, magnitude, torch.zeros_like(magnitude)).to(torch.float64).sum()
    return torch.stack([before, after])
