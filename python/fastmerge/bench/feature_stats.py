"""feature_stats: FeatureStats' correlation matrix vs torch.matmul and torch.corrcoef.

Group ``n<N>-d<D>``: N samples of D units per model, float32, seeded (default N = 16,384,
D = 1,024; ``--quick``: 1,024 and 128); model b's units are noisy mixtures of a's.
Providers: ``fastmerge-<backend>`` (``FeatureStats().update(xa, xb).correlation()``),
``-stream16`` (16 batches), ``-full`` (``FeatureStats(full=True)``, the (2D)^2 matrix);
``torch.matmul`` (a plain (D x N) @ (N x D) product: the FLOP-rate yardstick) and
``torch.corrcoef-concat`` (``torch.corrcoef`` of the pre-concatenated features).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from fastmerge.features import FeatureStats

from ._harness import cached
from ._suite import Case, fastmerge_backends

SIZES = (16384, 1024)
QUICK_SIZES = (1024, 128)
TORCH_PEERS = ("torch.matmul", "torch.corrcoef-concat")


@cached
def features(n: int, d: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """xa, xb: (n, d) float32; b's units mix a's (permuted) with noise.

    Example:
        >>> features(8, 2, "cpu")[1].shape
        torch.Size([8, 2])
    """
    gen = torch.Generator().manual_seed(0)
    xa = torch.randn(n, d, generator=gen) * 0.5 + 1.0
    mix = torch.randn(n, d, generator=gen)
    xb = 0.8 * xa[:, torch.randperm(d, generator=gen)] + 0.6 * mix - 0.5
    return xa.to(device), xb.to(device)


def _setup(provider: str, n: int, d: int, device: str) -> Callable[[], Callable[[], Any]]:
    def setup() -> Callable[[], Any]:
        xa, xb = features(n, d, device)
        if provider == "torch.matmul":
            at = xa.T.contiguous()
            return lambda: torch.matmul(at, xb)
        if provider == "torch.corrcoef-concat":
            both = torch.cat([xa, xb], dim=1).T.contiguous()
            return lambda: torch.corrcoef(both)
        backend, _, variant = provider.removeprefix("fastmerge-").partition("-")
        if variant == "full":
            return lambda: FeatureStats(full=True, backend=backend).update(xa, xb).correlation()
        if variant == "stream16":
            step = max(n // 16, 1)

            def streamed() -> torch.Tensor:
                stats = FeatureStats(backend=backend)
                for i in range(0, n, step):
                    stats.update(xa[i : i + step], xb[i : i + step])
                return stats.correlation()

            return streamed
        return lambda: FeatureStats(backend=backend).update(xa, xb).correlation()

    return setup


def cases(device: str, quick: bool) -> list[Case]:
    """One group: fastmerge's backends and variants, then the torch peers.

    Example:
        >>> cases("cpu", True)[0].provider
        'fastmerge-cpu'
    """
    n, d = QUICK_SIZES if quick else SIZES
    ours = [
        f"fastmerge-{b}{v}" for b in fastmerge_backends(device) for v in ("", "-stream16", "-full")
    ]
    return [
        Case(f"n{n}-d{d}", p, _setup(p, n, d, device), p in ours, "d", d)
        for p in ours + list(TORCH_PEERS)
    ]
