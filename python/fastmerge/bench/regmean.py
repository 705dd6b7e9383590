"""regmean: fastmerge.merge.regmean vs a plain-torch RegMean (per-batch Grams, one solve per layer).

Model ``mlp<L>x<W>``: L Linear(W, W) layers with ReLU between them (default L = 6, W = 768;
``--quick``: 2 x 64), float32, seeded; T = 2 models, each merged on its own N samples
(default 16,384; quick: 1,024) in batches of B (groups ``-b64`` and ``-b1024``; quick: 64),
alpha = 0.9. Providers: ``fastmerge`` (:func:`fastmerge.merge.regmean`; its setup call is
checked against the plain merge and is its warm-up) and
``plain-torch``, written the way research code (FusionBench's RegMean) does it: a forward
hook per Linear computes the float32 ``x.T @ x`` of every batch and folds it into the
running mean Gram; then, per layer, the shrunk Grams are summed and
``torch.linalg.solve`` gives the weight; the other tensors are averaged. Both must give the
same merged weights (relative difference <= 1e-3: the plain side's float32 rounding). Full
size: 2 rounds, no warm-up (the plain merge at B = 64 takes minutes on 2 busy cores).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from fastmerge.merge import regmean

from ._harness import cached
from ._peers import note
from ._suite import Case

PROVIDERS = ("fastmerge", "plain-torch")
#: (layers, width, models, samples, batch sizes)
DEFAULT = (6, 768, 2, 16384, (64, 1024))
QUICK = (2, 64, 2, 1024, (64,))
ALPHA = 0.9


def mlp(layers: int, width: int) -> nn.Sequential:
    """L Linear(W, W) layers with a ReLU between consecutive ones; He-initialized weights
    and small biases, so that no hidden unit is dead on every sample (a singular Gram).

    Example:
        >>> len(mlp(2, 8))
        3
    """
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(width, width)] + ([nn.ReLU()] if i < layers - 1 else [])
    for m in mods:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.normal_(m.bias, std=0.01)
    return nn.Sequential(*mods)


@cached
def workload(layers: int, width: int, models: int, samples: int, batch: int) -> dict[str, Any]:
    """The models (eval mode) and each model's list of batches.

    Example:
        >>> w = workload(2, 8, 2, 32, 16)
        >>> len(w["models"]), len(w["data"][0]), tuple(w["data"][0][0].shape)
        (2, 2, (16, 8))
    """
    torch.manual_seed(0)
    nets = [mlp(layers, width).eval() for _ in range(models)]
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(models):
        x = torch.randn(samples, width, generator=gen)
        data.append(list(x.split(batch)))
    return {"models": nets, "data": data}


def plain_regmean(models: list[nn.Module], data: list[list[torch.Tensor]], alpha: float):
    """RegMean as research code writes it: running-mean Grams from forward hooks, then one
    ``torch.linalg.solve`` per layer. Returns the merged state dict.

    Example:
        >>> w = workload(2, 8, 2, 32, 16)
        >>> sorted(plain_regmean(w["models"], w["data"], 0.9))[:2]
        ['0.bias', '0.weight']
    """
    grams = [_running_grams(model, batches) for model, batches in zip(models, data)]
    states = [m.state_dict() for m in models]
    merged = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
    for name in grams[0]:
        shrunk = []
        for g in (gs[name] for gs in grams):
            diag = torch.diag(torch.diagonal(g))
            shrunk.append(alpha * g + (1 - alpha) * diag)
        lhs = sum(shrunk)
        rhs = sum(g @ s[f"{name}.weight"].T for g, s in zip(shrunk, states))
        merged[f"{name}.weight"] = torch.linalg.solve(lhs, rhs).T
    return merged


def _running_grams(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """FusionBench-style: per batch, ``x.T @ x`` folded into a running mean, per Linear."""
    gram: dict[str, torch.Tensor] = {}
    seen: dict[str, int] = {}

    def hook_for(name: str) -> Callable:
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            xtx = x.T @ x
            if name not in gram:
                gram[name], seen[name] = xtx / x.shape[0], x.shape[0]
            else:
                n = seen[name]
                gram[name] = (gram[name] * n + xtx) / (n + x.shape[0])
                seen[name] = n + x.shape[0]

        return hook

    handles = [
        m.register_forward_hook(hook_for(n))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return gram


@cached
def reference(layers: int, width: int, models: int, samples: int) -> dict[str, torch.Tensor]:
    """The plain-torch merge of the workload (batches of 1,024: the batching does not change
    the result), that every fastmerge case is checked against.

    Example:
        >>> sorted(reference(2, 8, 2, 32))[-1]
        '2.weight'
    """
    w = workload(layers, width, models, samples, 1024)
    return plain_regmean(w["models"], w["data"], ALPHA)


def _check_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    """Both providers give the same merged weights up to the float32 rounding of the
    plain-torch side (its float32 running means and solves); returns the largest relative
    (Frobenius) difference."""
    worst = 0.0
    for key, value in ours.items():
        rel = float((value - theirs[key]).norm() / theirs[key].norm().clamp_min(1e-30))
        if rel > 1e-3:
            raise AssertionError(f"regmean bench: {key} differs by {rel:.3g} (relative)")
        worst = max(worst, rel)
    return worst


def _setup(provider: str, shape: tuple, batch: int) -> Callable[[], Callable[[], Any]]:
    layers, width, models, samples, _ = shape

    def setup() -> Callable[[], Any]:
        w = workload(layers, width, models, samples, batch)
        if provider == "fastmerge":
            ours = regmean(w["models"], w["data"], alpha=ALPHA).state_dict()  # also warms up
            worst = _check_same(ours, reference(layers, width, models, samples))
            note(f"regmean: b{batch}: merged weights agree with plain-torch to {worst:.2g}")
            return lambda: regmean(w["models"], w["data"], alpha=ALPHA)
        return lambda: plain_regmean(w["models"], w["data"], ALPHA)

    return setup


def cases(device: str, quick: bool) -> list[Case]:
    """One group per batch size; fastmerge is the ratio's reference.

    Example:
        >>> [c.provider for c in cases("cpu", True)]
        ['fastmerge', 'plain-torch']
    """
    if device != "cpu":
        note("regmean: CPU only (its models and data are built on the CPU); skipped")
        return []
    shape = QUICK if quick else DEFAULT
    layers, width, _, samples, batches = shape
    rounds = None if quick else 2  # calls of tens of seconds: no warm-up call, 2 rounds
    out = []
    for batch in batches:
        group = f"mlp{layers}x{width}-n{samples}-b{batch}"
        for p in PROVIDERS:
            setup = _setup(p, shape, batch)
            out.append(
                Case(group, p, setup, p == "fastmerge", "batch", batch, rounds, warmup=quick)
            )
    return out
