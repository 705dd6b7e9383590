"""PLeaS step 1: activation matching of two models' units, group by group.

:func:`collect_features` streams both models' activations into one
:class:`~fastmerge.FeatureStats` per permutation group, summed over every batch. :func:`match`
turns them into cost matrices and solves every group's linear assignment (one batched
:func:`fastmerge.linear_assignment` call per distinct group size), giving a
:class:`GroupMatch` per group: which unit of model b goes with each unit of model a, how well
each pair is aligned, and the pairs from best to worst aligned. :func:`partial_layout` turns a
match and a ratio ``r`` into PLeaS' partial merge: the best-aligned ``d - k`` pairs are merged
and the worst ``k = r d`` units are kept from both models, in the order
``[merged | only-A | only-B]``.

**Where activations are captured.** A group's units are read at the *input of every
Conv/Linear layer that consumes the group* (a forward pre-hook on the layer): that is what the
next layer sees, after the nonlinearity, the norm, pooling and (in a ResNet stage) the
residual sum. A ResNet stage is one group consumed by every block's first conv (and the next
stage's downsample, or the classifier), so its statistics sum over all those points, as the
PLeaS reference sums over every node of the group. The channel axis is the last one for a
``Linear`` input and dim 1 of ``(N, C, *spatial)`` for a convolution. A group with no
consuming ``nn.Module`` layer (its consumers are functional calls) is read at the *output* of
its producing layers instead (before any norm/nonlinearity); a group with neither raises
``ValueError``. All capture points of a group feed the same ``FeatureStats``, so every cost is
a mean over all samples of all capture points (spatial positions count as samples).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from ..dist import all_reduce_values, should_reduce
from ..features import FeatureStats
from ..ops.linear_assignment import linear_assignment
from ._common import _call, _device_of, _first_input, _named_tensors, _to_device
from .groups import PermutationSpec, permutation_groups

__all__ = [
    "COST_KINDS",
    "GroupMatch",
    "PartialLayout",
    "collect_features",
    "match",
    "partial_layout",
]

COST_KINDS = ("neg_sq_distance", "correlation", "covariance", "inner_product")

_CONVS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


# --------------------------------------------------------------------------------------------
# Input checks


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """Raise ``ValueError`` naming the first parameter/buffer that differs in name or shape
    (or a module whose type differs).

    Example:
        >>> from torch import nn
        >>> from fastmerge.pleas.matching import check_same_architecture
        >>> check_same_architecture(nn.Linear(4, 3), nn.Linear(4, 2))
        Traceback (most recent call last):
        ...
        ValueError: model_a and model_b have different parameter shapes: 'weight' is (3, 4) \
in model_a and (2, 4) in model_b
    """
    for name, m in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
    ta, tb = _named_tensors(model_a), _named_tensors(model_b)
    for name, t in ta.items():
        if name not in tb:
            raise ValueError(
                f"model_a and model_b have different architectures: model_b has no "
                f"parameter or buffer {name!r}"
            )
        if tuple(t.shape) != tuple(tb[name].shape):
            raise ValueError(
                f"model_a and model_b have different parameter shapes: {name!r} is "
                f"{tuple(t.shape)} in model_a and {tuple(tb[name].shape)} in model_b"
            )
    for name in tb:
        if name not in ta:
            raise ValueError(
                f"model_a and model_b have different architectures: model_a has no "
                f"parameter or buffer {name!r}"
            )
    mods_b = dict(model_b.named_modules())
    for name, m in model_a.named_modules():
        if name in mods_b and type(mods_b[name]) is not type(m):
            raise ValueError(
                f"model_a and model_b have different architectures: module {name!r} is a "
                f"{type(m).__name__} in model_a and a {type(mods_b[name]).__name__} in model_b"
            )


def _check_spec(spec: Any) -> PermutationSpec:
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    return spec


def _check_spec_fits(model: nn.Module, spec: PermutationSpec) -> None:
    tensors = _named_tensors(model)
    for g in spec.groups.values():
        for axis in g.axes:
            t = tensors.get(axis.name)
            if t is None or t.dim() <= axis.dim or t.shape[axis.dim] != g.size:
                raise ValueError(
                    f"spec group {g.name!r} does not fit the model: {axis.name!r} has no axis "
                    f"{axis.dim} of size {g.size}; was the spec made for this model?"
                )


def _check_max_batches(max_batches: Optional[int]) -> None:
    if max_batches is None:
        return
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")


def _batches(data: Any) -> Iterator[Any]:
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be an iterable of input batches (or of (input, target) tuples), got "
            f"{type(data).__name__}; wrap a single batch in a list: [x]"
        )
    return iter(data)


# --------------------------------------------------------------------------------------------
# Capture points


def _channel_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(samples, units) view of a Linear/Conv input or output (channel axis moved last)."""
    x = x.detach()
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    k = len(module.kernel_size)
    c = x.dim() - k - 1
    return x.movedim(c, -1).reshape(-1, x.shape[c])


