"""PLeaS step 1 with more than two models: align N models' units to one common order.

**Alignment to a reference** (the default): model ``reference`` (0 by default) fixes the
common order of every group's units, and every other model is matched to it on the
activations of one pass over the data (all N models run on each batch; one
:class:`~fastmerge.FeatureStats` per model and group between the reference's and that
model's units, captured at the same points as :func:`~fastmerge.pleas.collect_features`),
then one exact assignment per model and group (:func:`fastmerge.linear_assignment`). With
``rounds > 0`` the *iterative* variant follows: every non-reference model is re-matched,
round after round, to the mean of the other models' activations in the current common
order (the reference's included), one more pass over the data per round. The reference is
never re-matched, so its units stay in their own order.

:class:`MultiMatch` holds one group's N permutations, ``perms[i, p]`` = model i's unit at
common position ``p`` (the reference's row is the identity);
:func:`~fastmerge.pleas.multi_layout` (:mod:`fastmerge.pleas.multi_layouts`) turns it and a
ratio into the N-model layout ``[merged | only-0 | ... | only-(N-1)]``. :func:`align_many`
returns the models permuted into the common order.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from ..dist import all_reduce_values, should_reduce
from ..features import FeatureStats
from ._common import _call, _device_of, _first_input, _to_device
from .groups import PermutationSpec, apply_permutation, permutation_groups
from .matching import (
    COST_KINDS,
    GroupMatch,
    _batches,
    _capture_points,
    _channel_matrix,
    _check_spec,
    _check_spec_fits,
    _solve,
    check_same_architecture,
)

__all__ = [
    "MultiMatch",
    "align_many",
    "check_models",
    "match_many",
]


# --------------------------------------------------------------------------------------------
# Input checks


def check_models(models: Any, reference: int = 0) -> list[nn.Module]:
    """The models as a list, checked: at least two ``nn.Module`` s of one architecture (the
    first difference is named with both model indices) and ``reference`` a valid index.

    Example:
        >>> from torch import nn
        >>> from fastmerge.pleas.multi_matching import check_models
        >>> check_models([nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 2)])
        Traceback (most recent call last):
        ...
        ValueError: models[0] and models[2] have different parameter shapes: 'weight' is \
