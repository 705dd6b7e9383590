"""ties: fastmerge.merge.ties on LLaMA-like checkpoints vs a per-tensor torch.kthvalue TIES.

Groups are the models, a base and four experts ``base + 0.01 * randn`` (float32, seeded,
in memory), TIES with density 0.3 and scale 1: ``llama170m`` (hidden 1,024, MLP 2,816, 8
layers, vocabulary 32,000: 168,313,856 parameters per model, 3.4 GB of inputs) and
``llama40m`` (hidden 512, MLP 1,408, 3 layers); ``--quick``: ``llama200k`` (hidden 64,
2 layers, vocabulary 1,024). Providers: ``fastmerge-<backend>`` and
``torch.kthvalue-loop``: per tensor, tau per expert, ``kthvalue`` of ``|tau|``, masks, sign
election and disjoint mean in torch ops (the same rules; tests/merge checks agreement).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from fastmerge.merge import keep_count, ties

from ._harness import cached
from ._suite import Case, fastmerge_backends

DENSITY, SCALE, EXPERTS = 0.3, 1.0, 4
#: name -> (hidden, MLP width, layers, vocabulary)
CONFIGS = {"llama170m": (1024, 2816, 8, 32000), "llama40m": (512, 1408, 3, 32000)}
QUICK_CONFIGS = {"llama200k": (64, 176, 2, 1024)}


def llama_shapes(hidden: int, mlp: int, layers: int, vocab: int) -> list[tuple[str, tuple]]:
    """Names and shapes of a LLaMA-style decoder with an untied LM head.

    Example:
        >>> len(llama_shapes(8, 16, 2, 10))
        21
    """
    shapes: list[tuple[str, tuple]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        shapes += [(f"{p}.mlp.{x}_proj.weight", (mlp, hidden)) for x in ("gate", "up")]
        shapes += [(f"{p}.mlp.down_proj.weight", (hidden, mlp))]
        shapes += [(f"{p}.{x}_layernorm.weight", (hidden,)) for x in ("input", "post_attention")]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


@cached
def checkpoints(config: tuple, device: str) -> tuple[dict, list[dict]]:
    """(base, experts): seeded float32 state dicts on `device`."""
    gen = torch.Generator().manual_seed(0)
    base = {
        k: torch.randn(s, generator=gen).mul_(0.02).to(device) for k, s in llama_shapes(*config)
    }
    experts = [
        {k: v + torch.randn(v.shape, generator=gen).mul_(0.01).to(device) for k, v in base.items()}
        for _ in range(EXPERTS)
    ]
    return base, experts


def ties_kthvalue(base: dict, experts: list[dict], density: float, scale: float) -> dict:
    """TIES per tensor with torch ops and ``torch.kthvalue`` (the peer).

    Example:
        >>> b = {"w": torch.zeros(3)}
        >>> e = [{"w": torch.tensor([2.0, -1.0, 0.1])}, {"w": torch.tensor([4.0, 3.0, -0.1])}]
        >>> ties_kthvalue(b, e, 0.67, 1.0)["w"].tolist()
        [3.0, 3.0, 0.0]
    """
    merged = {}
    for key, b in base.items():
        b32, n = b.float(), b.numel()
        k = keep_count(density, n)
        kept = []
        for expert in experts:
            tau = expert[key].float() - b32
            threshold = tau.abs().flatten().kthvalue(n - k + 1).values
            kept.append(torch.where(tau.abs() >= threshold, tau, 0.0))
        total = torch.stack(kept).sum(0)
        agreeing, count = torch.zeros_like(b32), torch.zeros_like(b32)
        for t in kept:
            agrees = torch.where(total > 0, t > 0, t < 0) & (total != 0)
            agreeing = agreeing + torch.where(agrees, t, 0.0)
            count = count + agrees.float()
        mean = torch.where(count > 0, agreeing / count.clamp(min=1), 0.0)
        merged[key] = (b32 + scale * mean).to(b.dtype)
    return merged


def _setup(provider: str, config: tuple, device: str) -> Callable[[], Callable[[], Any]]:
    def setup() -> Callable[[], Any]:
        base, experts = checkpoints(config, device)
        if provider == "torch.kthvalue-loop":
            return lambda: ties_kthvalue(base, experts, DENSITY, SCALE)
        backend = provider.removeprefix("fastmerge-")
        return lambda: ties(base, experts, density=DENSITY, scale=SCALE, backend=backend)

    return setup


def cases(device: str, quick: bool) -> list[Case]:
    """One group per model; the peer (minutes per call on 2 cores) runs 3 rounds, no warm-up.

    Example:
        >>> cases("cpu", True)[-1].provider
        'torch.kthvalue-loop'
    """
    ours = [f"fastmerge-{b}" for b in fastmerge_backends(device)]
    out = []
    for name, config in (QUICK_CONFIGS if quick else CONFIGS).items():
        for p in ours + ["torch.kthvalue-loop"]:
            peer = p not in ours
            setup = _setup(p, config, device)
            # The peer takes minutes a call at the default sizes: no warm-up call there.
            case = Case(name, p, setup, not peer, "hidden", config[0], min_rounds=3)
            out.append(dataclasses.replace(case, warmup=quick or not peer))
    return out
