"""Git Re-Basin weight matching: align two models' units from their weights alone (no data).

:func:`weight_matching` finds, for every permutation group of a
:class:`~fastmerge.pleas.PermutationSpec`, the permutation of ``model_b``'s units that
maximizes the inner product of the two models' parameters, ``sum over parameters W of
<W_a, W_b permuted>`` (Ainsworth et al., *Git Re-Basin*, 2023), by coordinate descent over the
groups. For group ``g`` of ``d`` units, with every other group's permutation fixed, the
objective is linear in ``g``'s permutation: its (d, d) cost matrix is

    C[j, k] = sum over the axes (name, dim) of g of
              < W_a[name] unit j along dim,  W_b[name] (other axes permuted) unit k along dim >

(one GEMM per parameter: ``dim`` moved to the front, flattened), and one exact linear
assignment (:func:`fastmerge.linear_assignment`, maximizing) gives its best permutation.

**Sweeps.** A sweep visits every group once, in a random order: sweep ``i`` uses the ``i``-th
draw of ``torch.randperm(n_groups, generator=torch.Generator().manual_seed(seed))`` over the
spec's groups. A group's permutation is replaced only when the new assignment raises its
cost by more than a relative ``1e-12`` (float64 weights; ``1e-6`` otherwise) of the old
one, so ties never make permutations wander; the descent stops after the first sweep in
which no group improved, or after ``max_iter`` sweeps. The objective then never decreases
from one sweep to the next (exactly so when no parameter has two axes in one group: such a
parameter's term is quadratic in that group's permutation and is linearized at the current
one, as in the reference).

**Batched.** Consecutive groups of a sweep's order that share no parameter are independent
(one's cost does not depend on the other's permutation), so they are solved together: one
batched :func:`~fastmerge.linear_assignment` call per distinct size among them; the result
is that of visiting them one after the other. The costs are kept between steps: a
parameter's share of a group's cost is recomputed only when the permutation of one of its
other axes changed, and when fewer than two thirds of that axis's units moved it is updated by a
GEMM over the moved units only (``C += A[:, moved] (B[:, new] - B[:, old])^T``). The cost
matrices accumulate in float64, in place in buffers kept between steps; each GEMM runs in
the weights' dtype (at least float32; float64 only for float64 weights). Weights are not
scanned for NaN or infinities up front (two passes over every parameter): a non-finite
weight makes its costs non-finite, and only then are the group's parameters checked, to
name it.

**What the cost reads.** Only parameters: the BatchNorm running statistics (and any other
buffer in a group) follow the permutation when it is applied
(:func:`~fastmerge.pleas.apply_permutation` reorders every axis of the group) but do not
enter the cost, as in the reference (there, the statistics are separate from the
parameters). Norm scales and shifts, biases, and the classifier's input columns do.

Example:
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> a = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> spec = fastmerge.pleas.permutation_groups(a, torch.randn(2, 4))
    >>> b = fastmerge.pleas.apply_permutation(a, spec, {"0": torch.tensor([3, 0, 5, 1, 4, 2])})
    >>> wm = fastmerge.pleas.weight_matching(a, b, spec=spec)
    >>> wm.perm_b["0"].tolist()
    [1, 3, 5, 0, 4, 2]
    >>> torch.equal(wm.apply(b)[0].weight, a[0].weight)
    True
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..ops.linear_assignment import linear_assignment
from .groups import PermutationSpec, apply_permutation, permutation_groups
from .matching import PartialLayout, _check_spec_fits, check_same_architecture

__all__ = ["WeightMatch", "weight_matching"]


@dataclass(frozen=True)
class WeightMatch:
    """The result of :func:`weight_matching`.

    * ``perm_b``: ``{group: (d,) int64}``, model a's unit ``j`` is matched with model b's unit
      ``perm_b[g][j]``, the convention of :attr:`GroupMatch.perm_b
      <fastmerge.pleas.GroupMatch>` (``apply_permutation(model_b, spec, perm_b)`` reorders
      b's units like a's);
    * ``objective``: ``sum over parameters of <W_a, W_b permuted>`` at the initial
      permutations (``objective[0]``) and after each sweep (``objective[i]``);
    * ``sweeps``: the number of sweeps run (the last one improved nothing when
      ``converged``);
    * ``improved``: per sweep, how many groups changed their permutation;
    * ``orders``: per sweep, the order in which the groups were visited;
    * ``spec``: the permutation groups.

    Example:
        >>> from torch import nn
        >>> a = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> wm = fastmerge.pleas.weight_matching(a, a, example_input=torch.randn(1, 3))
        >>> wm.perm_b["0"].tolist(), wm.sweeps, wm.converged, wm.improved
        ([0, 1, 2, 3], 1, True, (0,))
    """

    perm_b: dict[str, torch.Tensor]
    objective: tuple[float, ...]
    sweeps: int
    converged: bool
    improved: tuple[int, ...]
    orders: tuple[tuple[str, ...], ...]
    spec: PermutationSpec

    def apply(self, model_b: nn.Module) -> nn.Module:
        """A copy of ``model_b`` with its units reordered like model a's (same function).

        Example:
            >>> from torch import nn
            >>> a = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
            >>> wm = fastmerge.pleas.weight_matching(a, a, example_input=torch.randn(1, 3))
            >>> torch.equal(wm.apply(a)[0].weight, a[0].weight)
            True
        """
        return apply_permutation(model_b, self.spec, self.perm_b)

    def layouts(self) -> dict[str, PartialLayout]:
        """Every group fully merged along the matching (for
        :func:`~fastmerge.pleas.merge_weights`): unit ``j`` of a with unit ``perm_b[j]`` of b.

        Example:
            >>> from torch import nn
            >>> a = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
            >>> wm = fastmerge.pleas.weight_matching(a, a, example_input=torch.randn(1, 3))
            >>> lay = wm.layouts()["0"]
            >>> lay.merged_b.tolist(), lay.width
            ([0, 1, 2, 3], 4)
        """
        empty = torch.zeros(0, dtype=torch.long)
        return {
            g: PartialLayout(g, int(p.numel()), torch.arange(p.numel()), p.clone(), empty, empty)
            for g, p in self.perm_b.items()
        }


# --------------------------------------------------------------------------------------------
# Cost terms


class _Term:
    """One parameter's share of one group's cost: the parameter with the group's axis moved
    first and its other permuted axes next, as (d, n_1, ..., rest) contiguous tensors."""

    def __init__(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        dim: int,
        others: list[tuple[str, int]],
        group: str = "",
    ) -> None:
        self.group = group
        order = [dim] + [d for _, d in others]
        order += [d for d in range(a.dim()) if d not in order]
        shape = [a.shape[d] for d in order[: 1 + len(others)]] + [-1]
        self.a = a.permute(order).reshape(shape).contiguous()
        self.b = b.permute(order).reshape(shape).contiguous()
        self.groups = [g for g, _ in others]
        self.used: Optional[list[torch.Tensor]] = None
        self.value: Optional[torch.Tensor] = None  # float64, updated in place
        self._out: Optional[torch.Tensor] = None

    def current(self, perms: Mapping[str, torch.Tensor]) -> bool:
        """Whether ``value`` is this term's cost at ``perms`` (permutation tensors are
        replaced, never modified, so identity tells)."""
        return self.used is not None and all(u is perms[g] for u, g in zip(self.used, self.groups))

    def gemm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a b^T`` over the flattened trailing axes, in the weights' dtype, into a buffer
        reused between calls (fresh (d, d) results cost page faults on every step)."""
        n = a.shape[0]
        if self._out is None:
            self._out = torch.empty(n, b.shape[0], dtype=a.dtype, device=a.device)
        return torch.mm(a.reshape(n, -1), b.reshape(b.shape[0], -1).T, out=self._out)

    def _set(self, product: torch.Tensor) -> torch.Tensor:
        if self.value is None:
            self.value = product.to(torch.float64, copy=True)
        else:
            self.value.copy_(product)
        return self.value

    def update(self, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """This term's (d, d) cost at the current permutations of its other axes."""
        cur = [perms[g] for g in self.groups]
        if self.value is not None and self.used is not None:
            if len(cur) == 1:
                moved = (cur[0] != self.used[0]).nonzero().squeeze(1)
                if moved.numel() == 0:
                    self.used = cur
                    return self.value
                if 3 * moved.numel() < 2 * cur[0].numel():
                    new = self.b.index_select(1, cur[0][moved])
                    old = self.b.index_select(1, self.used[0][moved])
                    self.value.add_(self.gemm(self.a.index_select(1, moved), new - old))
                    self.used = cur
                    return self.value
            elif all(c is u or torch.equal(c, u) for c, u in zip(cur, self.used)):
                self.used = cur
                return self.value
        b = self.b
        for i, p in enumerate(cur):
            b = b.index_select(1 + i, p)
        self._set(self.gemm(self.a, b))
        self.used = cur
        return self.value


def _check_perm(name: str, perm: Any, size: int, device: torch.device) -> torch.Tensor:
    p = torch.as_tensor(perm)
    if p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
        raise TypeError(f"init[{name!r}] must hold integer indices, got dtype {p.dtype}")
    p = p.to(device="cpu", dtype=torch.long)
    if p.shape != (size,) or not torch.equal(torch.sort(p).values, torch.arange(size)):
        raise ValueError(
            f"init[{name!r}] must be a permutation of 0..{size - 1} (shape ({size},)), got "
            f"shape {tuple(p.shape)}"
            + ("" if p.shape != (size,) else " with repeated or out-of-range indices")
        )
    return p.to(device)


def _objective(
    params: Mapping[str, tuple[torch.Tensor, torch.Tensor, list[tuple[str, int]]]],
    terms_of: Mapping[str, list[_Term]],
    const: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor],
) -> float:
    """``sum <W_a, W_b permuted>``: read off a term that is current where there is one
    (``sum_j value[j, perm[j]]``), else by permuting the parameter."""
    total = torch.zeros((), dtype=torch.float64, device=next(iter(perms.values())).device)
    for g, c in const.items():
        total += c.gather(1, perms[g].unsqueeze(1)).sum()
    for name, (a, b, axes) in params.items():
        if len(axes) == 1:
            continue  # in const
        term = next((t for t in terms_of[name] if t.current(perms)), None)
        if term is not None:
            total += term.value.gather(1, perms[term.group].unsqueeze(1)).sum()
            continue
        for g, d in axes:
            p = perms[g]
            if not torch.equal(p, torch.arange(p.numel(), device=p.device)):
                b = b.index_select(d, p)
        total += torch.dot(a.reshape(-1), b.reshape(-1)).double()
    return float(total)


