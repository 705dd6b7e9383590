"""PLeaS compute budget: relative FLOPs of a partially merged model and per-group ratios.

A group of d units merged at ratio r (``k = r d`` units kept from both models) has width
``d + k``, laid out ``[merged | only-A | only-B]``. A dense Conv/Linear layer whose input
and output groups have ratios ``r_in`` and ``r_out`` then costs
``base * ((1 + r_in)(1 + r_out) - 2 r_in r_out)`` multiply-accumulates, because its only-A ->
only-B and only-B -> only-A blocks are zero. A side that is not permuted (the network input or
output, an excluded group) has ``r = 0``. A depthwise convolution (input group = output group,
one filter per channel) costs ``base * (1 + r)``.

**What 1.0x and 2.0x mean.** :func:`relative_flops` is the merged model's Conv/Linear cost over
one original model's. It is 1.0 when every ratio is 0 (one model's width) and, when every ratio
is 1, every layer with at least one permuted side costs exactly 2x: the first convolution reads
the shared input once but produces both models' channels (``1 + r_out``), the classifier reads
both models' features into one output (``1 + r_in``), and a layer between two groups runs both
models' blocks (``(1 + 1)(1 + 1) - 2 = 2``). So 2.0 is the cost of running both models side by
side (an output ensemble). Layers with *no* permuted side (e.g. attention projections between
excluded residual streams) are shared and stay at 1x whatever the ratios, so then the largest
reachable value is below 2.0: :func:`allocate` accepts budgets in [1, 2] and, for a budget
above the reachable maximum, returns every ratio 1 with a warning.

:func:`allocate` returns ratios that are multiples of each group's ``1/d`` (whole units), so
:func:`~fastmerge.pleas.partial_layout` realizes them exactly, and never exceeds the budget.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import nn

from ._common import _as_inputs
from .groups import PermutationSpec
from .matching import GroupMatch, _check_ratio

__all__ = ["STRATEGIES", "LayerCost", "allocate", "layer_costs", "relative_flops"]

STRATEGIES = ("uniform", "stagewise", "greedy")
_TOL = 1e-12

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class LayerCost(NamedTuple):
    """A Conv/Linear layer's multiply-accumulates per example and its input/output groups.

    ``input``/``output`` are group names, ``None`` for a side that is not permuted;
    ``depthwise`` marks a depthwise convolution (cost grows as ``1 + r``).

    Example:
        >>> from fastmerge.pleas import LayerCost
        >>> LayerCost(128.0, None, "fc1")
        LayerCost(flops=128.0, input=None, output='fc1', depthwise=False)
    """

    flops: float
    input: Optional[str]
    output: Optional[str]
    depthwise: bool = False


def _factor(c: LayerCost, r_in: float, r_out: float) -> float:
    if c.depthwise:
        return 1.0 + r_out
    return (1.0 + r_in) * (1.0 + r_out) - 2.0 * r_in * r_out


def _flops(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> float:
    if isinstance(module, nn.Linear):
        return float(module.in_features) * out.numel()
    k = math.prod(module.kernel_size)
    if isinstance(module, _TRANSPOSED):
        return float(x.numel()) * (module.out_channels // module.groups) * k
    return float(module.in_channels // module.groups) * k * out.numel()


def layer_costs(
    model: nn.Module, spec: PermutationSpec, example_input: Any
) -> dict[str, LayerCost]:
    """Per Conv/Linear layer of ``spec.layers``: its multiply-accumulates per example and its
    input/output groups.

    One forward pass on ``example_input`` (eval mode, no gradients, the model's flags
    restored) with hooks on every layer: Linear ``in * out`` per position, Conv
    ``C_in * C_out * prod(kernel) * prod(output spatial) / groups``; totals are divided by the
    batch size (the first dim of the first input) and summed over repeated calls. Layers that
    are not ``nn.Linear``/``nn.Conv*d`` modules (functional calls) are left out with a warning.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> spec = fastmerge.pleas.permutation_groups(model, torch.randn(3, 4))
        >>> costs = fastmerge.pleas.layer_costs(model, spec, torch.randn(3, 4))
        >>> costs["0"]
        LayerCost(flops=32.0, input=None, output='0', depthwise=False)
        >>> costs["2"]
        LayerCost(flops=16.0, input='0', output=None, depthwise=False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    inputs = _as_inputs(example_input)
    batch = int(inputs[0].shape[0]) if inputs[0].dim() > 0 else 1
    if batch < 1:
        raise ValueError("example_input must hold at least one example (its first dim is 0)")
    modules = dict(model.named_modules())
    flops: dict[str, float] = {}
    handles = []
    skipped = []

    def hook_for(name: str):
        def hook(m: nn.Module, args: tuple, out: Any) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                flops[name] += _flops(m, args[0], out)

        return hook

    for name in spec.layers:
        m = modules.get(name)
        if not isinstance(m, (nn.Linear,) + _CONVS + _TRANSPOSED):
            skipped.append(name)
            continue
        flops[name] = 0.0
        handles.append(m.register_forward_hook(hook_for(name)))
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    if skipped:
        warnings.warn(
            f"layer_costs: {skipped} are not nn.Linear/nn.Conv modules (functional calls?); "
            f"their FLOPs are not counted",
            RuntimeWarning,
            stacklevel=2,
        )
    out: dict[str, LayerCost] = {}
    for name, f in flops.items():
        m = modules[name]
        lg = spec.layers[name]
        depthwise = (
            isinstance(m, _CONVS) and m.groups > 1 and m.groups == m.in_channels
            and lg.input is not None and lg.input == lg.output
        )  # fmt: skip
        out[name] = LayerCost(f / batch, lg.input, lg.output, bool(depthwise))
    return out


def _check_costs(costs: Any) -> dict[str, LayerCost]:
    if not isinstance(costs, Mapping):
        raise TypeError(
            f"costs must be a mapping of layer name -> LayerCost (from layer_costs), "
            f"got {type(costs).__name__}"
        )
    out = {}
    for name, c in costs.items():
        if not isinstance(c, LayerCost):
            if isinstance(c, (tuple, list)) and len(c) in (3, 4):
                c = LayerCost(*c)
            else:
                raise TypeError(f"costs[{name!r}] must be a LayerCost, got {c!r}")
        f = float(c.flops)
        if not math.isfinite(f) or f < 0:
            raise ValueError(f"costs[{name!r}].flops must be finite and >= 0, got {c.flops}")
        out[name] = c
    if not out or sum(float(c.flops) for c in out.values()) <= 0:
        raise ValueError("costs hold no FLOPs (no Conv/Linear layer ran)")
    return out


def relative_flops(costs: Mapping[str, LayerCost], ratios: Mapping[str, float]) -> float:
    """Conv/Linear FLOPs of the merged model at ``ratios`` over one original model's.

    ``sum base * ((1 + r_in)(1 + r_out) - 2 r_in r_out) / sum base`` (``1 + r`` for a
    depthwise conv), ``r = 0`` for a non-permuted side or a group missing from ``ratios``;
    ratios of groups no layer touches are ignored. 1.0 at all ratios 0; at all ratios 1 every
    layer with a permuted side costs 2x and a layer with none 1x (see the module docs).

    Example:
        >>> from fastmerge.pleas import LayerCost
        >>> costs = {"fc1": LayerCost(40.0, None, "h"), "fc2": LayerCost(10.0, "h", None)}
        >>> fastmerge.pleas.relative_flops(costs, {"h": 0.5})
        1.5
    """
    checked = _check_costs(costs)
    if not isinstance(ratios, Mapping):
        raise TypeError(f"ratios must be a mapping of group -> ratio, got {type(ratios).__name__}")
    r = {g: _check_ratio(v, f"ratios[{g!r}]") for g, v in ratios.items()}
    total = sum(float(c.flops) for c in checked.values())
    merged = sum(
        float(c.flops) * _factor(c, r.get(c.input, 0.0), r.get(c.output, 0.0))
        for c in checked.values()
    )
    return merged / total


class _Budget:
    """Relative FLOPs as a function of per-group kept-unit counts, with cheap deltas."""

    def __init__(self, spec: PermutationSpec, costs: dict[str, LayerCost]):
        self.names = list(spec.groups)
        self.sizes = [spec.groups[n].size for n in self.names]
        index = {n: i for i, n in enumerate(self.names)}
        total = sum(float(c.flops) for c in costs.values())
        self.layers: list[tuple[float, int, int, LayerCost]] = []
        self.adj: list[list[int]] = [[] for _ in self.names]
        for lname, c in costs.items():
            for side in (c.input, c.output):
                if side is not None and side not in index:
                    raise ValueError(
                        f"costs[{lname!r}] refers to group {side!r}, which is not a group of "
                        f"spec; were costs and spec made for the same model?"
                    )
            gi = index[c.input] if c.input is not None else -1
            go = index[c.output] if c.output is not None else -1
            li = len(self.layers)
            self.layers.append((float(c.flops) / total, gi, go, c))
            for g in {gi, go} - {-1}:
                self.adj[g].append(li)
        self.k = [0] * len(self.names)

    def ratio(self, g: int, k: Optional[int] = None) -> float:
        d = self.sizes[g]
        return (self.k[g] if k is None else k) / d if d else 0.0

    def layer(self, li: int, g: int = -1, k: int = 0) -> float:
        w, gi, go, c = self.layers[li]
        r_in = 0.0 if gi < 0 else (k / self.sizes[gi] if gi == g else self.ratio(gi))
        r_out = 0.0 if go < 0 else (k / self.sizes[go] if go == g else self.ratio(go))
        return w * _factor(c, r_in, r_out)

    def value(self) -> float:
        return sum(self.layer(li) for li in range(len(self.layers)))

    def delta(self, g: int, k: int) -> float:
        """Change of the relative FLOPs when group g keeps k units instead of self.k[g]."""
        return sum(self.layer(li, g, k) - self.layer(li) for li in self.adj[g])

    def set_all(self, ks: Sequence[int]) -> float:
        self.k = list(ks)
        return self.value()

    def ratios(self) -> dict[str, float]:
        return {n: self.ratio(g) for g, n in enumerate(self.names)}


def _check_budget(budget: Any) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a real number in [1, 2], got {budget!r}")
    b = float(budget)
    if not 1.0 <= b <= 2.0:
        raise ValueError(
            f"budget must be in [1, 2] (relative Conv/Linear FLOPs: 1 = one model, 2 = both), "
            f"got {budget!r}"
        )
    return b


def _depth_order(spec: PermutationSpec) -> list[str]:
    """Groups by the position (in spec.layers, i.e. graph order) of their first producer."""
    pos = {name: i for i, name in enumerate(spec.layers)}
    end = len(pos)

    def depth(item: tuple[int, str]) -> tuple[int, int]:
        i, name = item
        g = spec.groups[name]
        ps = [pos[p] for p in g.producers if p in pos]
        cs = [pos[c] for c in g.consumers if c in pos]
        return (min(ps) if ps else (min(cs) if cs else end), i)

    return [n for _, n in sorted(enumerate(spec.groups), key=depth)]


def _benefits(spec: PermutationSpec, scores: Any) -> list[list[float]]:
    """Per group, the misalignment of the pairs in the order they are un-merged (worst
    aligned first)."""
    if scores is None:
        raise ValueError(
            "strategy='greedy' needs scores: the GroupMatch per group from fastmerge.pleas.match "
            "(or a 1-D tensor of per-pair misalignment per group)"
        )
    if not isinstance(scores, Mapping):
        raise TypeError(
            f"scores must be a mapping of group -> GroupMatch, got {type(scores).__name__}"
        )
    out = []
    for name, g in spec.groups.items():
        if name not in scores:
            raise ValueError(f"scores has no entry for group {name!r}")
        s = scores[name]
        if isinstance(s, GroupMatch):
            if s.size != g.size:
                raise ValueError(
                    f"scores[{name!r}] is a match of {s.size} units but the group has {g.size}"
                )
            seq = s.misalignment.detach().cpu().double()[s.order.cpu().flip(0)]
        else:
            t = torch.as_tensor(s).detach().cpu()
            if t.dim() != 1 or t.numel() != g.size or not t.is_floating_point():
                raise ValueError(
                    f"scores[{name!r}] must be a GroupMatch or a 1-D float tensor of "
                    f"{g.size} per-pair misalignments, got {type(s).__name__} of shape "
                    f"{tuple(t.shape)}"
                )
            seq = torch.sort(t.double(), descending=True, stable=True).values
        if not torch.isfinite(seq).all() or (seq < 0).any():
            raise ValueError(f"scores[{name!r}]: misalignments must be finite and >= 0")
        out.append(seq.tolist())
    return out


def allocate(
    spec: PermutationSpec,
    costs: Mapping[str, LayerCost],
    budget: float,
    strategy: str = "uniform",
    scores: Optional[Mapping[str, Any]] = None,
) -> dict[str, float]:
    """Per-group ratios ``r = k / d`` (units kept from both models) whose relative FLOPs
    (:func:`relative_flops`) do not exceed ``budget``.

    Strategies:

    * ``"uniform"``: one shared r for every group, each group keeping ``floor(r d)`` units;
      the largest r (searched by bisection over the values ``k / d`` where some group gains a
      unit) within the budget. One more step of r would exceed it.
    * ``"stagewise"`` (ZipIt-style): groups ordered by depth (their first producing layer);
      the latest groups are kept whole (r = 1) first, then one group partially, and the
      earlier groups are fully merged (r = 0). One more unit of the partial group would
      exceed the budget.
    * ``"greedy"``: needs ``scores``, the :class:`~fastmerge.pleas.GroupMatch` per group from
      :func:`~fastmerge.pleas.match` (or a 1-D tensor of per-pair misalignments per group).
      Starting from all merged, it repeatedly un-merges the next pair (worst aligned first) of
      the group with the largest misalignment per marginal FLOP, and stops at the first step
      that would exceed the budget; so the result is within that one unit of the budget, and
      every ratio grows with the budget.

    Every strategy's ratios grow with the budget. A budget of 1 gives all ratios 0; a budget
    above the largest reachable relative FLOPs (below 2 when some layer has no permuted side)
    gives all ratios 1 with a ``UserWarning``.

    Raises:
        ValueError: ``budget`` outside [1, 2], an unknown strategy, greedy without scores,
            costs that name groups the spec does not have.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
        ...                       nn.Linear(8, 2))
        >>> x = torch.randn(3, 4)
        >>> spec = fastmerge.pleas.permutation_groups(model, x)
        >>> costs = fastmerge.pleas.layer_costs(model, spec, x)
        >>> uniform = fastmerge.pleas.allocate(spec, costs, 1.5)
        >>> uniform, round(fastmerge.pleas.relative_flops(costs, uniform), 4)
        ({'0': 0.25, '2': 0.25}, 1.3571)
        >>> stagewise = fastmerge.pleas.allocate(spec, costs, 1.5, "stagewise")
        >>> stagewise, round(fastmerge.pleas.relative_flops(costs, stagewise), 4)
        ({'0': 0.0, '2': 0.625}, 1.4464)
    """
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(
            f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}"
        )
    b = _check_budget(budget)
    model = _Budget(spec, _check_costs(costs))
    benefits = _benefits(spec, scores) if strategy == "greedy" else None
    n = len(model.names)
    top = model.set_all(model.sizes)
    if b >= top - _TOL:
        if b > top + _TOL:
            warnings.warn(
                f"budget {b} is above the largest reachable relative FLOPs {top:.6g} (layers "
                f"with no permuted side stay at 1x); every group keeps all its units (r = 1)",
                UserWarning,
                stacklevel=2,
            )
        return model.ratios()
    model.set_all([0] * n)
    if strategy == "uniform":
        return _uniform(model, b)
    if strategy == "stagewise":
        return _stagewise(model, b, [model.names.index(g) for g in _depth_order(spec)])
    return _greedy(model, b, benefits)


