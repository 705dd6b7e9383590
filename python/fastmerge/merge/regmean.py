"""RegMean and RegMean++: merge every Linear layer by regression on the models' own inputs.

RegMean (Jin et al., 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models") merges the weight W_i (d_out, d_in) of one Linear layer of T models into the W
that minimizes ``Σ_i ||X_i W^T - X_i W_i^T||^2``, with X_i the layer's inputs in model i on
model i's data. With ``G_i = X_i^T X_i / n_i`` (each model's mean Gram matrix, so that models
weigh alike whatever their sample counts) the closed form is::

    W^T = (Σ_i G~_i + λ I)^-1 Σ_i G~_i W_i^T,    G~_i = α G_i + (1 - α) diag(G_i)

``α`` (`alpha`, default 0.9; tune it on validation data) shrinks the off-diagonal entries: α = 1
is the exact least-squares merge (singular when an input feature never varies), α = 0
a per-input-feature weighted average; any α < 1 makes G~_i positive definite as soon as
every input feature is non-zero somewhere. ``λ = ridge · trace(Σ G~) / d`` (`ridge`,
default 0). Tensors that are not the weight of a selected Linear layer (embeddings, norms,
the unselected layers) are averaged, as in the paper; biases too by default
(``bias="average"``), or regressed with the weight (``bias="solve"``: a constant-1 input
feature is appended to X_i, so [W | b] is the least-squares merge of the layer's outputs).

RegMean++ (``sequential=True``): X_i is the layer's input in the *merged* model, on model
i's data, with the layers before it already merged (one pass per layer, in the order of the
forward), so each layer corrects what the merged earlier layers changed.

Speed: one forward per model feeds every layer's accumulator; each layer's input rows are
gathered into blocks of up to 4,096 rows and go through float32 GEMMs of the upper block
triangle of X^T X into float64 sums (:class:`fastmerge.LeastSquares`); the forward stops at
the last selected layer (the layers after it are not run); every group of layers of one
shape is solved by one batched Cholesky :func:`fastmerge.ridge_solve`.

The statistics are mergeable (:meth:`RegMeanStatistics.merge`): with ``distributed`` (default:
when a torch.distributed group of more than one rank is initialized) every rank passes its
own shard of the data and the Gram matrices are summed over the ranks before the solve.
These functions need data, so they are a library API; ``fastmerge merge`` does not list them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from fastmerge.merge import regmean
    >>> _ = torch.manual_seed(0)
    >>> models = [nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)) for _ in range(2)]
    >>> data = [[torch.randn(16, 4)], [torch.randn(16, 4)]]  # one list of batches per model
    >>> regmean(models, data)[0].weight.shape
    torch.Size([3, 4])
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from .. import dist
from ..least_squares import LeastSquares, ridge_solve
from . import _data
from ._inputs import collect_inputs, forward_order
from ._select import Patterns, key_selector

__all__ = ["RegMeanStatistics", "regmean", "regmean_from_statistics", "regmean_statistics"]

#: Default off-diagonal shrinkage α: keeps most of the input correlations, always solvable.
DEFAULT_ALPHA = 0.9
#: The ridge (relative to trace/d) a layer whose Gram matrix is singular is solved with.
FALLBACK_RIDGE = 1e-4
BIAS_MODES = ("average", "solve")
_KIND = dist.kind_code("RegMeanStatistics")


class RegMeanStatistics:
    """The input Gram matrices of one model's Linear layers: one
    :class:`fastmerge.LeastSquares` per layer (name -> accumulator), mergeable across data
    shards and ranks. Built by :func:`regmean_statistics`.

    Args:
        layers: layer name -> accumulator (``d_out=1``; with a bias feature when `bias` is
            ``"solve"`` and the layer has a bias).
        bias: ``"average"`` or ``"solve"`` (see :func:`regmean`).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> stats = fastmerge.merge.regmean_statistics(model, [torch.ones(5, 3)])
        >>> stats.names, stats.count("0"), stats.gram("0").tolist()[0]
        (['0'], 5, [1.0, 1.0, 1.0])
    """

    def __init__(self, layers: Mapping[str, LeastSquares], bias: str = "average") -> None:
        if bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
        self.layers = dict(layers)
        self.bias = bias

    @property
    def names(self) -> list[str]:
        """The layer names, in the order of the forward.

        Example:
            >>> RegMeanStatistics({"fc": fastmerge.LeastSquares(2, 1)}).names
            ['fc']
        """
        return list(self.layers)

    def count(self, name: str) -> int:
        """How many input rows layer `name` has seen.

        Example:
            >>> RegMeanStatistics({"fc": fastmerge.LeastSquares(2, 1)}).count("fc")
            0
        """
        return self.layers[name].count

    def gram(self, name: str) -> torch.Tensor:
        """Float64 mean Gram matrix ``X^T X / n`` of layer `name` (bias feature last).

        Example:
            >>> ls = fastmerge.LeastSquares(1, 1, bias=False)
            >>> _ = ls.update(torch.tensor([[1.0], [3.0]]), torch.zeros(2, 1))
            >>> RegMeanStatistics({"fc": ls}).gram("fc").tolist()
            [[5.0]]
        """
        ls = self.layers[name]
        if ls.count == 0:
            raise ValueError(f"regmean: layer {name!r} saw no samples (no input rows in the data)")
        return ls.gram / ls.count

    def merge(self, other: RegMeanStatistics) -> RegMeanStatistics:
        """Add the statistics of `other` (more data of the same model); returns ``self``.

        Example:
            >>> from torch import nn
            >>> model, x = nn.Linear(2, 2), torch.randn(10, 2)
            >>> a = fastmerge.merge.regmean_statistics(model, [x[:4]])
            >>> b = fastmerge.merge.regmean_statistics(model, [x[4:]])
            >>> a.merge(b).count("")  # an nn.Linear alone is the layer named ""
            10
        """
        if not isinstance(other, RegMeanStatistics):
            raise TypeError(f"other must be a RegMeanStatistics, got {type(other).__name__}")
        if other.names != self.names or other.bias != self.bias:
            raise ValueError(
                f"cannot merge RegMeanStatistics of layers {self.names} (bias={self.bias!r}) "
                f"with layers {other.names} (bias={other.bias!r})"
            )
        for name in self.names:
            self.layers[name].merge(other.layers[name])
        return self

    def all_reduce(self, group: Any = None) -> RegMeanStatistics:
        """Sum the statistics over the ranks of a torch.distributed group, in place (a
        collective: every rank calls it with the same layers); returns ``self``.

        Example:
            >>> import os, tempfile
            >>> import torch.distributed as tdist
            >>> rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
            >>> tdist.init_process_group("gloo", init_method=f"file://{rendezvous}",
            ...                          rank=0, world_size=1)
            >>> layer = torch.nn.Linear(2, 1)
            >>> stats = fastmerge.merge.regmean_statistics(layer, [torch.ones(3, 2)])
            >>> stats.all_reduce().count("")
            3
            >>> tdist.destroy_process_group()
        """
        return dist.all_reduce_(self, group)

    def _all_reduce(self, group: Any) -> RegMeanStatistics:
        """fastmerge.dist.Reducible: compare the layer lists, then reduce every layer."""
        signature = float(dist.kind_code("|".join(self.names) + "|" + self.bias))
        rows = dist.describe_ranks(_KIND, [float(len(self.names)), signature], group)
        if len({tuple(row[1:3]) for row in rows}) > 1:
            raise ValueError(
                "cannot all-reduce RegMeanStatistics: the ranks hold different layer lists "
                "(or bias modes); every rank must collect the same layers of the same model"
            )
        for name in self.names:
            self.layers[name].all_reduce(group)
        return self

    def __repr__(self) -> str:
        return f"RegMeanStatistics(layers={len(self.layers)}, bias={self.bias!r})"


# ---- collecting the statistics ----------------------------------------------------------


def _linear_layers(model: nn.Module, include: Patterns, exclude: Patterns) -> dict[str, nn.Linear]:
    selected = key_selector(include, exclude)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and selected(n)}
    if not layers:
        raise ValueError(
            "regmean: the model has no nn.Linear layer selected by include/exclude "
            f"(include={include!r}, exclude={exclude!r})"
        )
    return layers


def _check_bias(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")


def _require_samples(stats: RegMeanStatistics, what: str) -> None:
    for name in stats.names:
        if stats.count(name) == 0:
            raise ValueError(
                f"regmean: layer {name!r} of {what} saw no samples: the data yielded no batch "
                "that reaches it"
            )


def regmean_statistics(
    model: nn.Module,
    data: Iterable[Any],
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    bias: str = "average",
    max_batches: Optional[int] = None,
    distributed: Optional[bool] = None,
) -> RegMeanStatistics:
    """The input Gram matrices of every selected ``nn.Linear`` layer of `model` on `data`.

    Args:
        model: the model; run in eval mode without gradients (its flags are restored).
        data: batches: tensors, ``(inputs, labels, ...)`` tuples or dicts of keyword inputs
            (``"labels"`` dropped).
        include, exclude: regexes on the layer (module) names selecting the layers.
        bias: ``"average"`` or ``"solve"`` (adds the constant-1 feature).
        max_batches: use at most this many batches.
        distributed: sum over the ranks (default: when a multi-rank group is initialized).

    Raises:
        ValueError: no layer selected, a layer that saw no samples (named), bad options.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> stats = fastmerge.merge.regmean_statistics(model, [torch.randn(8, 3)] * 2)
        >>> stats.names, stats.count("2"), tuple(stats.gram("2").shape)
        (['0', '2'], 16, (4, 4))
    """
    _check_bias(bias)
    _data.check_max_batches(max_batches)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = _linear_layers(model, include, exclude)
    batches = _data.limited(_data.reusable(data, "data"), max_batches)
    accs, calls, _ = collect_inputs(model, layers, batches, bias)
    stats = RegMeanStatistics({n: accs[n] for n in forward_order(calls, layers)}, bias)
    if dist.should_reduce(distributed):
        stats.all_reduce()
    _require_samples(stats, "the model")
    return stats


# ---- the merge ---------------------------------------------------------------------------


def _check_alpha_ridge(alpha: float, ridge: float) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if float(ridge) < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")


def _solve_layers(
    merged: nn.Module,
    models: Sequence[nn.Module],
    stats: Sequence[RegMeanStatistics],
    names: Sequence[str],
    alpha: float,
    ridge: float,
) -> None:
    """Write the RegMean solution of layers `names` into `merged` (in place)."""
    targets = [dict(m.named_modules()) for m in models]
    mods = dict(merged.named_modules())
    groups: dict[tuple[int, int], list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    for name in names:
        layer = mods.get(name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"regmean: the merged model has no nn.Linear layer {name!r}")
        g_sum, c_sum = None, None
        for i, (s, t) in enumerate(zip(stats, targets)):
            if name not in s.layers:
                raise ValueError(f"regmean: statistics[{i}] have no layer {name!r}")
            g = s.gram(name)
            if g.shape[0] not in (layer.in_features, layer.in_features + 1):
                raise ValueError(
                    f"regmean: statistics[{i}] of layer {name!r} are {g.shape[0]} features "
                    f"wide, but the layer has {layer.in_features} inputs"
                )
            g = alpha * g + (1.0 - alpha) * torch.diag(g.diagonal())
            w = t[name].weight.detach().to(g)
            if g.shape[0] == layer.in_features + 1:
                w = torch.cat([w, t[name].bias.detach().to(g)[:, None]], dim=1)
            g_sum = g if g_sum is None else g_sum + g
            c = g @ w.T
            c_sum = c if c_sum is None else c_sum + c
        groups.setdefault((g_sum.shape[0], c_sum.shape[1]), []).append((name, g_sum, c_sum))
    for items in groups.values():
        g = torch.stack([item[1] for item in items])
        c = torch.stack([item[2] for item in items])
        solution = _batched_solve(g, c, ridge, [item[0] for item in items])
        with torch.no_grad():
            for (name, _, _), sol in zip(items, solution):
                layer = mods[name]
                layer.weight.copy_(sol[: layer.in_features].T.to(layer.weight))
                if sol.shape[0] > layer.in_features:
                    layer.bias.copy_(sol[layer.in_features].to(layer.bias))


def _batched_solve(g: torch.Tensor, c: torch.Tensor, ridge: float, names: list[str]):
    """One :func:`ridge_solve` for all layers; layers whose ridged Gram is not positive
    definite are solved again with a larger ridge, with a warning naming them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solution = ridge_solve(g, c, ridge=ridge)
    if not any(issubclass(w.category, RuntimeWarning) for w in caught):
        return solution
    lam = ridge * g.diagonal(dim1=-2, dim2=-1).sum(-1) / g.shape[-1]
    ridged = g.clone()
    ridged.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
    info = torch.linalg.cholesky_ex(ridged).info
    fallback = max(FALLBACK_RIDGE, 10.0 * ridge)
    for b in (info != 0).nonzero().flatten().tolist():
        warnings.warn(
            f"regmean: the Gram matrix of layer {names[b]!r} is singular (an input feature "
            f"that never varies, or fewer samples than inputs with alpha=1); solving it with "
            f"ridge={fallback:g} (x trace/d)",
            RuntimeWarning,
            stacklevel=4,
        )
        solution[b] = ridge_solve(g[b], c[b], ridge=fallback)
    return solution