def weight_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    spec: Optional[PermutationSpec] = None,
    example_input: Any = None,
    max_iter: int = 100,
    seed: int = 0,
    init: Optional[Mapping[str, Any]] = None,
) -> WeightMatch:
    """Match the units of ``model_b`` to those of ``model_a`` from their weights (Git
    Re-Basin weight matching; see the module documentation for the algorithm).

    Args:
        model_a, model_b: two models of the same architecture (not modified).
        spec: the permutation groups; default
            ``permutation_groups(model_a, example_input)``.
        example_input: an input of the model, only to trace it when ``spec`` is None.
        max_iter: the most sweeps over the groups.
        seed: seeds the random order of the groups in every sweep.
        init: starting permutations ``{group: perm_b}`` (groups left out: identity).

    Returns:
        A :class:`WeightMatch`; ``result.apply(model_b)`` is b aligned to a.

    Raises:
        ValueError: different architectures (naming the first mismatching parameter), a
            spec that does not fit the models (naming the group and axis), neither ``spec``
            nor ``example_input``, a bad ``max_iter`` or ``init`` permutation.

    Example:
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
        ...                   nn.Linear(8, 2))
        >>> spec = fastmerge.pleas.permutation_groups(a, torch.randn(2, 4))
        >>> b = fastmerge.pleas.apply_permutation(a, spec, spec.random_perms())
        >>> wm = fastmerge.pleas.weight_matching(a, b, spec=spec, seed=1)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(wm.apply(b)(x), b(x), atol=1e-6)  # the same function as b
        True
        >>> all(torch.equal(p, q) for p, q in zip(wm.apply(b).parameters(), a.parameters()))
        True
    """
    check_same_architecture(model_a, model_b)
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if spec is None:
        if example_input is None:
            raise ValueError(
                "weight_matching needs spec or example_input (an input of the model, to trace "
                "its permutation groups with fastmerge.pleas.permutation_groups)"
            )
        spec = permutation_groups(model_a, example_input)
    elif not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    _check_spec_fits(model_a, spec)

    # Parameters only (buffers follow the permutation but are not matched); a tensor shared
    # under several names counts once.
    pa = dict(model_a.named_parameters())
    pb = dict(model_b.named_parameters())
    axes_of: dict[str, list[tuple[str, int]]] = {}
    for g in spec.groups.values():
        for axis in g.axes:
            if axis.name in pa:
                axes_of.setdefault(axis.name, []).append((g.name, axis.dim))
    device = next(iter(pa.values())).device if pa else torch.device("cpu")
    params: dict[str, tuple[torch.Tensor, torch.Tensor, list[tuple[str, int]]]] = {}
    with torch.no_grad():
        for name, axes in axes_of.items():
            a = pa[name].detach()
            # Finiteness is checked on the (small) cost matrices: a NaN or infinity in a
            # weight makes its terms' costs non-finite (see _check_finite).
            work = torch.promote_types(a.dtype, torch.float32)
            b = pb[name].detach().to(device=a.device, dtype=work)
            params[name] = (a.to(work), b, axes)

    perms = {g: torch.arange(s.size, device=device) for g, s in spec.groups.items()}
    for g, p in (init or {}).items():
        if g not in spec.groups:
            raise KeyError(f"init: {g!r} is not a group of spec (groups: {list(spec.groups)})")
        perms[g] = _check_perm(g, p, spec.groups[g].size, device)

    # Per group: the constant share (parameters with no other permuted axis) and the terms.
    const: dict[str, torch.Tensor] = {}
    terms: dict[str, list[_Term]] = {g: [] for g in spec.groups}
    terms_of: dict[str, list[_Term]] = {}
    tensors_of: dict[str, set[str]] = {g: set() for g in spec.groups}
    float64 = True
    with torch.no_grad():
        for name, (a, b, axes) in params.items():
            float64 = float64 and a.dtype == torch.float64
            for i, (g, d) in enumerate(axes):
                tensors_of[g].add(name)
                term = _Term(a, b, d, axes[:i] + axes[i + 1 :], g)
                if term.groups:
                    terms[g].append(term)
                    terms_of.setdefault(name, []).append(term)
                else:
                    value = term.update(perms)
                    const[g] = const[g] + value if g in const else value
        for g, s in spec.groups.items():
            if g not in const:
                const[g] = torch.zeros(s.size, s.size, dtype=torch.float64, device=device)
    rtol = 1e-12 if float64 else 1e-6

    names = list(spec.groups)
    gen = torch.Generator().manual_seed(int(seed))
    objective = [_objective(params, terms_of, const, perms)]
    improved: list[int] = []
    orders: list[tuple[str, ...]] = []
    converged = False
    with torch.no_grad():
        for _ in range(int(max_iter)):
            order = tuple(names[i] for i in torch.randperm(len(names), generator=gen).tolist())
            orders.append(order)
            changed = 0
            for run in _independent_runs(order, tensors_of):
                changed += _solve_run(run, spec, const, terms, perms, rtol, params, tensors_of)
            improved.append(changed)
            objective.append(_objective(params, terms_of, const, perms))
            if changed == 0:
                converged = True
                break
    return WeightMatch(
        perm_b={g: p.cpu() for g, p in perms.items()},
        objective=tuple(objective),
        sweeps=len(orders),
        converged=converged,
        improved=tuple(improved),
        orders=tuple(orders),
        spec=spec,
    )