def _capture_points(model: nn.Module, spec: PermutationSpec) -> dict[str, list[tuple[str, str]]]:
    """Per group, its capture points ``(module name, "in" | "out")``."""
    modules = dict(model.named_modules())

    def hookable(name: str) -> bool:
        return isinstance(modules.get(name), (nn.Linear,) + _CONVS)

    points: dict[str, list[tuple[str, str]]] = {}
    for g in spec.groups.values():
        where = [(c, "in") for c in g.consumers if hookable(c)]
        if not where:
            where = [(p, "out") for p in g.producers if hookable(p)]
        if not where:
            raise ValueError(
                f"group {g.name!r} has no Conv/Linear module among its consumers "
                f"{list(g.consumers)} or producers {list(g.producers)} whose activations "
                f"could be captured"
            )
        points[g.name] = where
    return points


def collect_features(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    spec: PermutationSpec,
    *,
    full: bool = False,
    max_batches: Optional[int] = None,
    distributed: Optional[bool] = None,
) -> dict[str, FeatureStats]:
    """Stream both models' activations into one :class:`~fastmerge.FeatureStats` per group.

    Every batch of ``data`` (input batches, or tuples whose first element is the input; a
    tuple/list input is passed as positional arguments) runs through ``model_a`` and
    ``model_b``, in eval mode and without gradients (their training flags are restored
    afterwards). A group's units are read at the input of each Conv/Linear layer consuming it
    (see the module documentation), and the statistics are summed over all batches and all
    capture points. Inputs are moved to each model's device; model b's activations to
    model a's.

    Args:
        model_a, model_b: two models of the same architecture (same parameter names and
            shapes); ``spec`` must be a spec of this architecture.
        data: iterable of batches; at most ``max_batches`` of them are used.
        spec: the permutation groups, e.g. from :func:`permutation_groups`.
        full: accumulate the within-model blocks too (``FeatureStats(full=True)``).
        distributed: sum the statistics over the ranks of the torch.distributed process
            group (each rank passes its own shard of the data; every rank gets the
            statistics of all shards, see :mod:`fastmerge.dist`); ``None``: when a group
            of more than one rank is initialized. A rank may then have no batches.

    Raises:
        ValueError: different architectures (naming the first mismatching parameter),
            ``data`` without batches (on every rank, when distributed), a group with no
            capture point or no activations.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> spec = fastmerge.pleas.permutation_groups(model, torch.randn(3, 4))
        >>> data = [torch.randn(16, 4) for _ in range(3)]
        >>> stats = fastmerge.pleas.collect_features(model, model, data, spec)
        >>> stats["0"].count, tuple(stats["0"].correlation().shape)
        (48, (8, 8))
    """
    check_same_architecture(model_a, model_b)
    spec = _check_spec(spec)
    _check_spec_fits(model_a, spec)
    _check_max_batches(max_batches)
    reduce = should_reduce(distributed)
    batches = _batches(data)
    points = _capture_points(model_a, spec)
    stats = {name: FeatureStats(full=full) for name in points}
    group_of = {(m, side): g for g, where in points.items() for m, side in where}
    pending: dict[tuple[str, str], deque] = {key: deque() for key in group_of}

    phase = ["a"]  # which model is running; one hook per module serves both models

    def hook_for(key: tuple[str, str], module: nn.Module):
        def capture(x: Any) -> None:
            if not isinstance(x, torch.Tensor):
                return
            xm = _channel_matrix(module, x)
            if phase[0] == "a":
                # Held until model b has run: copy it so later in-place ops cannot change it.
                if xm.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                    xm = xm.clone()
                pending[key].append(xm)
                return
            if not pending[key]:
                raise ValueError(
                    f"model_b called {key[0]!r} more often than model_a on the same batch; "
                    f"the two models do not have the same architecture"
                )
            xa = pending[key].popleft()
            stats[group_of[key]].update(xa, xm.to(xa.device))

        if key[1] == "in":

            def pre(_m, args, kwargs):
                capture(args[0] if args else kwargs.get("input"))

            return pre
        return lambda _m, _args, out: capture(out)

    handles = []
    flags = [(m, m.training) for m in itertools.chain(model_a.modules(), model_b.modules())]
    try:
        hooked: set[tuple[int, str]] = set()
        for model in (model_a, model_b):
            modules = dict(model.named_modules())
            for key in group_of:
                m = modules[key[0]]
                if (id(m), key[1]) in hooked:  # the same module object in both models
                    continue
                hooked.add((id(m), key[1]))
                hook = hook_for(key, m)
                if key[1] == "in":
                    handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    handles.append(m.register_forward_hook(hook))
        model_a.eval()
        model_b.eval()
        dev_a, dev_b = _device_of(model_a), _device_of(model_b)
        n_batches = 0
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and n_batches >= max_batches:
                    break
                x = _first_input(batch)
                phase[0] = "a"
                _call(model_a, _to_device(x, dev_a))
                phase[0] = "b"
                _call(model_b, _to_device(x, dev_b))
                left = [key for key, q in pending.items() if q]
                if left:
                    raise ValueError(
                        f"model_a called {left[0][0]!r} more often than model_b on the same "
                        f"batch; the two models do not have the same architecture"
                    )
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
        for q in pending.values():
            q.clear()
    if reduce:  # every rank reaches the collectives, then all raise alike
        (n_batches,) = all_reduce_values([n_batches])
        for s in stats.values():  # the same groups in the same order on every rank
            s.all_reduce()
    if n_batches == 0:
        raise ValueError("data is empty: it yielded no batches")
    for name, s in stats.items():
        if s.count == 0:
            where = ", ".join(
                f"{m} ({'input' if side == 'in' else 'output'})" for m, side in points[name]
            )
            raise ValueError(
                f"group {name!r} saw no activations: none of its capture points ({where}) "
                f"ran on the data"
            )
    return stats