def regmean_from_statistics(
    models: Sequence[nn.Module],
    statistics: Sequence[RegMeanStatistics],
    *,
    alpha: float = DEFAULT_ALPHA,
    ridge: float = 0.0,
) -> nn.Module:
    """The RegMean merge of `models` from their statistics (one :class:`RegMeanStatistics`
    per model, e.g. merged over shards): a new model (a copy of ``models[0]``) whose
    selected Linear weights are the regression merge and whose other floating tensors are
    the average. See :func:`regmean` for `alpha` and `ridge`.

    Example:
        >>> from torch import nn
        >>> models = [nn.Linear(3, 2), nn.Linear(3, 2)]
        >>> stats = [fastmerge.merge.regmean_statistics(m, [torch.randn(20, 3)]) for m in models]
        >>> merged = fastmerge.merge.regmean_from_statistics(models, stats, alpha=1.0)
        >>> torch.allclose(merged.bias, (models[0].bias + models[1].bias) / 2)
        True
    """
    models = _data.check_models(models)
    _check_alpha_ridge(alpha, ridge)
    if isinstance(statistics, RegMeanStatistics) or len(statistics) != len(models):
        raise ValueError("statistics must be a list with one RegMeanStatistics per model")
    for i, s in enumerate(statistics):
        if not isinstance(s, RegMeanStatistics):
            raise TypeError(f"statistics[{i}] is a {type(s).__name__}, not a RegMeanStatistics")
        if s.names != statistics[0].names or s.bias != statistics[0].bias:
            raise ValueError(
                f"statistics[{i}] cover other layers (or another bias mode) than statistics[0]"
            )
    merged = _data.averaged_copy(models)
    _solve_layers(merged, models, statistics, statistics[0].names, float(alpha), float(ridge))
    return merged


