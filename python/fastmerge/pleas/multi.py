"""PLeaS and its baselines for N models: :func:`merge_many` and :func:`merge_weights_many`.

The N-model merge follows the two-model :func:`~fastmerge.pleas.merge` step for step:
:func:`~fastmerge.pleas.match_many` aligns every model to the reference (optionally
iterated), per-group ratios are allocated for the budget, :func:`merge_weights_many` builds
the model of :class:`~fastmerge.pleas.MultiLayout` s ``[merged | only-0 | ... |
only-(N-1)]`` (matched units averaged over the N models, kept units copied from their
model, the only-i <-> only-j blocks zero), :func:`~fastmerge.pleas.solve_least_squares_many`
fits it (method ``"pleas"``), and BatchNorm statistics are re-estimated.

**The budget with N models.** A layer between groups of ratios ``r_in``, ``r_out`` costs
``base * (1 + (N - 1)(r_in + r_out - r_in r_out))`` (the two-model formula is the case
N = 2), so the relative FLOPs :func:`relative_flops_many` are ``1 + (N - 1)(F_2 - 1)`` with
``F_2`` the two-model :func:`~fastmerge.pleas.relative_flops` of the same ratios: 1.0x is
one model (everything merged), N x is every model's units kept (the N-model ensemble's
cost). A budget ``b`` in [1, N] is therefore allocated as the two-model budget
``1 + (b - 1) / (N - 1)`` by :func:`~fastmerge.pleas.allocate`, which picks the same
ratios for N = 2.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ._common import _batch_list, _device_of, _first_input, _named_tensors, _to_device
from .allocation import _check_costs, allocate, layer_costs, relative_flops
from .groups import PermutationSpec, permutation_groups
from .least_squares_stage import recompute_batchnorm
from .matching import COST_KINDS
from .merging import _CONV, METHODS, _check_module, _owner, _rebuild
from .multi_layouts import MultiLayout, identity_multi_layouts, multi_layout
from .multi_least_squares import solve_least_squares_many
from .multi_matching import MultiMatch, _check_rounds, check_models, match_many

__all__ = ["merge_many", "merge_weights_many", "relative_flops_many"]


def relative_flops_many(
    costs: Mapping[str, Any], ratios: Mapping[str, float], n_models: int
) -> float:
    """Conv/Linear FLOPs of the N-model merge at ``ratios`` over one model's:
    ``1 + (N - 1)(F_2 - 1)``, ``F_2 = relative_flops(costs, ratios)`` (see the module
    documentation); for N = 2 exactly :func:`~fastmerge.pleas.relative_flops`.

    Example:
        >>> from fastmerge.pleas import LayerCost
        >>> costs = {"fc1": LayerCost(40.0, None, "h"), "fc2": LayerCost(10.0, "h", None)}
        >>> fastmerge.pleas.relative_flops_many(costs, {"h": 1.0}, 3)
        3.0
    """
    if isinstance(n_models, bool) or not isinstance(n_models, int) or n_models < 2:
        raise ValueError(f"n_models must be an int >= 2, got {n_models!r}")
    two = relative_flops(_check_costs(costs), ratios)
    return two if n_models == 2 else 1.0 + (n_models - 1) * (two - 1.0)


def _check_budget_many(budget: Any, n: int) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a real number in [1, {n}], got {budget!r}")
    b = float(budget)
    if not 1.0 <= b <= n:
        raise ValueError(
            f"budget must be in [1, {n}] for {n} models (relative Conv/Linear FLOPs: 1 = one "
            f"model, {n} = all {n}), got {budget!r}"
        )
    return b


# --------------------------------------------------------------------------------------------
# Merged weights


def _lift(t: torch.Tensor, dim: int, lay: MultiLayout, i: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = lay.width
    out = t.new_zeros(shape)
    nm, k = lay.n_merged, lay.n_kept
    out.narrow(dim, 0, nm).copy_(t.index_select(dim, lay.merged[i].to(t.device)))
    out.narrow(dim, nm + i * k, k).copy_(t.index_select(dim, lay.only[i].to(t.device)))
    return out


def _mean(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    total = ts[0]
    for t in ts[1:]:
        total = total + t
    return total / len(ts)


def _merge_tensor(
    ts: Sequence[torch.Tensor], first: torch.Tensor, roles: Mapping[int, tuple[str, MultiLayout]]
) -> torch.Tensor:
    if not first.is_floating_point():
        return first.clone()
    dev = first.device
    xs = [t.detach().to(dev) for t in ts]
    for dim, (role, lay) in roles.items():
        if role == "in":
            xs = [_lift(x, dim, lay, i) for i, x in enumerate(xs)]
    outs = [(dim, lay) for dim, (role, lay) in roles.items() if role == "out"]
    if not outs:
        return _mean(xs)
    (dim, lay), *_ = outs
    merged = _mean([x.index_select(dim, lay.merged[i].to(dev)) for i, x in enumerate(xs)])
    only = [x.index_select(dim, lay.only[i].to(dev)) for i, x in enumerate(xs)]
    return torch.cat([merged, *only], dim)


def merge_weights_many(
    models: Sequence[nn.Module],
    spec: PermutationSpec,
    layouts: Mapping[str, MultiLayout],
    *,
    reference: int = 0,
) -> nn.Module:
    """The merged model of N models for ``layouts`` (one
    :class:`~fastmerge.pleas.MultiLayout` per group of ``spec``) with the shared
    initialization: matched units averaged over the N models, kept units copied from their
    model, the only-i <-> only-j blocks zero; tensors outside the permuted groups averaged
    (integer buffers are the reference's). A deep copy of ``models[reference]`` with the
    widened modules replaced; the inputs are not modified. For N = 2 the tensors are bit
    for bit those of :func:`~fastmerge.pleas.merge_weights`.

    Raises:
        ValueError: fewer than 2 models, different architectures, a layout missing or not
            of its group's size or number of models.
        NotImplementedError: a permuted axis held by an unsupported module (named).

    Example:
        >>> from torch import nn
        >>> a = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> spec = fastmerge.pleas.permutation_groups(a, torch.randn(2, 4))
        >>> lay = fastmerge.pleas.MultiLayout(
        ...     "0", 3, torch.tensor([[0, 1]] * 3), torch.tensor([[2]] * 3))
        >>> merged = fastmerge.pleas.merge_weights_many([a, a, a], spec, {"0": lay})
        >>> merged[0].weight.shape  # 2 merged + 3 kept units
        torch.Size([5, 4])
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(merged(x), a(x), atol=1e-6)
        True
    """
    models = check_models(models, reference)
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    n = len(models)
    for name, g in spec.groups.items():
        lay = layouts.get(name)
        if lay is None:
            raise ValueError(f"layouts has no entry for group {name!r}")
        if not isinstance(lay, MultiLayout) or lay.size != g.size or lay.n_models != n:
            raise ValueError(
                f"layouts[{name!r}] must be a MultiLayout of {g.size} units for {n} models, "
                f"got {lay!r}"
            )
    base = models[reference]
    roles: dict[str, dict[int, tuple[str, MultiLayout]]] = {}
    owners: dict[str, nn.Module] = {}
    for gname, g in spec.groups.items():
        for axis in g.axes:
            mname, module = _owner(base, axis.name)
            _check_module(mname, module, axis.name, gname)
            owners[mname] = module
            is_input = type(module) in (nn.Linear,) + _CONV and axis.name.endswith("weight")
            role = "in" if is_input and axis.dim == 1 else "out"
            roles.setdefault(axis.name, {})[axis.dim] = (role, layouts[gname])
    tensors = [_named_tensors(m) for m in models]
    state = {
        name: _merge_tensor([ts[name] for ts in tensors], t, roles.get(name, {}))
        for name, t in tensors[reference].items()
    }
    merged = copy.deepcopy(base)
    replaced: dict[int, nn.Module] = {}
    for mname in owners:
        old = merged.get_submodule(mname)
        if id(old) not in replaced:
            prefix = mname + "."
            local = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            replaced[id(old)] = _rebuild(old, local)
        parent, _, child = mname.rpartition(".")
        setattr(merged.get_submodule(parent), child, replaced[id(old)])
    merged.load_state_dict({k: state[k] for k in merged.state_dict().keys()})
    return merged


# --------------------------------------------------------------------------------------------
# The entry point


def merge_many(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    *,
    method: str = "pleas",
    budget: float = 1.0,
    cost: str = "neg_sq_distance",
    allocation: Optional[str] = None,
    ridge: float = 1e-4,
    sequential: bool = False,
    data_free: bool = False,
    spec: Optional[PermutationSpec] = None,
    reset_bn: bool = True,
    reference: int = 0,
    rounds: int = 0,
    distributed: Optional[bool] = None,
) -> nn.Module:
    """Merge N >= 2 models of one architecture into one ``nn.Module`` whose Conv/Linear
    FLOPs are at most ``budget`` times one model's (``budget`` in [1, N]: 1 = one model,
    N = the N-model ensemble's cost).

    Methods and keywords are those of :func:`~fastmerge.pleas.merge` (``"pleas"``,
    ``"zipit"``, ``"permute"`` = full alignment then average at budget 1, ``"average"``),
    with the units of every model aligned to ``models[reference]`` by
    :func:`~fastmerge.pleas.match_many` (``rounds`` iterative rounds after that, each one
    more pass over ``data``). The per-group ratios ``r`` keep ``r d`` units of *every* model
    and merge the other ``(1 - r) d`` positions across all N models. ``spec`` defaults to
    :func:`~fastmerge.pleas.permutation_groups` of the reference on the first batch.
    ``merged.fastmerge_info`` is as for :func:`~fastmerge.pleas.merge` plus ``n_models``,
    ``reference`` and ``rounds``. For two models the merged model is bit for bit
    ``merge(models[0], models[1], data, ...)``'s.

    Raises:
        ValueError: fewer than 2 models, different architectures (naming the parameter and
            the model indices), ``budget`` outside [1, N] (or other than 1 for
            "average"/"permute"), ``reference`` out of range, empty ``data``, an unknown
            method, cost or allocation.
        NotImplementedError: a permuted group held by an unsupported module (named).

    Example:
        >>> from torch import nn
        >>> def mlp(seed):
        ...     _ = torch.manual_seed(seed)
        ...     return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).double()
        >>> data = [torch.randn(64, 4, dtype=torch.float64) for _ in range(2)]
        >>> merged = fastmerge.pleas.merge_many([mlp(0), mlp(1), mlp(2)], data, budget=2.0)
        >>> merged[0].weight.shape  # 8 merged units, 8 kept from each of the 3 models
        torch.Size([32, 4])
        >>> info = merged.fastmerge_info
        >>> info["ratios"], info["relative_flops"] <= 2.0, info["n_models"]
        ({'0': 0.5}, True, 3)
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if not isinstance(cost, str) or cost not in COST_KINDS:
        raise ValueError(f"cost must be one of {', '.join(map(repr, COST_KINDS))}, got {cost!r}")
    models = check_models(models, reference)
    rounds = _check_rounds(rounds)
    n = len(models)
    b = _check_budget_many(budget, n)
    if method in ("average", "permute") and b != 1.0:
        raise ValueError(
            f"method {method!r} makes a model of one model's size: budget must be 1.0, "
            f"got {budget!r}"
        )
    batches = _batch_list(data)
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("data is empty: it yielded no batches")
    base = models[reference]
    example = _to_device(_first_input(first), _device_of(base))
    if spec is None:
        spec = permutation_groups(base, example)
    elif not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    strategy = allocation
    if strategy is None:
        strategy = "stagewise" if method == "zipit" else "greedy"
    costs = layer_costs(base, spec, example)
    fits: dict[str, Any] = {}
    if method == "average":
        layouts = identity_multi_layouts(spec, n)
    else:
        matches = match_many(
            models, batches, spec, cost=cost, reference=reference, rounds=rounds,
            distributed=distributed,
        )  # fmt: skip
        two = 1.0 + (b - 1.0) / (n - 1)  # the two-model budget of the same ratios
        ratios: Union[dict[str, float], Mapping[str, float]] = (
            {g: 0.0 for g in spec.groups}
            if method == "permute" or b == 1.0
            else allocate(
                spec, costs, two, strategy, scores={g: m.group_match() for g, m in matches.items()}
            )
        )
        layouts = _layouts(matches, ratios)
    merged = merge_weights_many(models, spec, layouts, reference=reference)
    if method == "pleas":
        fits = solve_least_squares_many(
            merged, models, batches, spec, layouts, ridge=ridge, sequential=sequential,
            distributed=distributed,
        )  # fmt: skip
    if reset_bn:
        recompute_batchnorm(merged, batches, distributed=distributed)
    realized = {g: lay.ratio for g, lay in layouts.items()}
    merged.fastmerge_info = {
        "method": method,
        "budget": b,
        "allocation": strategy if method in ("pleas", "zipit") else None,
        "cost": cost if method != "average" else None,
        "ratios": realized,
        "widths": {g: lay.width for g, lay in layouts.items()},
        "relative_flops": relative_flops_many(costs, realized, n),
        "ridge": ridge if method == "pleas" else None,
        "sequential": bool(sequential) if method == "pleas" else None,
        "least_squares": fits,
        "data_free": bool(data_free),
        "n_models": n,
        "reference": reference,
        "rounds": rounds if method != "average" else None,
    }
    return merged


def _layouts(
    matches: Mapping[str, MultiMatch], ratios: Mapping[str, float]
) -> dict[str, MultiLayout]:
    return {g: multi_layout(m, ratios[g]) for g, m in matches.items()}