# --------------------------------------------------------------------------------------------
# Matching


@dataclass(frozen=True)
class GroupMatch:
    """The unit matching of one permutation group of ``size`` d units.

    * ``perm_b``: (d,) int64, model a's unit ``j`` is matched with model b's unit
      ``perm_b[j]`` (as in Git Re-Basin: ``apply_permutation(model_b, spec, {name: perm_b})``
      reorders b's units like a's);
    * ``score``: (d,) float64, the similarity (the matching's cost kind, higher is better) of
      each pair ``(j, perm_b[j])``;
    * ``misalignment``: (d,) float64, a scale-free badness of each pair that is comparable
      across groups: ``E[((a_j - mu) - (b_k - nu))^2]`` (the centred squared distance) over
      the group's mean unit variance ``(sum var(a) + sum var(b)) / d``; 0 for identical
      units, about 1 for independent ones, 2 for opposite ones (0 for all when the group's
      units are constant). The ``"greedy"`` allocator spends its budget by it;
    * ``order``: (d,) int64, the pairs (indices ``j``) from best to worst aligned by
      ``score`` (ties: lower ``j`` first);
    * ``cost``: the cost kind used.

    Example:
        >>> m = fastmerge.pleas.GroupMatch(
        ...     "fc1", 2, torch.tensor([1, 0]), torch.tensor([-0.5, -0.1], dtype=torch.float64),
        ...     torch.tensor([0.4, 0.1], dtype=torch.float64), torch.tensor([1, 0]))
        >>> m.order.tolist(), m.cost
        ([1, 0], 'neg_sq_distance')
    """

    name: str
    size: int
    perm_b: torch.Tensor
    score: torch.Tensor
    misalignment: torch.Tensor
    order: torch.Tensor
    cost: str = "neg_sq_distance"


def _pair_misalignment(stats: FeatureStats, perm_b: torch.Tensor) -> torch.Tensor:
    d = perm_b.numel()
    rows = torch.arange(d, device=perm_b.device)
    cov = stats.covariance()[rows, perm_b]
    dist = -stats.neg_sq_distance()[rows, perm_b]  # E[(a - b)^2]
    mean_gap = (stats.mean_a.to(dist) - stats.mean_b.to(dist)[perm_b]) ** 2
    centred = (dist - mean_gap).clamp_min(0.0)  # var_a + var_b - 2 cov
    total_var = (centred + 2 * cov).sum()  # sum var_a + sum var_b: the same for every pairing
    if not torch.isfinite(total_var) or total_var <= 0:
        return torch.zeros(d, dtype=torch.float64, device=perm_b.device)
    return centred / (total_var / d)


