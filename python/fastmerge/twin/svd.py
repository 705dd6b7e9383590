"""Truncated SVD of weight deltas: exact for small matrices, randomized for large ones.

Twin-Merging keeps each task's exclusive knowledge ``Delta_t = theta_t - theta_shared`` as
rank-r factors. Two facts drive this module: a full-matrices SVD of a 50k-row embedding
would build a 50k x 50k ``U`` (we never ask for one), and for ranks far below
``min(shape)`` a randomized range finder with a few power iterations is both faster and,
on the decaying spectra of weight deltas, as accurate as the exact decomposition.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Union

import torch

#: Matrices whose smaller side is at most this use the exact SVD under ``method="auto"``.
EXACT_MAX_SIDE = 1024
#: Extra columns of the randomized range finder beyond the rank (Halko et al.'s p).
OVERSAMPLE = 10
#: Power iterations of the randomized range finder (sharpen a slowly decaying spectrum).
POWER_ITERATIONS = 4

Rank = Union[int, float]
METHODS = ("auto", "exact", "randomized")


class TruncatedSVD(NamedTuple):
    """``u`` (m, r), ``s`` (r,) descending, ``vh`` (r, n): ``a ~= u @ diag(s) @ vh``."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


def check_rank(rank: Rank) -> None:
    """Raise TypeError/ValueError unless `rank` is a float in (0, 1] or an int >= 1.

    Example:
        >>> check_rank(0.1)
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"rank must be an int or a float, got {type(rank).__name__}")
    if isinstance(rank, float) and not 0.0 < rank <= 1.0:  # also rejects NaN
        raise ValueError(f"a float rank is a fraction of min(shape) in (0, 1], got {rank}")
    if isinstance(rank, int) and rank < 1:
        raise ValueError(f"an int rank must be >= 1, got {rank}")


def resolve_rank(rank: Rank, shape: tuple[int, ...], name: str = "tensor") -> int:
    """The integer rank for a matrix of `shape`.

    A float in (0, 1] is a fraction of ``min(shape)`` (rounded up, at least 1); an int >= 1
    is the rank itself. A rank above ``min(shape)`` is clamped to it with a warning that
    names `name`.

    Example:
        >>> resolve_rank(0.1, (768, 3072))
        77
        >>> resolve_rank(8, (768, 3072))
        8
    """
    check_rank(rank)
    full = min(shape)
    if isinstance(rank, float):
        return max(1, math.ceil(rank * full)) if full else 0
    if rank > full:
        warnings.warn(
            f"rank {rank} is larger than min(shape) = {full} of {name} {tuple(shape)}; "
            f"clamped to {full}",
            stacklevel=2,
        )
        return full
    return rank


def truncated_svd(
    a: torch.Tensor,
    rank: int,
    *,
    method: str = "auto",
    oversample: int = OVERSAMPLE,
    power_iterations: int = POWER_ITERATIONS,
    seed: int = 0,
) -> TruncatedSVD:
    """The best rank-`rank` factors of the matrix `a`, in float64 for float64 input and
    float32 otherwise.

    Args:
        a: a 2-D floating tensor (m, n).
        rank: 0 <= rank <= min(m, n).
        method: ``"exact"`` (``torch.linalg.svd(full_matrices=False)``), ``"randomized"``
            (seeded range finder with `oversample` extra columns and `power_iterations`
            QR-stabilised power iterations, then an exact SVD of the small projection) or
            ``"auto"``: exact when ``min(m, n) <= EXACT_MAX_SIDE`` or when the sketch would
            cover more than half of ``min(m, n)``, randomized otherwise.
        seed: seed of the randomized sketch (results are reproducible).

    Example:
        >>> a = torch.outer(torch.arange(1.0, 4.0), torch.ones(5))
        >>> f = truncated_svd(a, 1)
        >>> torch.allclose(f.u * f.s @ f.vh, a)
        True
    """
    if a.dim() != 2:
        raise ValueError(f"truncated_svd needs a 2-D matrix, got shape {tuple(a.shape)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    m, n = a.shape
    if not 0 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [0, {min(m, n)}] for shape {(m, n)}, got {rank}")
    work = a.to(torch.float64 if a.dtype == torch.float64 else torch.float32)
    if method == "auto":
        small = min(m, n) <= EXACT_MAX_SIDE or 2 * (rank + oversample) > min(m, n)
        method = "exact" if small else "randomized"
    if method == "exact":
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
    else:
        u, s, vh = _randomized_svd(work, rank, oversample, power_iterations, seed)
    return TruncatedSVD(u[:, :rank], s[:rank], vh[:rank])


def _randomized_svd(
    a: torch.Tensor, rank: int, oversample: int, power_iterations: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko-Martinsson-Tropp: an orthonormal basis Q of a's range from a Gaussian sketch,
    refined by power iterations (re-orthonormalised each half step so that small singular
    directions are not lost to rounding), then the exact SVD of the small ``Q^T a``."""
    m, n = a.shape
    width = min(rank + oversample, m, n)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    sketch = torch.randn(n, width, generator=gen, device=a.device, dtype=a.dtype)
    q = torch.linalg.qr(a @ sketch).Q
    for _ in range(power_iterations):
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    u_small, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return q @ u_small, s, vh


def svd_tail(s: torch.Tensor, rank: int) -> float:
    """Frobenius norm of the best rank-`rank` approximation's error, from the full list of
    singular values `s` (Eckart-Young): ``sqrt(sum(s[rank:]**2))``.

    Example:
        >>> svd_tail(torch.tensor([3.0, 4.0, 0.0]), 0)
        5.0
    """
    return float(s[rank:].double().square().sum().sqrt())
