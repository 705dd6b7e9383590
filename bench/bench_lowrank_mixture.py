"""fastmerge.lowrank_mixture (Twin-Merging's routed linear layer) against its peers.

Workloads, float32, seeded, T = 8 tasks of rank r = 77 (10% of 768), batch N = 64 samples
of mixed tasks: one transformer MLP pair of layers, ``768to3072`` and ``3072to768``, with
x of shape (64, 128, d_in) (``-tok128``: 128 tokens per sample) or (64, d_in) (``-tok1``).
Gates ``dense`` (a softmax row per sample) or ``top2`` (the two largest renormalized, the
rest zero). One group per workload and gate kind, ``lowrank_mixture-<workload>-<gates>``:

* ``fastmerge-<backend>``: ``fastmerge.lowrank_mixture(x, W, b, us, vs, gates)``, the path
  chosen by gate density;
* ``fastmerge-cpu-densepath`` / ``fastmerge-cpu-routedpath``: the cpu backend forced onto
  one path (dense stacked GEMMs, or per-task grouping of the routed samples), to show that
  the density rule picks the faster one;
* ``torch.nn.Linear-static``: the shared model alone, ``nn.Linear(d_in, d_out)`` on the same
  x: the latency anchor (the targets are at most 2.3x its latency for dense gates and 1.4x
  for top-2, i.e. a ratio of at least 0.43 and 0.71 in the table);
* ``torch-stacked-gemms``: the same mixture in plain torch (two GEMMs over the stacked
  factors, gates broadcast), what a user would write without fastmerge;
* ``naive-merge-per-sample``: the reference Twin-Merging way, batch size 1: the dense task
  deltas ``U_t S_t V_t^T`` are stored (computed untimed, as the reference stores them); per
  sample, ``W + sum_t g_t Delta_t`` over its non-zero gates is materialized and applied;
* ``naive-merge-factors-per-sample``: the same from the factors, per sample
  ``fastmerge.merge_lowrank`` (``W + U_all diag(g) V_all``, over its non-zero gates) and
  ``nn.functional.linear``.

The naive peers are slow, so they run on the first 4 samples (tok128) or 16 samples (tok1)
of the batch; every benchmark records its ``samples`` and ratios compare time per sample.

``FASTMERGE_BENCH_THREADS=n`` sets torch's and fastmerge's thread counts for the whole
suite (all peers alike). On a small shared machine, ``1`` gives the stable figures: with
more threads than free cores every small GEMM waits at OpenMP barriers for descheduled
threads (a 512 x 768 x 77 product took 1 ms on one thread and 48 ms on two under load),
which penalizes the routed path's per-task products far more than one large GEMM.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Callable

import pytest
import torch
from conftest import SEED, Workload, devices, fastmerge_backends, label, run_benchmark

import fastmerge

TASKS, RANK, BATCH = 8, 77, 64
LAYERS = {"768to3072": (768, 3072), "3072to768": (3072, 768)}
TOKENS = (128, 1)
GATES = ("dense", "top2")
NAIVE_SAMPLES = {128: 4, 1: 16}
PEERS = (
    "torch.nn.Linear-static",
    "torch-stacked-gemms",
    "naive-merge-per-sample",
    "naive-merge-factors-per-sample",
)
FORCED = ("fastmerge-cpu-densepath", "fastmerge-cpu-routedpath")
OP_MODULE = importlib.import_module("fastmerge.ops.lowrank_mixture")

if os.environ.get("FASTMERGE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTMERGE_BENCH_THREADS"]))
    fastmerge.set_num_threads(int(os.environ["FASTMERGE_BENCH_THREADS"]))


@functools.cache
def mixture_workload(layer: str, tokens: int, gates: str, device: str) -> Workload:
    """x, W, b, us, vs, gates of one layer; us and vs scaled like SVD factors of deltas."""
    d_in, d_out = LAYERS[layer]
    gen = torch.Generator().manual_seed(SEED)
    shape = (BATCH, tokens, d_in) if tokens > 1 else (BATCH, d_in)
    x = torch.randn(shape, generator=gen)
    weight = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    bias = torch.randn(d_out, generator=gen) * 0.02
    us = torch.randn(TASKS, d_out, RANK, generator=gen) * 0.02
    vs = torch.randn(TASKS, RANK, d_in, generator=gen) / d_in**0.5
    g = torch.softmax(torch.randn(BATCH, TASKS, generator=gen) * 2, dim=1)
    if gates == "top2":
        top = g.topk(2, dim=1)
        g = torch.zeros_like(g).scatter(1, top.indices, top.values / top.values.sum(1, True))
    tensors = tuple(t.to(device) for t in (x, weight, bias, us, vs, g))
    name = f"{layer}-tok{tokens}-{gates}"
    return Workload(name, ("x", "weight", "bias", "us", "vs", "gates"), tensors)


def _forced_path(provider: str, args: tuple) -> Callable[[], torch.Tensor]:
    """The cpu backend with its density rule set to one path."""
    density = 0.0 if provider.endswith("densepath") else 1.0

    def run() -> torch.Tensor:
        saved = OP_MODULE.SPARSE_MAX_DENSITY
        OP_MODULE.SPARSE_MAX_DENSITY = density
        try:
            return fastmerge.lowrank_mixture(*args, backend="cpu")
        finally:
            OP_MODULE.SPARSE_MAX_DENSITY = saved

    return run


def _stacked_gemms(x, weight, bias, us, vs, gates) -> torch.Tensor:
    """Plain torch: z = x V_all^T, gated by broadcasting, y = x W^T + b + z U_all^T."""
    t, d_out, r = us.shape
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    z = (x3 @ vs.reshape(t * r, -1).T).view(*x3.shape[:2], t, r) * gates[:, None, :, None]
    u_all = us.permute(1, 0, 2).reshape(d_out, t * r)
    y = torch.nn.functional.linear(x3, weight, bias) + z.flatten(2) @ u_all.T
    return y.reshape(*x.shape[:-1], d_out)


def _naive_deltas(x, weight, bias, us, vs, gates, samples: int) -> Callable[[], list]:
    """Per sample: W + sum_t g_t Delta_t from stored dense deltas, then one linear."""
    deltas = torch.bmm(us, vs)  # (T, d_out, d_in), untimed: the reference stores these

    def run() -> list:
        out = []
        for n in range(samples):
            merged = weight.clone()
            for task in torch.nonzero(gates[n]).flatten().tolist():
                merged.add_(deltas[task], alpha=float(gates[n, task]))
            out.append(torch.nn.functional.linear(x[n], merged, bias))
        return out

    return run


def _naive_factors(x, weight, bias, us, vs, gates, samples: int) -> Callable[[], list]:
    """Per sample: merge the weights of its non-zero gates, then one nn.functional.linear."""

    def run() -> list:
        out = []
        for n in range(samples):
            chosen = torch.nonzero(gates[n]).flatten()
            merged = fastmerge.merge_lowrank(weight, us[chosen], vs[chosen], gates[n, chosen])
            out.append(torch.nn.functional.linear(x[n], merged, bias))
        return out

    return run


def _peer(provider: str, wl: Workload, tokens: int) -> tuple[Callable[[], object], int]:
    """The function timed for `provider` (set-up untimed) and the samples it processes."""
    x, weight, bias, us, vs, gates = wl.tensors
    args = (x, weight, bias, us, vs, gates)
    if provider in FORCED:
        return _forced_path(provider, args), BATCH
    if provider.startswith("fastmerge-"):
        backend = provider.removeprefix("fastmerge-")
        return lambda: fastmerge.lowrank_mixture(*args, backend=backend), BATCH
    if provider == "torch.nn.Linear-static":
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], device=x.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        return lambda: linear(x), BATCH
    if provider == "torch-stacked-gemms":
        return lambda: _stacked_gemms(*args), BATCH
    if provider == "naive-merge-per-sample":
        samples = NAIVE_SAMPLES[tokens]
        return _naive_deltas(*args, samples), samples
    if provider == "naive-merge-factors-per-sample":
        samples = NAIVE_SAMPLES[tokens]
        return _naive_factors(*args, samples), samples
    raise ValueError(provider)


CASES = [
    pytest.param(dev, layer, tokens, gates, prov, id=f"{dev}-{layer}-tok{tokens}-{gates}-{prov}")
    for dev in devices()
    for tokens in TOKENS
    for layer in LAYERS
    for gates in GATES
    for prov in [f"fastmerge-{b}" for b in fastmerge_backends(dev)]
    + (list(FORCED) if dev == "cpu" else [])
    + list(PEERS)
]


@pytest.mark.parametrize(("device", "layer", "tokens", "gates", "provider"), CASES)
def bench_lowrank_mixture(
    benchmark: Any, device: str, layer: str, tokens: int, gates: str, provider: str
) -> None:
    wl = mixture_workload(layer, tokens, gates, device)
    label(benchmark, "lowrank_mixture", wl, device, provider)
    fn, samples = _peer(provider, wl, tokens)
    benchmark.extra_info["samples"] = samples
    with torch.no_grad():
        run_benchmark(benchmark, fn, device, min_rounds=5)