(3, 4) in models[0] and (2, 4) in models[2]
    """
    if isinstance(models, nn.Module) or not isinstance(models, (list, tuple)):
        raise TypeError(
            f"models must be a list or tuple of torch.nn.Module, got {type(models).__name__}"
        )
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"models: merging needs at least 2 models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{i}] must be a torch.nn.Module, got {type(m).__name__}")
    if isinstance(reference, bool) or not isinstance(reference, int):
        raise TypeError(f"reference must be a model index (int), got {reference!r}")
    if not 0 <= reference < len(models):
        raise ValueError(
            f"reference must be an index in [0, {len(models) - 1}] of the {len(models)} "
            f"models, got {reference}"
        )
    for i in range(1, len(models)):
        try:
            check_same_architecture(models[0], models[i])
        except ValueError as e:
            msg = str(e).replace("model_a", "models[0]").replace("model_b", f"models[{i}]")
            raise ValueError(msg) from None
    return models


def _check_rounds(rounds: Any) -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
    return rounds


# --------------------------------------------------------------------------------------------
# Activations of all N models, one pass


def _collect_many(
    models: Sequence[nn.Module],
    batches: Iterable[Any],
    spec: PermutationSpec,
    reference: int,
    perms: Optional[list[dict[str, torch.Tensor]]],
    reduce: bool,
) -> dict[int, dict[str, FeatureStats]]:
    """Per non-reference model i, per group: FeatureStats(target, x_i). The target is the
    reference's activations (``perms`` None) or the mean of the other models' activations
    permuted into the common order by ``perms[j]``."""
    n = len(models)
    points = _capture_points(models[reference], spec)
    group_of = {(m, side): g for g, where in points.items() for m, side in where}
    others = [i for i in range(n) if i != reference]
    stats = {i: {g: FeatureStats() for g in points} for i in others}
    events: list[list[tuple[tuple[str, str], torch.Tensor]]] = [[] for _ in range(n)]
    phase = [0]

    def hook_for(key: tuple[str, str], module: nn.Module):
        def capture(x: Any) -> None:
            if isinstance(x, torch.Tensor):
                xm = _channel_matrix(module, x)
                if xm.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                    xm = xm.clone()  # held until every model has run
                events[phase[0]].append((key, xm))

        if key[1] == "in":
            return lambda _m, args, kwargs: capture(args[0] if args else kwargs.get("input"))
        return lambda _m, _args, out: capture(out)

    handles = []
    flags = [(m, m.training) for model in models for m in model.modules()]
    n_batches = 0
    try:
        hooked: set[tuple[int, str]] = set()
        for model in models:
            modules = dict(model.named_modules())
            for key in group_of:
                m = modules[key[0]]
                if (id(m), key[1]) not in hooked:  # a module object shared by two models
                    hooked.add((id(m), key[1]))
                    pre = key[1] == "in"
                    hook = hook_for(key, m)
                    handles.append(
                        m.register_forward_pre_hook(hook, with_kwargs=True)
                        if pre
                        else m.register_forward_hook(hook)
                    )
        for model in models:
            model.eval()
        devices = [_device_of(m) for m in models]
        with torch.no_grad():
            for batch in batches:
                x = _first_input(batch)
                for i, model in enumerate(models):
                    phase[0] = i
                    _call(model, _to_device(x, devices[i]))
                _feed(events, stats, group_of, reference, perms)
                for e in events:
                    e.clear()
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
        for e in events:
            e.clear()
    if reduce:  # every rank reaches the collectives, then all raise alike
        (n_batches,) = all_reduce_values([n_batches])
        for i in others:
            for s in stats[i].values():
                s.all_reduce()
    if n_batches == 0:
        raise ValueError("data is empty: it yielded no batches")
    for name in points:
        if stats[others[0]][name].count == 0:
            raise ValueError(
                f"group {name!r} saw no activations: none of its capture points ran on the data"
            )
    return stats


def _feed(events, stats, group_of, reference, perms) -> None:
    """Pair one batch's activations (model i's in its call order) with their targets."""
    n = len(events)
    by_key: list[dict[tuple[str, str], list[torch.Tensor]]] = []
    for ev in events:
        d: dict[tuple[str, str], list[torch.Tensor]] = {}
        for key, xm in ev:
            d.setdefault(key, []).append(xm)
        by_key.append(d)
    for i in range(1, n):
        for key in set(by_key[0]) | set(by_key[i]):
            c0, ci = len(by_key[0].get(key, [])), len(by_key[i].get(key, []))
            if c0 != ci:
                raise ValueError(
                    f"models[{i}] called {key[0]!r} {ci} times and models[0] {c0} times on "
                    f"the same batch; the models do not have the same architecture"
                )
    for i in range(n):
        if i == reference:
            continue
        seen: dict[tuple[str, str], int] = {}
        for key, xm in events[i]:
            c = seen.get(key, 0)
            seen[key] = c + 1
            g = group_of[key]
            if perms is None:
                target = by_key[reference][key][c]
            else:
                dev = xm.device
                parts = [
                    by_key[j][key][c].to(dev).index_select(1, perms[j][g].to(dev))
                    for j in range(n)
                    if j != i
                ]
                total = parts[0]
                for p in parts[1:]:
                    total = total + p
                target = total / len(parts)
            stats[i][g].update(target, xm.to(target.device))


# --------------------------------------------------------------------------------------------
# Matching


@dataclass(frozen=True)
class MultiMatch:
    """The alignment of one permutation group of ``size`` d units across N models.

    * ``perms``: (N, d) int64, model i's unit at common position ``p`` is ``perms[i, p]``
      (the reference's row is ``arange(d)``); ``apply_permutation(models[i], spec,
      {name: perms[i]})`` puts model i's units in the common order;
    * ``score``: (d,) float64, each position's similarity (the cost kind, higher is better)
      averaged over the non-reference models, against the reference (or, after iterative
      rounds, against the mean of the others);
    * ``misalignment``: (d,) float64, the same average of
      :class:`~fastmerge.pleas.GroupMatch`'s scale-free misalignment;
    * ``order``: (d,) int64, the positions from best to worst aligned by ``score`` (ties:
      lower position first);
    * ``cost``, ``reference``: the cost kind and the reference model's index.

    Example:
        >>> m = fastmerge.pleas.MultiMatch(
        ...     "h", 2, torch.tensor([[0, 1], [1, 0], [0, 1]]),
        ...     torch.tensor([-0.5, -0.1], dtype=torch.float64),
        ...     torch.tensor([0.4, 0.1], dtype=torch.float64), torch.tensor([1, 0]))
        >>> m.n_models, m.order.tolist()
        (3, [1, 0])
    """

    name: str
    size: int
    perms: torch.Tensor
    score: torch.Tensor
    misalignment: torch.Tensor
    order: torch.Tensor
    cost: str = "neg_sq_distance"
    reference: int = 0

    @property
    def n_models(self) -> int:
        """Number of models N."""
        return int(self.perms.shape[0])

    def group_match(self) -> GroupMatch:
        """This match as a :class:`~fastmerge.pleas.GroupMatch` (for
        :func:`~fastmerge.pleas.allocate`'s scores): the scores, misalignments and order,
        with the first non-reference model's permutation as ``perm_b``.

        Example:
            >>> m = fastmerge.pleas.MultiMatch(
            ...     "h", 2, torch.tensor([[0, 1], [1, 0]]), torch.zeros(2, dtype=torch.float64),
            ...     torch.zeros(2, dtype=torch.float64), torch.tensor([0, 1]))
            >>> m.group_match().perm_b.tolist()
            [1, 0]
        """
        other = 1 if self.reference == 0 else 0
        return GroupMatch(
            self.name, self.size, self.perms[other], self.score, self.misalignment,
            self.order, self.cost,
        )  # fmt: skip


def _mean(ts: list[torch.Tensor]) -> torch.Tensor:
    total = ts[0]
    for t in ts[1:]:
        total = total + t
    return total / len(ts)


def match_many(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    spec: Optional[PermutationSpec] = None,
    *,
    cost: str = "neg_sq_distance",
    reference: int = 0,
    rounds: int = 0,
    distributed: Optional[bool] = None,
) -> dict[str, MultiMatch]:
    """Align the units of N models of one architecture, every permutation group.

    Every model is matched to ``models[reference]`` on one pass over ``data`` (input batches
    or ``(input, ...)`` tuples; all models run in eval mode without gradients, their flags
    restored), maximizing ``cost`` as :func:`~fastmerge.pleas.match` does; then ``rounds``
    iterative rounds re-match every non-reference model to the mean of the others' aligned
    activations (one more pass each). For two models and ``rounds=0`` the permutation,
    scores and misalignments are exactly those of :func:`~fastmerge.pleas.match`.
    ``spec`` defaults to :func:`~fastmerge.pleas.permutation_groups` of the reference on
    the first batch; ``distributed`` is as for :func:`~fastmerge.pleas.match`.

    Raises:
        ValueError: fewer than 2 models, different architectures (naming the parameter and
            the model indices), ``reference`` out of range, ``rounds < 0``, empty ``data``,
            an unknown ``cost``.

    Example:
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> a = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
        >>> spec = fastmerge.pleas.permutation_groups(a, torch.randn(2, 4).double())
        >>> b = fastmerge.pleas.apply_permutation(a, spec, {"0": torch.tensor([3, 0, 5, 1, 4, 2])})
        >>> c = fastmerge.pleas.apply_permutation(a, spec, {"0": torch.tensor([5, 4, 3, 2, 1, 0])})
        >>> data = [torch.randn(64, 4, dtype=torch.float64)]
        >>> m = fastmerge.pleas.match_many([a, b, c], data, spec)["0"]
        >>> m.perms.tolist()  # model i's unit at each of a's positions
        [[0, 1, 2, 3, 4, 5], [1, 3, 5, 0, 4, 2], [5, 4, 3, 2, 1, 0]]
    """
    if not isinstance(cost, str) or cost not in COST_KINDS:
        raise ValueError(f"cost must be one of {', '.join(map(repr, COST_KINDS))}, got {cost!r}")
    models = check_models(models, reference)
    rounds = _check_rounds(rounds)
    batches = _batches(data)
    batches = list(batches) if rounds else batches
    ref = models[reference]
    if spec is None:
        try:
            first = next(iter(batches))
        except StopIteration:
            raise ValueError("data is empty: it yielded no batches") from None
        if not isinstance(batches, list):
            batches = itertools.chain([first], batches)
        spec = permutation_groups(ref, _to_device(_first_input(first), _device_of(ref)))
    spec = _check_spec(spec)
    _check_spec_fits(ref, spec)
    reduce = should_reduce(distributed)
    n = len(models)
    ident = {g: torch.arange(s.size) for g, s in spec.groups.items()}
    perms: Optional[list[dict[str, torch.Tensor]]] = None
    for _ in range(rounds + 1):
        stats = _collect_many(models, batches, spec, reference, perms, reduce)
        solved = {i: _solve(s, cost) for i, s in stats.items()}
        perms = [
            ident if i == reference else {g: solved[i][g].perm_b for g in ident} for i in range(n)
        ]
    out: dict[str, MultiMatch] = {}
    for g in spec.groups:
        ms = [solved[i][g] for i in sorted(solved)]
        score = _mean([m.score for m in ms])
        out[g] = MultiMatch(
            name=g,
            size=spec.groups[g].size,
            perms=torch.stack([perms[i][g].to(torch.long).cpu() for i in range(n)]),
            score=score,
            misalignment=_mean([m.misalignment for m in ms]),
            order=torch.sort(-score, stable=True).indices,
            cost=cost,
            reference=reference,
        )
    return out


def align_many(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    spec: Optional[PermutationSpec] = None,
    *,
    cost: str = "neg_sq_distance",
    reference: int = 0,
    rounds: int = 0,
    distributed: Optional[bool] = None,
) -> list[nn.Module]:
    """Copies of the N models with their units permuted into the common order of
    :func:`match_many` (same arguments); each copy computes its model's function, and the
    reference's copy is unchanged.

    Example:
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> a = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
        >>> spec = fastmerge.pleas.permutation_groups(a, torch.randn(2, 4).double())
        >>> b = fastmerge.pleas.apply_permutation(a, spec, {"0": torch.randperm(6)})
        >>> c = fastmerge.pleas.apply_permutation(a, spec, {"0": torch.randperm(6)})
        >>> out = fastmerge.pleas.align_many([a, b, c], [torch.randn(64, 4).double()])
        >>> all(torch.equal(m[0].weight, a[0].weight) for m in out)
        True
    """
    models = check_models(models, reference)
    batches = list(_batches(data))
    if spec is None and batches:
        ref = models[reference]
        spec = permutation_groups(ref, _to_device(_first_input(batches[0]), _device_of(ref)))
    matches = match_many(
        models, batches, spec, cost=cost, reference=reference, rounds=rounds,
        distributed=distributed,
    )  # fmt: skip
    return [
        apply_permutation(m, spec, {g: mm.perms[i] for g, mm in matches.items()})
        for i, m in enumerate(models)
    ]
