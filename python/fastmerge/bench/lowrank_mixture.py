"""lowrank_mixture: Twin-Merging's routed linear layer vs nn.Linear, torch GEMMs and loops.

Groups ``<d_in>to<d_out>-tok<L>-<gates>``: T = 8 tasks of rank 77 (10% of 768), batch of
64 mixed-task samples, x of shape (64, L, d_in) or (64, d_in) for L = 1; gates ``dense``
(a softmax row per sample) or ``top2`` (the two largest, renormalised). ``--quick``:
768 -> 3072 replaced by 128 -> 512, L = 1, 8 samples. Providers: ``fastmerge-<backend>``;
``torch.nn.Linear-static`` (the shared model alone: the latency anchor);
``torch-stacked-gemms`` (the mixture in plain torch); ``naive-merge-per-sample`` (merge
``W + sum_t g_t Delta_t`` from stored dense deltas per sample, batch size 1) and
``naive-merge-factors-per-sample`` (per sample ``merge_lowrank`` from the factors). The
naive peers run on the first 4 (L = 128) or 16 (L = 1) samples, scaled to the batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from fastmerge.ops import lowrank_mixture, merge_lowrank

from ._harness import cached
from ._suite import Case, fastmerge_backends

TASKS, RANK, BATCH = 8, 77, 64
LAYERS = ((768, 3072), (3072, 768))
TOKENS = (128, 1)
QUICK = {"layers": ((128, 512),), "tokens": (1,), "batch": 8, "rank": 13}
GATES = ("dense", "top2")
NAIVE_SAMPLES = {128: 4, 1: 16}
PEERS = (
    "torch.nn.Linear-static",
    "torch-stacked-gemms",
    "naive-merge-per-sample",
    "naive-merge-factors-per-sample",
)


@cached
def layer(d_in: int, d_out: int, tokens: int, gates: str, batch: int, rank: int, device: str):
    """x, W, b, us, vs, gates of one layer; us and vs scaled like SVD factors of deltas.

    Example:
        >>> layer(4, 2, 1, "top2", 3, 1, "cpu")[5].count_nonzero().item()
        6
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, tokens, d_in) if tokens > 1 else (batch, d_in), generator=gen)
    weight = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    bias = torch.randn(d_out, generator=gen) * 0.02
    us = torch.randn(TASKS, d_out, rank, generator=gen) * 0.02
    vs = torch.randn(TASKS, rank, d_in, generator=gen) / d_in**0.5
    g = torch.softmax(torch.randn(batch, TASKS, generator=gen) * 2, dim=1)
    if gates == "top2":
        top = g.topk(2, dim=1)
        g = torch.zeros_like(g).scatter(1, top.indices, top.values / top.values.sum(1, True))
    return tuple(t.to(device) for t in (x, weight, bias, us, vs, g))


def stacked_gemms(x, weight, bias, us, vs, gates) -> torch.Tensor:
    """Plain torch: z = x V_all^T gated by broadcasting, y = x W^T + b + z U_all^T."""
    t, d_out, r = us.shape
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    z = (x3 @ vs.reshape(t * r, -1).T).view(*x3.shape[:2], t, r) * gates[:, None, :, None]
    u_all = us.permute(1, 0, 2).reshape(d_out, t * r)
    y = torch.nn.functional.linear(x3, weight, bias) + z.flatten(2) @ u_all.T
    return y.reshape(*x.shape[:-1], d_out)


def _naive(args: tuple, samples: int, factors: bool) -> Callable[[], list]:
    x, weight, bias, us, vs, gates = args
    deltas = None if factors else torch.bmm(us, vs)  # untimed: the reference stores these

    def run() -> list:
        out = []
        for n in range(samples):
            chosen = torch.nonzero(gates[n]).flatten()
            if factors:
                merged = merge_lowrank(weight, us[chosen], vs[chosen], gates[n, chosen])
            else:
                merged = weight.clone()
                for task in chosen.tolist():
                    merged.add_(deltas[task], alpha=float(gates[n, task]))
            out.append(torch.nn.functional.linear(x[n], merged, bias))
        return out

    return run


def _setup(provider: str, key: tuple, samples: int) -> Callable[[], Callable[[], Any]]:
    def setup() -> Callable[[], Any]:
        args = layer(*key)
        x, weight, bias = args[:3]
        if provider.startswith("fastmerge-"):
            backend = provider.removeprefix("fastmerge-")
            return lambda: lowrank_mixture(*args, backend=backend)
        if provider == "torch.nn.Linear-static":
            return lambda: torch.nn.functional.linear(x, weight, bias)
        if provider == "torch-stacked-gemms":
            return lambda: stacked_gemms(*args)
        return _naive(args, samples, factors=provider.endswith("factors-per-sample"))

    def no_grad() -> Callable[[], Any]:
        fn = setup()

        def run() -> Any:
            with torch.no_grad():
                return fn()

        return run

    return no_grad


def cases(device: str, quick: bool) -> list[Case]:
    """Groups by token count, layer and gate kind; fastmerge's backends first.

    Example:
        >>> cases("cpu", True)[0].case
        '128to512-tok1-dense'
    """
    layers, tokens_list = (QUICK["layers"], QUICK["tokens"]) if quick else (LAYERS, TOKENS)
    batch, rank = (QUICK["batch"], QUICK["rank"]) if quick else (BATCH, RANK)
    ours = [f"fastmerge-{b}" for b in fastmerge_backends(device)]
    out = []
    for tokens in tokens_list:
        for d_in, d_out in layers:
            for gates in GATES:
                key = (d_in, d_out, tokens, gates, batch, rank, device)
                group = f"{d_in}to{d_out}-tok{tokens}-{gates}"
                for p in ours + list(PEERS):
                    naive = p.startswith("naive")
                    samples = min(NAIVE_SAMPLES[tokens], batch) if naive else batch
                    setup = _setup(p, key, samples)
                    rounds = None if quick else 5
                    case = Case(group, p, setup, p in ours, "d_in", d_in, rounds)
                    out.append(dataclasses.replace(case, scale=batch / samples))
    return out
