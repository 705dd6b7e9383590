"""Which weights have a scope, a module's scope, and fusing several models' scopes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import torch
from torch import nn

from ..dist import should_reduce
from ..ops.scope_stats import scope_stats
from ..stats import ScopeStats

#: include(module_name, module, param_name, param) -> whether the parameter has a scope.
Include = Callable[[str, nn.Module, str, nn.Parameter], bool]

FUSION_RULES = ("mean", "moment")


def linear_and_conv_weights(
    module_name: str, module: nn.Module, param_name: str, param: nn.Parameter
) -> bool:
    """Default filter: the ``weight`` of Linear and Conv layers (no biases, no norms).

    Example:
        >>> linear_and_conv_weights("fc", torch.nn.Linear(2, 2), "weight", None)
        True
    """
    return param_name == "weight" and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))


def scoped_parameters(
    module: nn.Module, include: Optional[Include] = None
) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` of every parameter that `include` selects, in
    ``module.named_modules()`` order (shared parameters once).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [name for name, _ in scoped_parameters(model)]
        ['0.weight', '2.weight']
    """
    include = include or linear_and_conv_weights
    seen: set[int] = set()
    selected = []
    for module_name, sub in module.named_modules():
        for param_name, param in sub.named_parameters(recurse=False):
            if id(param) in seen or not include(module_name, sub, param_name, param):
                continue
            seen.add(id(param))
            selected.append((f"{module_name}.{param_name}" if module_name else param_name, param))
    return selected


def scope_of(
    module: nn.Module,
    include: Optional[Include] = None,
    *,
    backend: Optional[str] = None,
    distributed: bool = False,
) -> ScopeStats:
    """The weight scope of a model: mean and std of each selected parameter.

    Args:
        module: any ``nn.Module``.
        include: parameter filter (default :func:`linear_and_conv_weights`).
        backend: as for :func:`fastmerge.scope_stats`.
        distributed: each rank of the torch.distributed process group holds a shard of
            every selected parameter (e.g. tensor-parallel or flat FSDP shards, possibly
            empty): merge the shards' statistics over the ranks
            (:meth:`fastmerge.ScopeStats.all_reduce`). Off by default, unlike the data
            functions of :mod:`fastmerge.pleas`, because replicated parameters (DDP) must
            not be counted once per rank.

    Returns:
        :class:`~fastmerge.ScopeStats` whose ``names`` are the parameters' names.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> fastmerge.wsa.scope_of(model).names
        ('0.weight', '1.weight')
    """
    named = scoped_parameters(module, include)
    if not named:
        raise ValueError(
            "no parameter of the module matches `include` (default: Linear/Conv weights)"
        )
    stats = scope_stats([p.detach() for _, p in named], backend=backend)
    stats = ScopeStats(stats.mean, stats.std, stats.count, tuple(name for name, _ in named))
    return stats.all_reduce() if should_reduce(distributed) else stats


def fuse_scopes(
    scopes: Sequence[ScopeStats],
    weights: Optional[Sequence[float]] = None,
    rule: str = "mean",
) -> ScopeStats:
    """Fuse several models' scopes into one target scope (e.g. each federated round).

    With weights p_k (normalized to sum to 1; default equal):

    * ``"mean"``: mu = sum_k p_k mu_k and sigma^2 = sum_k p_k sigma_k^2.
    * ``"moment"``: mean and variance of the mixture sum_k p_k N(mu_k, sigma_k^2):
      sigma^2 = sum_k p_k (sigma_k^2 + mu_k^2) - mu^2 (never smaller than "mean").

    Never use the scope of the averaged model instead: averaging weights that are not
    aligned shrinks sigma. The fused count is the p-weighted mean of the counts.

    Example:
        >>> a = fastmerge.ScopeStats.from_values([0.0], [1.0])
        >>> b = fastmerge.ScopeStats.from_values([2.0], [1.0])
        >>> [round(s, 12) for s in fastmerge.wsa.fuse_scopes([a, b], rule="moment").std.tolist()]
        [1.414213562373]
    """
    if rule not in FUSION_RULES:
        raise ValueError(f"rule must be 'mean' or 'moment', got {rule!r}")
    if not scopes:
        raise ValueError("scopes is empty: nothing to fuse")
    first = scopes[0]
    for k, scope in enumerate(scopes):
        if not isinstance(scope, ScopeStats):
            raise TypeError(f"scopes[{k}] must be a ScopeStats, got {type(scope).__name__}")
        if len(scope) != len(first):
            raise ValueError(f"scopes[{k}] has {len(scope)} entries, scopes[0] has {len(first)}")
        if scope.names is not None and first.names is not None and scope.names != first.names:
            raise ValueError(
                f"scopes[{k}] describes other parameters than scopes[0] (names differ)"
            )
    p = _fusion_weights(weights, len(scopes), first.mean.device)
    mean = torch.stack([s.mean.to(first.mean.device) for s in scopes])
    var = torch.stack([s.var.to(first.mean.device) for s in scopes])
    count = torch.stack([s.count.to(first.mean.device) for s in scopes])
    fused_mean = (p[:, None] * mean).sum(0)
    if rule == "mean":
        fused_var = (p[:, None] * var).sum(0)
    else:
        fused_var = (p[:, None] * (var + mean * mean)).sum(0) - fused_mean * fused_mean
    names = next((s.names for s in scopes if s.names is not None), None)
    return ScopeStats(fused_mean, fused_var.clamp_min(0).sqrt(), (p[:, None] * count).sum(0), names)


def _fusion_weights(
    weights: Optional[Sequence[float]], k: int, device: torch.device
) -> torch.Tensor:
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64, device=device)
    p = torch.as_tensor(weights, dtype=torch.float64, device=device).reshape(-1)
    if p.shape[0] != k:
        raise ValueError(f"weights has {p.shape[0]} entries for {k} scopes")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or float(p.sum()) <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return p / p.sum()