def _uniform(model: _Budget, b: float) -> dict[str, float]:
    cands = sorted({k / d for d in model.sizes for k in range(d + 1)} | {0.0})

    def fits(r: float) -> bool:
        return model.set_all([math.floor(r * d + 1e-9) for d in model.sizes]) <= b + _TOL

    lo, hi = 0, len(cands) - 1  # cands[lo] fits (r = 0 costs 1.0); cands[hi] (r = 1) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(cands[mid]):
            lo = mid
        else:
            hi = mid
    fits(cands[lo])
    return model.ratios()


def _max_units(model: _Budget, g: int, b: float, base: float) -> int:
    lo, hi = model.k[g], model.sizes[g]  # lo fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if base + model.delta(g, mid) <= b + _TOL:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _stagewise(model: _Budget, b: float, order: list[int]) -> dict[str, float]:
    value = model.value()
    for g in reversed(order):
        k = _max_units(model, g, b, value)
        value += model.delta(g, k)
        model.k[g] = k
        if k < model.sizes[g]:
            break
    return model.ratios()


def _greedy(model: _Budget, b: float, benefits: list[list[float]]) -> dict[str, float]:
    value = model.value()
    n = len(model.names)
    neighbours = [
        sorted({x for li in model.adj[g] for x in model.layers[li][1:3]} - {-1}) for g in range(n)
    ]
    cache: list[Optional[float]] = [None] * n
    while True:
        best, best_prio, best_delta = -1, -math.inf, 0.0
        for g in range(n):
            k = model.k[g]
            if k >= model.sizes[g]:
                continue
            if cache[g] is None:
                cache[g] = model.delta(g, k + 1)
            delta = cache[g]
            prio = math.inf if delta <= 0 else benefits[g][k] / delta
            if prio > best_prio:
                best, best_prio, best_delta = g, prio, delta
        if best < 0 or value + best_delta > b + _TOL:
            break
        value += best_delta
        model.k[best] += 1
        for h in neighbours[best] + [best]:
            cache[h] = None
    return model.ratios()
