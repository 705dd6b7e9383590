"""TIES merging of LLaMA-like checkpoints: fastmerge.merge.ties against a per-tensor
``torch.kthvalue`` implementation.

Workloads (float32, seeded, built in memory with torch.randn): a base model and four
experts ``base + 0.01 * randn``, LLaMA-style tensors (token embedding, per layer q/k/v/o,
gate/up/down MLP and two RMSNorm weights, final norm, untied LM head):

* ``llama170m``: hidden 1,024, MLP 2,816, 8 layers, vocabulary 32,000: 168,313,856
  parameters per model (5 x 673 MB of inputs);
* ``llama40m``: hidden 512, MLP 1,408, 3 layers: 42,405,376 parameters per model.

Group ``ties-<workload>``, TIES with density 0.3 and scale 1.0:

* ``fastmerge-<backend>``: :func:`fastmerge.merge.ties` (the fused threshold selection
  and combine kernels);
* ``torch.kthvalue-loop``: the straightforward per-tensor implementation below: τ per
  expert, ``kthvalue`` of ``|τ|``, masks, sign election and disjoint mean in torch ops,
  with the same rules (keep ``|τ| >= threshold``, sums in expert order). Before timing,
  the two are checked to give the identical state dict.

fastmerge runs at least 3 rounds (``MIN_ROUNDS``) after a warm-up; the peer, which takes
a minute or more per round on 2 cores, runs exactly 3, warmed up by the identity check.
Run: ``python -m pytest bench/bench_merge.py --benchmark-json
bench/results/merge-cpu.raw.json && python bench/report.py bench/results/merge-cpu.raw.json``.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from conftest import SEED, Workload, devices, fastmerge_backends, label, run_benchmark

import fastmerge
from fastmerge.merge import keep_count

DENSITY = 0.3
SCALE = 1.0
EXPERTS = 4
MIN_ROUNDS = 3
#: name -> (hidden, MLP width, layers, vocabulary)
CONFIGS = {"llama170m": (1024, 2816, 8, 32000), "llama40m": (512, 1408, 3, 32000)}


def llama_shapes(hidden: int, mlp: int, layers: int, vocab: int) -> list[tuple[str, tuple]]:
    """Names and shapes of a LLaMA-style decoder with an untied LM head."""
    shapes: list[tuple[str, tuple]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        shapes += [(f"{p}.mlp.gate_proj.weight", (mlp, hidden))]
        shapes += [(f"{p}.mlp.up_proj.weight", (mlp, hidden))]
        shapes += [(f"{p}.mlp.down_proj.weight", (hidden, mlp))]
        shapes += [(f"{p}.input_layernorm.weight", (hidden,))]
        shapes += [(f"{p}.post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


@functools.lru_cache(maxsize=1)  # one workload in memory at a time
def merge_workload(name: str, device: str) -> tuple[dict, list[dict]]:
    """(base, experts): seeded float32 state dicts on `device`."""
    gen = torch.Generator().manual_seed(SEED)
    base = {}
    for key, shape in llama_shapes(*CONFIGS[name]):
        base[key] = torch.randn(shape, generator=gen).mul_(0.02).to(device)
    experts = [
        {k: v + torch.randn(v.shape, generator=gen).mul_(0.01).to(device) for k, v in base.items()}
        for _ in range(EXPERTS)
    ]
    return base, experts


def ties_kthvalue(base: dict, experts: list[dict], density: float, scale: float) -> dict:
    """TIES per tensor with torch ops and ``torch.kthvalue`` (the peer)."""
    merged = {}
    for key, b in base.items():
        b32 = b.float()
        n = b.numel()
        k = keep_count(density, n)
        kept = []
        for expert in experts:
            tau = expert[key].float() - b32
            magnitude = tau.abs()
            threshold = magnitude.flatten().kthvalue(n - k + 1).values
            kept.append(torch.where(magnitude >= threshold, tau, 0.0))
        total = torch.zeros_like(b32)
        for t in kept:
            total = total + t
        agreeing = torch.zeros_like(b32)
        count = torch.zeros_like(b32)
        for t in kept:
            agrees = torch.where(total > 0, t > 0, t < 0) & (total != 0)
            agreeing = agreeing + torch.where(agrees, t, 0.0)
            count = count + agrees.float()
        mean = torch.where(count > 0, agreeing / count.clamp(min=1), 0.0)
        merged[key] = (b32 + scale * mean).to(b.dtype)
    return merged


@functools.cache
def check_identical(name: str, device: str, backend: str) -> None:
    """Once per workload and backend, untimed: fastmerge and the peer agree bit for bit."""
    base, experts = merge_workload(name, device)
    ours = fastmerge.merge.ties(base, experts, density=DENSITY, scale=SCALE, backend=backend)
    peer = ties_kthvalue(base, experts, DENSITY, SCALE)
    for key in base:
        assert torch.equal(ours[key], peer[key]), f"{key}: fastmerge and the peer differ"


CASES = [
    pytest.param(name, dev, prov, id=f"{name}-{dev}-{prov}")
    for name in CONFIGS
    for dev in devices()
    for prov in [f"fastmerge-{b}" for b in fastmerge_backends(dev)] + ["torch.kthvalue-loop"]
]


@pytest.mark.parametrize(("name", "device", "provider"), CASES)
def bench_ties(benchmark: Any, name: str, device: str, provider: str) -> None:
    base, experts = merge_workload(name, device)
    tensors = tuple(base.values()) + tuple(t for e in experts for t in e.values())
    label(benchmark, "ties", Workload(name, tuple(base), tensors), device, provider)
    benchmark.extra_info.update(
        experts=EXPERTS, density=DENSITY, params=sum(t.numel() for t in base.values())
    )
    if provider.startswith("fastmerge-"):
        backend = provider.removeprefix("fastmerge-")
        check_identical(name, device, backend)
        fn = lambda: fastmerge.merge.ties(  # noqa: E731
            base, experts, density=DENSITY, scale=SCALE, backend=backend
        )
        run_benchmark(benchmark, fn, device, min_rounds=MIN_ROUNDS)
    else:
        # Minutes per round on a small machine: no warm-up round beyond the one the
        # identity check of the fastmerge case already ran.
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        benchmark.pedantic(
            lambda: (ties_kthvalue(base, experts, DENSITY, SCALE), sync()),
            rounds=MIN_ROUNDS,
            iterations=1,
            warmup_rounds=0,
        )


if __name__ == "__main__":
    import math

    for wl, config in CONFIGS.items():
        print(wl, f"{sum(math.prod(s) for _, s in llama_shapes(*config)):,} parameters")