def regmean(
    models: Sequence[nn.Module],
    data: Any,
    *,
    alpha: float = DEFAULT_ALPHA,
    ridge: float = 0.0,
    sequential: bool = False,
    include: Patterns = None,
    exclude: Patterns = None,
    bias: str = "average",
    max_batches: Optional[int] = None,
    distributed: Optional[bool] = None,
) -> nn.Module:
    """Merge models of one architecture with RegMean (or RegMean++ with ``sequential=True``).

    Args:
        models: the models (``nn.Module``), the same state-dict keys and shapes.
        data: one iterable of batches per model (a list of lists or DataLoaders, each
            model's own data), or one iterable shared by all. Batches: tensors,
            ``(inputs, labels, ...)`` tuples or dicts of keyword inputs.
        alpha: off-diagonal shrinkage α in [0, 1] (default 0.9).
        ridge: ``ridge · trace / d`` is added to the summed Gram's diagonal (default 0).
        sequential: RegMean++: each layer's inputs come from the merged model with the
            layers before it merged (one pass over the data per layer).
        include, exclude: regexes on the names of the ``nn.Linear`` layers to merge by
            regression; everything else is averaged.
        bias: ``"average"`` (the paper) or ``"solve"`` (regressed with the weight).
        max_batches: use at most this many batches of each model's data.
        distributed: sum the statistics over the ranks of a torch.distributed group
            (default: when one of more than one rank is initialized).

    Returns:
        A new model (a deep copy of ``models[0]`` with the merged tensors).

    Raises:
        ValueError: different architectures (names the first differing parameter), a layer
            that saw no samples (named), no layer selected, bad options. A singular Gram
            matrix is solved with a ridge and a ``RuntimeWarning`` naming the layer.

    Example:
        >>> from torch import nn
        >>> from fastmerge.merge import regmean
        >>> model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> same = regmean([model], [torch.randn(32, 3)], alpha=1.0)  # one model: itself
        >>> torch.allclose(same[2].weight, model[2].weight, atol=1e-5)
        True
    """
    models = _data.check_models(models)
    _check_alpha_ridge(alpha, ridge)
    _check_bias(bias)
    _data.check_max_batches(max_batches)
    if not isinstance(sequential, bool):
        raise TypeError(f"sequential must be a bool, got {sequential!r}")
    reduce = dist.should_reduce(distributed)
    streams = _data.per_model(data, len(models))
    if not sequential:
        stats = [
            regmean_statistics(m, d, include=include, exclude=exclude, bias=bias,
                               max_batches=max_batches, distributed=reduce)
            for m, d in zip(models, streams)
        ]  # fmt: skip
        return regmean_from_statistics(models, stats, alpha=alpha, ridge=ridge)
    merged = _data.averaged_copy(models)
    layers = _linear_layers(merged, include, exclude)
    first = list(_data.limited(streams[0], 1))
    _, calls, _ = collect_inputs(merged, layers, first, bias)  # the forward's layer order
    for name in forward_order(calls, layers):
        stop = name if calls.count(name) == 1 else None
        stats = []
        for i, d in enumerate(streams):
            accs, _, _ = collect_inputs(
                merged, {name: layers[name]}, _data.limited(d, max_batches), bias, stop
            )
            s = RegMeanStatistics(accs, bias)
            if reduce:
                s.all_reduce()
            _require_samples(s, f"models[{i}] (through the merged model)")
            stats.append(s)
        _solve_layers(merged, models, stats, [name], float(alpha), float(ridge))
    return merged