def match(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    spec: Optional[PermutationSpec] = None,
    *,
    cost: str = "neg_sq_distance",
    example_input: Any = None,
    max_batches: Optional[int] = None,
    distributed: Optional[bool] = None,
) -> dict[str, GroupMatch]:
    """Match the units of ``model_b`` to those of ``model_a``, every permutation group.

    Collects activations with :func:`collect_features`, builds each group's (d, d)
    similarity matrix of kind ``cost`` (``"neg_sq_distance"``, the PLeaS default
    ``-E[(a_i - b_j)^2]``; ``"correlation"``; ``"covariance"``; ``"inner_product"``; all are
    maximized) and solves all groups exactly with :func:`fastmerge.linear_assignment`, one
    batched call per distinct group size.

    Args:
        model_a, model_b: two models of the same architecture.
        data: iterable of input batches or of ``(input, target, ...)`` tuples; the costs are
            summed over every batch (up to ``max_batches``).
        spec: the groups; default ``permutation_groups(model_a, example_input)``.
        cost: the similarity to maximize.
        example_input: input for tracing when ``spec`` is None; default: the first batch.
        distributed: match on the data of every rank of the torch.distributed process
            group, each rank passing its own shard (see :func:`collect_features`); every
            rank gets the same matching. ``None``: when a group of more than one rank is
            initialized. Without ``spec``, every rank needs at least one batch.

    Returns:
        ``{group name: GroupMatch}`` in the spec's group order.

    Raises:
        ValueError: different architectures (naming the first mismatching parameter),
            empty ``data``, an unknown ``cost``.

    Example:
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
        >>> spec = fastmerge.pleas.permutation_groups(model, torch.randn(2, 4).double())
        >>> perm = {"0": torch.tensor([3, 0, 5, 1, 4, 2])}
        >>> model_b = fastmerge.pleas.apply_permutation(model, spec, perm)  # b's k = a's perm[k]
        >>> data = [torch.randn(64, 4, dtype=torch.float64) for _ in range(2)]
        >>> m = fastmerge.pleas.match(model, model_b, data, spec)["0"]
        >>> m.perm_b.tolist(), torch.argsort(perm["0"]).tolist()  # a's unit j is b's perm_b[j]
        ([1, 3, 5, 0, 4, 2], [1, 3, 5, 0, 4, 2])
        >>> m.misalignment.abs().max().item() < 1e-9
        True
    """
    if not isinstance(cost, str) or cost not in COST_KINDS:
        raise ValueError(f"cost must be one of {', '.join(map(repr, COST_KINDS))}, got {cost!r}")
    check_same_architecture(model_a, model_b)
    batches = _batches(data)
    if spec is None:
        try:
            first = next(batches)
        except StopIteration:
            raise ValueError("data is empty: it yielded no batches") from None
        batches = itertools.chain([first], batches)
        if example_input is None:
            example_input = _first_input(first)
        example_input = _to_device(example_input, _device_of(model_a))
        spec = permutation_groups(model_a, example_input)
    spec = _check_spec(spec)
    stats = collect_features(
        model_a, model_b, batches, spec, max_batches=max_batches, distributed=distributed
    )
    return _solve(stats, cost)


def _solve(stats: Mapping[str, FeatureStats], cost: str) -> dict[str, GroupMatch]:
    costs = {name: s.cost(cost) for name, s in stats.items()}
    by_size: dict[int, list[str]] = {}
    for name, c in costs.items():
        by_size.setdefault(int(c.shape[0]), []).append(name)
    perms: dict[str, torch.Tensor] = {}
    for names in by_size.values():
        batch = torch.stack([costs[n] for n in names])
        bad = [n for n in names if not torch.isfinite(costs[n]).all()]
        if bad:
            raise ValueError(
                f"the {cost} costs of group {bad[0]!r} are not finite (NaN or inf activations?)"
            )
        _, cols = linear_assignment(batch, maximize=True)
        for n, c in zip(names, cols):
            perms[n] = c
    out: dict[str, GroupMatch] = {}
    for name, s in stats.items():
        c, perm_b = costs[name], perms[name].to(costs[name].device)
        d = perm_b.numel()
        score = c[torch.arange(d, device=c.device), perm_b]
        # Best first; a stable sort keeps lower unit indices first among equal scores.
        order = torch.sort(-score.cpu(), stable=True).indices
        out[name] = GroupMatch(
            name=name,
            size=d,
            perm_b=perm_b.cpu(),
            score=score.cpu(),
            misalignment=_pair_misalignment(s, perm_b).cpu(),
            order=order,
            cost=cost,
        )
    return out