def _check_finite(
    params: Mapping[str, tuple[torch.Tensor, torch.Tensor, list[tuple[str, int]]]],
    tensors_of: Mapping[str, set[str]],
    groups: list[str],
) -> None:
    """Name the first non-finite parameter among ``groups``' (a non-finite cost matrix's
    cause); returns when they are all finite (the products overflowed)."""
    names = set().union(*(tensors_of[g] for g in groups))
    for name in (n for n in params if n in names):
        a, b, _ = params[name]
        for model, t in (("model_a", a), ("model_b", b)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{model}'s parameter {name!r} has NaN or infinite values")


def _independent_runs(
    order: tuple[str, ...], tensors_of: Mapping[str, set[str]]
) -> list[list[str]]:
    """Split ``order`` into consecutive runs of groups that share no parameter."""
    runs: list[list[str]] = []
    seen: set[str] = set()
    for g in order:
        if runs and not (tensors_of[g] & seen):
            runs[-1].append(g)
            seen |= tensors_of[g]
        else:
            runs.append([g])
            seen = set(tensors_of[g])
    return runs


def _solve_run(
    run: list[str],
    spec: PermutationSpec,
    const: Mapping[str, torch.Tensor],
    terms: Mapping[str, list[_Term]],
    perms: dict[str, torch.Tensor],
    rtol: float,
    params: Mapping[str, tuple[torch.Tensor, torch.Tensor, list[tuple[str, int]]]],
    tensors_of: Mapping[str, set[str]],
) -> int:
    """Solve a run of independent groups, one batched assignment per size; returns how
    many groups changed their permutation."""
    costs = {}
    for g in run:
        c = const[g].clone()
        for term in terms[g]:
            c.add_(term.update(perms))
        costs[g] = c
    by_size: dict[int, list[str]] = {}
    for g in run:
        by_size.setdefault(spec.groups[g].size, []).append(g)
    changed = 0
    for group_names in by_size.values():
        if len(group_names) == 1:
            batch = costs[group_names[0]].unsqueeze(0)
        else:
            batch = torch.stack([costs[g] for g in group_names])
        try:
            _, cols = linear_assignment(batch, maximize=True)
        except ValueError as exc:
            _check_finite(params, tensors_of, group_names)
            raise ValueError(
                f"weight matching of group(s) {group_names}: {exc} (do the weights overflow "
                f"float{torch.finfo(batch.dtype).bits} products?)"
            ) from None
        cols = cols.to(batch.device)
        old = batch.gather(2, torch.stack([perms[g] for g in group_names]).unsqueeze(2)).sum((1, 2))
        new = batch.gather(2, cols.unsqueeze(2)).sum((1, 2))
        if not torch.isfinite(new).all():  # -inf costs (forbidden pairs) in the choice
            _check_finite(params, tensors_of, group_names)
            raise ValueError(
                f"weight matching of group(s) {group_names}: the cost matrices are not finite "
                f"(do the weights overflow float{torch.finfo(batch.dtype).bits} products?)"
            )
        for i, g in enumerate(group_names):
            o, n = float(old[i]), float(new[i])
            if n - o > rtol * max(abs(o), abs(n)):
                perms[g] = cols[i].clone()
                changed += 1
    return changed
