"""least_squares: LeastSquares' streamed normal equations vs torch.linalg.lstsq.

Group ``n<N>-d<D>-k<K>``: N samples of D inputs and K targets, float32, seeded (default
16,384 x 1,024 x 1,024; ``--quick``: 1,024 x 128 x 128); Gaussian inputs, targets a random
linear map plus noise. Providers: ``fastmerge`` (``LeastSquares(D, K, bias=False)
.update(x, y).solve()``), ``fastmerge-stream16`` (16 batches), ``torch.linalg.lstsq``
(float32) and ``torch.linalg.lstsq-float64`` (on data converted beforehand).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from fastmerge.least_squares import LeastSquares

from ._harness import cached
from ._suite import Case

SIZES = (16384, 1024, 1024)
QUICK_SIZES = (1024, 128, 128)
PROVIDERS = ("fastmerge", "fastmerge-stream16", "torch.linalg.lstsq", "torch.linalg.lstsq-float64")


@cached
def data(n: int, d: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (n, d), y: (n, k) float32 with y = x W^T + noise.

    Example:
        >>> data(16, 2, 3, "cpu")[1].shape
        torch.Size([16, 3])
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(k, d, generator=gen) / d**0.5
    y = x @ w.T + 0.3 * torch.randn(n, k, generator=gen)
    return x.to(device), y.to(device)


def _setup(provider: str, n: int, d: int, k: int, device: str) -> Callable[[], Callable[[], Any]]:
    def setup() -> Callable[[], Any]:
        x, y = data(n, d, k, device)
        if provider == "fastmerge":
            return lambda: LeastSquares(d, k, bias=False).update(x, y).solve()
        if provider == "fastmerge-stream16":
            step = max(n // 16, 1)

            def streamed() -> Any:
                ls = LeastSquares(d, k, bias=False)
                for i in range(0, n, step):
                    ls.update(x[i : i + step], y[i : i + step])
                return ls.solve()

            return streamed
        if provider == "torch.linalg.lstsq":
            return lambda: torch.linalg.lstsq(x, y).solution
        x64, y64 = x.double(), y.double()
        return lambda: torch.linalg.lstsq(x64, y64).solution

    return setup


def cases(device: str, quick: bool) -> list[Case]:
    """One group: fastmerge (whole and streamed), then lstsq in float32 and float64.

    Example:
        >>> [c.provider for c in cases("cpu", True)][:2]
        ['fastmerge', 'fastmerge-stream16']
    """
    n, d, k = QUICK_SIZES if quick else SIZES
    rounds = None if quick else 5
    group = f"n{n}-d{d}-k{k}"
    return [
        Case(group, p, _setup(p, n, d, k, device), p.startswith("fastmerge"), "d", d, rounds)
        for p in PROVIDERS
    ]