# --------------------------------------------------------------------------------------------
# Partial matching


@dataclass(frozen=True)
class PartialLayout:
    """One group's partial merge: ``width = size + n_kept`` units ordered
    ``[merged | only-A | only-B]``.

    * ``merged_a``/``merged_b``: (size - n_kept,) units of a and of b merged pairwise
      (``merged_b[i] = perm_b[merged_a[i]]``), ``merged_a`` ascending;
    * ``only_a``/``only_b``: (n_kept,) units kept from a alone and from b alone, ascending.

    Example:
        >>> layout = fastmerge.pleas.PartialLayout(
        ...     "g", 3, torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([1]),
        ...     torch.tensor([2]))
        >>> layout.width, layout.n_kept, layout.ratio
        (4, 1, 0.3333333333333333)
    """

    name: str
    size: int
    merged_a: torch.Tensor
    merged_b: torch.Tensor
    only_a: torch.Tensor
    only_b: torch.Tensor

    @property
    def n_merged(self) -> int:
        """Number of merged pairs."""
        return int(self.merged_a.numel())

    @property
    def n_kept(self) -> int:
        """Number of units kept from each model separately."""
        return int(self.only_a.numel())

    @property
    def width(self) -> int:
        """Merged width ``n_merged + 2 * n_kept = size + n_kept``."""
        return self.n_merged + 2 * self.n_kept

    @property
    def ratio(self) -> float:
        """The realized ratio ``n_kept / size``."""
        return self.n_kept / self.size if self.size else 0.0


def kept_units(size: int, ratio: float) -> int:
    """Units kept from both models at ``ratio``: ``size - round_half_up((1 - ratio) * size)``.

    For ``ratio = k / size`` this is exactly ``k``.

    Example:
        >>> from fastmerge.pleas.matching import kept_units
        >>> kept_units(10, 0.3), kept_units(10, 0.25), kept_units(3, 2 / 3)
        (3, 2, 2)
    """
    merged = math.floor((1.0 - ratio) * size + 0.5 + 1e-9)
    return size - min(size, max(0, merged))


def _check_ratio(ratio: Any, what: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        if isinstance(ratio, torch.Tensor) and ratio.numel() == 1:
            ratio = float(ratio)
        else:
            raise TypeError(f"{what} must be a real number in [0, 1], got {ratio!r}")
    r = float(ratio)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {r}")
    return r


def partial_layout(match: GroupMatch, ratio: float) -> PartialLayout:
    """Partial matching of one group at ``ratio`` r: merge the best-aligned
    ``round((1 - r) d)`` pairs, keep the other ``k`` units from both models (width ``d + k``).

    Rounding is half up on the number of merged pairs, so ``ratio = k / d`` keeps exactly
    ``k`` units (what :func:`~fastmerge.pleas.allocate` returns).

    Example:
        >>> m = fastmerge.pleas.GroupMatch(
        ...     "g", 4, torch.tensor([2, 0, 3, 1]),
        ...     torch.tensor([-0.1, -0.9, -0.2, -0.5], dtype=torch.float64),
        ...     torch.zeros(4, dtype=torch.float64), torch.tensor([0, 2, 3, 1]))
        >>> layout = fastmerge.pleas.partial_layout(m, 0.5)
        >>> layout.merged_a.tolist(), layout.merged_b.tolist(), layout.width
        ([0, 2], [2, 3], 6)
        >>> layout.only_a.tolist(), layout.only_b.tolist()
        ([1, 3], [0, 1])
    """
    if not isinstance(match, GroupMatch):
        raise TypeError(f"match must be a GroupMatch, got {type(match).__name__}")
    r = _check_ratio(ratio)
    d = match.size
    k = kept_units(d, r)
    order = match.order.to(torch.long).cpu()
    perm_b = match.perm_b.to(torch.long).cpu()
    merged_a = torch.sort(order[: d - k]).values
    only_a = torch.sort(order[d - k :]).values
    return PartialLayout(
        name=match.name,
        size=d,
        merged_a=merged_a,
        merged_b=perm_b[merged_a],
        only_a=only_a,
        only_b=torch.sort(perm_b[only_a]).values,
    )
