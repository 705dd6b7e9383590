"""Merged-model construction, the PLeaS merge and its baselines.

:func:`merge_weights` builds the merged model from per-group
:class:`~fastmerge.pleas.PartialLayout` s: a deep copy of ``model_a`` whose Conv/Linear,
BatchNorm and LayerNorm modules along every permuted group are replaced by modules of the
group's merged width ``d + k``, units ordered ``[merged | only-A | only-B]``. Its weights are
the initialization every method shares: matched units averaged, unmatched units copied from
their model, the only-A <-> only-B blocks zero. Precisely, each model's weights are first
*lifted* along their input axes (a's input columns go to the merged and only-A positions,
b's to the merged and only-B positions, zeros elsewhere), then along the output axis the
merged units average a's and b's lifted rows and the kept units copy them; a tensor with no
permuted output axis (the classifier, a layer between excluded groups) is the average of
the two lifted tensors, so a classifier at ratio 1 outputs the average logits.

:func:`merge` is the entry point: ``"average"`` (plain weight average), ``"permute"`` (Git
Re-Basin activation matching, then average), ``"zipit"`` (partial zipping with
stage-wise ratios: early groups merged, late groups kept per model, no least squares) and
``"pleas"`` (partial matching with per-group ratios, then :func:`solve_least_squares`).
BatchNorm statistics are re-estimated on the data at the end. :class:`Ensemble` is the 2x
reference.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from ._common import _batch_list, _device_of, _first_input, _named_tensors, _to_device
from .allocation import _check_budget, allocate, layer_costs, relative_flops
from .groups import PermutationSpec, permutation_groups
from .least_squares_stage import recompute_batchnorm, solve_least_squares
from .matching import (
    COST_KINDS,
    GroupMatch,
    PartialLayout,
    check_same_architecture,
    match,
    partial_layout,
)
from .weight_matching import weight_matching

__all__ = [
    "METHODS",
    "Ensemble",
    "identity_layouts",
    "layouts_for",
    "merge",
    "merge_weights",
]

METHODS = ("average", "permute", "zipit", "pleas")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def identity_layouts(spec: PermutationSpec) -> dict[str, PartialLayout]:
    """Every group fully merged with the identity matching (unit j of a with unit j of b).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> spec = fastmerge.pleas.permutation_groups(model, torch.randn(2, 4))
        >>> lay = fastmerge.pleas.identity_layouts(spec)["0"]
        >>> lay.merged_b.tolist(), lay.width
        ([0, 1, 2], 3)
    """
    empty = torch.zeros(0, dtype=torch.long)
    return {
        name: PartialLayout(name, g.size, torch.arange(g.size), torch.arange(g.size), empty, empty)
        for name, g in spec.groups.items()
    }


def layouts_for(
    matches: Mapping[str, GroupMatch], ratios: Union[float, Mapping[str, float]]
) -> dict[str, PartialLayout]:
    """:func:`~fastmerge.pleas.partial_layout` of every group: one ratio for all, or a ratio
    per group (as :func:`~fastmerge.pleas.allocate` returns).

    Example:
        >>> m = fastmerge.pleas.GroupMatch(
        ...     "g", 4, torch.tensor([2, 0, 3, 1]),
        ...     torch.tensor([-0.1, -0.9, -0.2, -0.5], dtype=torch.float64),
        ...     torch.zeros(4, dtype=torch.float64), torch.tensor([0, 2, 3, 1]))
        >>> fastmerge.pleas.layouts_for({"g": m}, {"g": 0.25})["g"].width
        5
    """
    if isinstance(ratios, Mapping):
        missing = [g for g in matches if g not in ratios]
        if missing:
            raise ValueError(f"ratios has no entry for group {missing[0]!r}")
        return {g: partial_layout(m, ratios[g]) for g, m in matches.items()}
    return {g: partial_layout(m, ratios) for g, m in matches.items()}


# --------------------------------------------------------------------------------------------
# Merged weights


def _owner(model: nn.Module, tensor_name: str) -> tuple[str, nn.Module]:
    mname = tensor_name.rpartition(".")[0]
    return mname, model.get_submodule(mname)


def _check_module(mname: str, module: nn.Module, axis_name: str, group: str) -> None:
    kind = type(module)
    ok = kind is nn.Linear or kind in _BN_TYPES
    if kind in _CONV:
        ok = module.groups == 1
    if kind is nn.LayerNorm:
        ok = len(module.normalized_shape) == 1
    if not ok:
        extra = f" with groups={module.groups}" if hasattr(module, "groups") else ""
        raise NotImplementedError(
            f"merging: module {mname!r} ({kind.__name__}{extra}) holds {axis_name!r}, an axis "
            f"of the permuted group {group!r}; only nn.Linear, nn.Conv1d/2d/3d (groups=1), "
            f"nn.BatchNorm1d/2d/3d and nn.LayerNorm over the last axis can be widened"
        )


def _lift(t: torch.Tensor, dim: int, lay: PartialLayout, side: str) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = lay.width
    out = t.new_zeros(shape)
    nm, k = lay.n_merged, lay.n_kept
    merged = lay.merged_a if side == "a" else lay.merged_b
    only = lay.only_a if side == "a" else lay.only_b
    start = nm if side == "a" else nm + k
    out.narrow(dim, 0, nm).copy_(t.index_select(dim, merged.to(t.device)))
    out.narrow(dim, start, k).copy_(t.index_select(dim, only.to(t.device)))
    return out


def _merge_tensor(
    ta: torch.Tensor, tb: torch.Tensor, roles: Mapping[int, tuple[str, PartialLayout]]
) -> torch.Tensor:
    if not ta.is_floating_point():
        return ta.clone()
    a, b = ta.detach(), tb.detach().to(ta.device)
    for dim, (role, lay) in roles.items():
        if role == "in":
            a, b = _lift(a, dim, lay, "a"), _lift(b, dim, lay, "b")
    outs = [(dim, lay) for dim, (role, lay) in roles.items() if role == "out"]
    if not outs:
        return 0.5 * (a + b)
    (dim, lay), *_ = outs
    dev = a.device
    merged = 0.5 * (
        a.index_select(dim, lay.merged_a.to(dev)) + b.index_select(dim, lay.merged_b.to(dev))
    )
    return torch.cat(
        [merged, a.index_select(dim, lay.only_a.to(dev)), b.index_select(dim, lay.only_b.to(dev))],
        dim,
    )


def _rebuild(module: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    ref = next(itertools.chain(module.parameters(), module.buffers()), None)
    kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    if type(module) is nn.Linear:
        out, inp = state["weight"].shape
        new = nn.Linear(inp, out, bias=module.bias is not None, **kw)
    elif type(module) in _CONV:
        w = state["weight"]
        new = type(module)(
            w.shape[1], w.shape[0], module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, module.bias is not None, module.padding_mode, **kw,
        )  # fmt: skip
    elif type(module) in _BN_TYPES:
        n = (state.get("weight") if "weight" in state else state["running_mean"]).shape[0]
        new = type(module)(
            n, module.eps, module.momentum, module.affine, module.track_running_stats, **kw
        )
    else:  # nn.LayerNorm
        n = state["weight"].shape[0] if "weight" in state else None
        if n is None:
            raise NotImplementedError(
                "merging: a LayerNorm without elementwise_affine in a permuted group cannot be "
                "widened from its parameters"
            )
        new = nn.LayerNorm(
            (n,), module.eps, module.elementwise_affine, module.bias is not None, **kw
        )
    new.train(module.training)
    return new


def merge_weights(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    layouts: Mapping[str, PartialLayout],
) -> nn.Module:
    """The merged model of ``layouts`` (one :class:`~fastmerge.pleas.PartialLayout` per
    group of ``spec``) with the shared initialization: matched units averaged, unmatched
    units copied from their model, the only-A <-> only-B blocks zero (see the module
    documentation). Tensors outside the permuted groups are averaged (integer buffers such
    as ``num_batches_tracked`` are model a's). The inputs are not modified; the result is a
    deep copy of ``model_a`` with the widened modules replaced.

    Raises:
        ValueError: different architectures, a layout missing or not of its group's size.
        NotImplementedError: a permuted axis held by a module other than Linear, Conv (groups
            = 1), BatchNorm or LayerNorm (over one axis), naming the module.

    Example:
        >>> from torch import nn
        >>> a = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> spec = fastmerge.pleas.permutation_groups(a, torch.randn(2, 4))
        >>> lay = fastmerge.pleas.PartialLayout(
        ...     "0", 3, torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([2]),
        ...     torch.tensor([2]))
        >>> merged = fastmerge.pleas.merge_weights(a, a, spec, {"0": lay})
        >>> merged[0].weight.shape, merged[2].weight.shape  # width 3 + 1 kept unit
        (torch.Size([4, 4]), torch.Size([2, 4]))
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(merged(x), a(x), atol=1e-6)  # a with itself: the same function
        True
    """
    check_same_architecture(model_a, model_b)
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    for name, g in spec.groups.items():
        lay = layouts.get(name)
        if lay is None:
            raise ValueError(f"layouts has no entry for group {name!r}")
        if not isinstance(lay, PartialLayout) or lay.size != g.size:
            raise ValueError(
                f"layouts[{name!r}] must be a PartialLayout of {g.size} units, got {lay!r}"
            )
    roles: dict[str, dict[int, tuple[str, PartialLayout]]] = {}
    owners: dict[str, tuple[str, nn.Module]] = {}
    for gname, g in spec.groups.items():
        for axis in g.axes:
            mname, module = _owner(model_a, axis.name)
            _check_module(mname, module, axis.name, gname)
            owners[mname] = (mname, module)
            is_input = type(module) in (nn.Linear,) + _CONV and axis.name.endswith("weight")
            role = "in" if is_input and axis.dim == 1 else "out"
            roles.setdefault(axis.name, {})[axis.dim] = (role, layouts[gname])
    ta, tb = _named_tensors(model_a), _named_tensors(model_b)
    state = {name: _merge_tensor(t, tb[name], roles.get(name, {})) for name, t in ta.items()}
    merged = copy.deepcopy(model_a)
    replaced: dict[int, nn.Module] = {}
    for mname in owners:
        old = merged.get_submodule(mname)
        if id(old) not in replaced:
            prefix = mname + "."
            local = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            replaced[id(old)] = _rebuild(old, local)
        parent, _, child = mname.rpartition(".")
        setattr(merged.get_submodule(parent), child, replaced[id(old)])
    keys = merged.state_dict().keys()
    merged.load_state_dict({k: state[k] for k in keys})
    return merged


# --------------------------------------------------------------------------------------------
# The entry point


def merge(
    model_a: nn.Module,
    model_b: nn.Module,
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
    distributed: Optional[bool] = None,
    align: str = "activations",
) -> nn.Module:
    """Merge two models of the same architecture into one ordinary ``nn.Module`` whose
    Conv/Linear FLOPs are at most ``budget`` times one model's.

    Methods (all through :func:`merge_weights`; BatchNorm statistics re-estimated on ``data``
    at the end unless ``reset_bn=False``):

    * ``"pleas"`` (default): :func:`~fastmerge.pleas.match` the units on ``data`` with
      ``cost``, :func:`~fastmerge.pleas.allocate` per-group ratios for ``budget`` with
      ``allocation`` (default ``"greedy"``; at budget 1 every ratio is 0), build the merged
      model and fit every Conv/Linear layer by :func:`solve_least_squares` (``ridge``,
      ``sequential``);
    * ``"zipit"``: the same matching, ``"stagewise"`` ratios by default (early groups merged,
      late ones kept per model), no least squares;
    * ``"permute"``: full matching (budget 1 only), b's matched units averaged with a's;
      ``align="weights"`` matches the weights instead of the activations
      (:func:`~fastmerge.pleas.weight_matching`, Git Re-Basin's data-free matching; ``data``
      then only traces the model and re-estimates the BatchNorm statistics);
    * ``"average"``: the plain weight average (budget 1 only; ``data`` only for BatchNorm).

    ``data`` is any iterable of input batches (or of ``(input, target, ...)`` tuples); an
    iterator is read once into a list since the data is passed over several times.
    ``data_free=True`` states that ``data`` comes from another distribution than the models'
    training data (PLeaS' data-free variant); it changes no computation and is recorded in
    ``merged.fastmerge_info`` (a dict with the method, budget, ratios, realized relative
    FLOPs, per-layer least-squares fits and ``data_free``). The input models are not
    modified. ``spec`` defaults to :func:`~fastmerge.pleas.permutation_groups` of ``model_a``
    on the first batch.

    Under torch.distributed (``distributed``, default: when a process group of more than
    one rank is initialized), each rank passes its own shard of ``data`` (at least one
    batch) and every statistic is summed over the ranks (:mod:`fastmerge.dist`): every
    rank returns the same merged model, that of all shards' data.

    Raises:
        ValueError: different architectures or parameter shapes (naming the first), budget
            outside [1, 2] (or other than 1 for "average"/"permute"), empty ``data``, an
            unknown method, cost, allocation or align (``"weights"`` with another method
            than ``"permute"``).
        NotImplementedError: a permuted group held by an unsupported module (named).

    Example:
        >>> from torch import nn
        >>> def mlp(seed):
        ...     _ = torch.manual_seed(seed)
        ...     return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).double()
        >>> a, b = mlp(0), mlp(1)
        >>> data = [torch.randn(64, 4, dtype=torch.float64) for _ in range(4)]
        >>> merged = fastmerge.pleas.merge(a, b, data, budget=1.5)
        >>> merged[0].weight.shape  # 16 units, 8 of them kept from both models
        torch.Size([24, 4])
        >>> info = merged.fastmerge_info
        >>> info["method"], info["ratios"], info["relative_flops"] <= 1.5
        ('pleas', {'0': 0.5}, True)
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if not isinstance(cost, str) or cost not in COST_KINDS:
        raise ValueError(f"cost must be one of {', '.join(map(repr, COST_KINDS))}, got {cost!r}")
    if align not in ("activations", "weights"):
        raise ValueError(f"align must be 'activations' or 'weights', got {align!r}")
    if align == "weights" and method != "permute":
        raise ValueError(f"align='weights' needs method='permute', got method={method!r}")
    check_same_architecture(model_a, model_b)
    b = _check_budget(budget)
    if method in ("average", "permute") and b != 1.0:
        raise ValueError(
            f"method {method!r} makes a model of one model's size: budget must be 1.0, "
            f"got {budget!r}"
        )
    batches = _batch_list(data)
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("data is empty: it yielded no batches")
    example = _to_device(_first_input(first), _device_of(model_a))
    if spec is None:
        spec = permutation_groups(model_a, example)
    elif not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    strategy = allocation
    if strategy is None:
        strategy = "stagewise" if method == "zipit" else "greedy"
    costs = layer_costs(model_a, spec, example)
    fits: dict[str, Any] = {}
    if method == "average":
        layouts = identity_layouts(spec)
    elif align == "weights":
        layouts = weight_matching(model_a, model_b, spec=spec).layouts()
    else:
        matches = match(model_a, model_b, batches, spec, cost=cost, distributed=distributed)
        ratios = (
            {g: 0.0 for g in spec.groups}
            if method == "permute" or b == 1.0
            else allocate(spec, costs, b, strategy, scores=matches)
        )
        layouts = layouts_for(matches, ratios)
    merged = merge_weights(model_a, model_b, spec, layouts)
    if method == "pleas":
        fits = solve_least_squares(
            merged,
            model_a,
            model_b,
            batches,
            spec,
            layouts,
            ridge=ridge,
            sequential=sequential,
            distributed=distributed,
        )
    if reset_bn:
        recompute_batchnorm(merged, batches, distributed=distributed)
    realized = {g: lay.ratio for g, lay in layouts.items()}
    merged.fastmerge_info = {
        "method": method,
        "budget": b,
        "allocation": strategy if method in ("pleas", "zipit") else None,
        "cost": cost if method != "average" and align == "activations" else None,
        "align": align if method == "permute" else None,
        "ratios": realized,
        "widths": {g: lay.width for g, lay in layouts.items()},
        "relative_flops": relative_flops(costs, realized),
        "ridge": ridge if method == "pleas" else None,
        "sequential": bool(sequential) if method == "pleas" else None,
        "least_squares": fits,
        "data_free": bool(data_free),
    }
    return merged


class Ensemble(nn.Module):
    """The N x reference: the average of the models' outputs, ``(a(x) + b(x)) / 2`` for two
    models, ``(m_0(x) + ... + m_{N-1}(x)) / N`` for ``Ensemble(m_0, ..., m_{N-1})``.

    Holds the models themselves (not copies): ``model_a``, ``model_b`` and the further ones
    in ``others`` (an ``nn.ModuleList``, empty for two models).

    Example:
        >>> from torch import nn
        >>> a, b, c = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(fastmerge.pleas.Ensemble(a, b)(x), (a(x) + b(x)) / 2)
        True
        >>> torch.allclose(fastmerge.pleas.Ensemble(a, b, c)(x), (a(x) + b(x) + c(x)) / 3)
        True
    """

    def __init__(self, model_a: nn.Module, model_b: nn.Module, *others: nn.Module) -> None:
        super().__init__()
        self.model_a = model_a
        self.model_b = model_b
        self.others = nn.ModuleList(others)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Average of the models' outputs (tensors)."""
        total = self.model_a(*args, **kwargs) + self.model_b(*args, **kwargs)
        if not len(self.others):
            return 0.5 * total
        for m in self.others:
            total = total + m(*args, **kwargs)
        return total / (2 + len(self.others))
