"""Mode connectivity: the straight path between two models and its loss/accuracy barrier.

:func:`interpolate` builds the model ``(1 - alpha) * theta_A + alpha * theta_B``;
:func:`interpolation_curve` evaluates it along a grid of alphas (optionally re-estimating
BatchNorm statistics at each alpha, and optionally aligning model B's units to model A's
first with PLeaS' matching, :func:`permutation_align`) and returns a :class:`Curve` with
the barrier of METHODS.md::

    barrier = max_a [ L(theta_a) - ((1 - a) L(theta_A) + a L(theta_B)) ]

(the sign flipped for metrics where higher is better, such as accuracy). WSA, alignment,
and both together are compared by computing the curve of each pair of models.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..pleas._common import _first_input
from ..pleas.groups import apply_permutation, permutation_groups
from ..pleas.least_squares_stage import recompute_batchnorm
from ..pleas.matching import check_same_architecture, match
from ..pleas.multi_matching import align_many
from ..pleas.weight_matching import weight_matching
from ._display import new_figure, progress_bar, save_png

Evaluate = Callable[[nn.Module], Union[float, Mapping[str, float]]]
ALIGN_METHODS = ("permute", "weights")
#: The metric name under which an ``evaluate`` that returns a bare number is recorded.
SCALAR_METRIC = "value"
_HIGHER_IS_BETTER_HINTS = ("acc", "top1", "top5", "f1", "auc", "precision", "recall", "score")


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update((n, b) for n, b in model.named_buffers(remove_duplicate=False) if b is not None)
    return tensors


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite real number, got {alpha!r}")
    return float(alpha)


def interpolate(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """The model ``(1 - alpha) * model_a + alpha * model_b``, as a new module.

    A deep copy of ``model_a`` in which every floating-point parameter and buffer (BatchNorm
    running statistics included) is ``(1 - alpha) * a + alpha * b``; integer buffers (such as
    ``num_batches_tracked``) and the training flag come from ``model_a``. ``alpha = 0`` gives
    ``model_a``'s values exactly and ``alpha = 1`` gives ``model_b``'s. Half-precision tensors
    are combined in float32 and rounded once.

    ``alpha`` outside [0, 1] is allowed and extrapolates along the same line (e.g. -0.5 goes
    half the distance beyond model A, away from B).

    Interpolated BatchNorm statistics are not the statistics of the interpolated network:
    re-estimate them on data (``fastmerge.pleas.recompute_batchnorm``, or ``bn_data`` of
    :func:`interpolation_curve`) before evaluating a model with BatchNorm.

    Raises:
        ValueError: the models differ in architecture (naming the first parameter or buffer
            whose name or shape differs), or ``alpha`` is not a finite number.

    Example:
        >>> a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        >>> mid = fastmerge.wsa.interpolate(a, b, 0.5)
        >>> torch.allclose(mid.weight, (a.weight + b.weight) / 2)
        True
        >>> torch.equal(fastmerge.wsa.interpolate(a, b, 1.0).weight, b.weight)
        True
    """
    alpha = _check_alpha(alpha)
    check_same_architecture(model_a, model_b)
    out = copy.deepcopy(model_a)
    tensors_b = _named_tensors(model_b)
    with torch.no_grad():
        done: set[int] = set()
        for name, t in _named_tensors(out).items():
            if id(t) in done or not t.is_floating_point():
                continue
            done.add(id(t))  # tied weights appear under several names: mix them once
            t.copy_(_mix(t, tensors_b[name], alpha))
    return out


def _mix(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    work = torch.promote_types(a.dtype, torch.float32)
    b = b.to(device=a.device, dtype=work)
    return a.to(work).mul(1.0 - alpha).add_(b, alpha=alpha)


def permutation_align(
    model_a: nn.Module,
    model_b: Union[nn.Module, Sequence[nn.Module]],
    data: Iterable[Any],
    *,
    cost: str = "neg_sq_distance",
    distributed: Optional[bool] = None,
    method: str = "activations",
) -> Union[nn.Module, list[nn.Module]]:
    """A copy of ``model_b`` with its units permuted to line up with ``model_a``'s.

    ``model_b`` may also be a list or tuple of models: then every one of them is aligned
    to ``model_a`` (:func:`fastmerge.pleas.align_many` with ``model_a`` as the reference,
    one pass over ``data`` for all of them; with ``method="weights"`` each is weight-matched
    to ``model_a``) and the list of aligned copies is returned.

    Full permutation alignment (Git Re-Basin activation matching) with PLeaS' machinery:
    the permutation groups of ``model_a`` (:func:`fastmerge.pleas.permutation_groups`,
    traced on the first batch of ``data``), one exact assignment per group from the models'
    activations on ``data`` (:func:`fastmerge.pleas.match`), then
    :func:`fastmerge.pleas.apply_permutation`. The copy computes the same function as
    ``model_b``. ``method="weights"`` matches the weights instead
    (:func:`fastmerge.pleas.weight_matching`, data-free: only the first batch of ``data`` is
    read, to trace the model).

    Args:
        model_a, model_b: two models of the same architecture (or ``model_b`` a list of them).
        data: iterable of input batches or ``(input, target, ...)`` tuples.
        cost: the matching similarity (see :func:`fastmerge.pleas.match`).
        distributed: match on every rank's shard of the data (each rank at least one
            batch; every rank gets the same permutation), as for
            :func:`fastmerge.pleas.match`; ``None``: when a torch.distributed process
            group of more than one rank is initialized.
        method: ``"activations"`` (default) or ``"weights"``.

    Example:
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> a = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
        >>> spec = fastmerge.pleas.permutation_groups(a, torch.randn(2, 4).double())
        >>> b = fastmerge.pleas.apply_permutation(a, spec, {"0": torch.randperm(6)})
        >>> aligned = fastmerge.wsa.permutation_align(a, b, [torch.randn(64, 4).double()])
        >>> torch.equal(aligned[0].weight, a[0].weight)
        True
        >>> c = fastmerge.pleas.apply_permutation(a, spec, {"0": torch.randperm(6)})
        >>> both = fastmerge.wsa.permutation_align(a, [b, c], [torch.randn(64, 4).double()])
        >>> [torch.equal(m[0].weight, a[0].weight) for m in both]
        [True, True]
    """
    if method not in ("activations", "weights"):
        raise ValueError(f"method must be 'activations' or 'weights', got {method!r}")
    if isinstance(model_b, (list, tuple)):
        if method == "weights":  # data-free: each model matched to model_a on its own
            batches = _reusable(data, "data")
            return [permutation_align(model_a, m, batches, method="weights") for m in model_b]
        aligned = align_many([model_a, *model_b], data, cost=cost, distributed=distributed)
        return aligned[1:]
    check_same_architecture(model_a, model_b)
    batches = _reusable(data, "data")
    try:
        first = next(iter(batches))
    except StopIteration:
        raise ValueError("data is empty: it yielded no batches") from None
    device = next(iter(_named_tensors(model_a).values()), torch.empty(0)).device
    example = _first_input(first)
    example = example.to(device) if isinstance(example, torch.Tensor) else example
    spec = permutation_groups(model_a, example)
    if method == "weights":
        return weight_matching(model_a, model_b, spec=spec).apply(model_b)
    matches = match(model_a, model_b, batches, spec, cost=cost, distributed=distributed)
    return apply_permutation(model_b, spec, {name: m.perm_b for name, m in matches.items()})


def _reusable(data: Any, what: str) -> Iterable[Any]:
    """``data`` as something that can be iterated more than once (an iterator is listed)."""
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"{what} must be an iterable of input batches (or of (input, target) tuples), got "
            f"{type(data).__name__}; wrap a single batch in a list: [x]"
        )
    return list(data) if iter(data) is data else data


@dataclass
class Curve:
    """Metrics of the models along the path between two models.

    ``alphas[i]`` is the interpolation coefficient of point ``i`` (0 is model A, 1 is
    model B) and ``metrics[name][i]`` the metric ``name`` there.

    Example:
        >>> curve = fastmerge.wsa.Curve([0.0, 0.5, 1.0], {"loss": [0.2, 0.9, 0.4]})
        >>> round(curve.barrier("loss"), 6)  # 0.9 - (0.2 + 0.4) / 2
        0.6
        >>> curve.endpoints("loss")
        (0.2, 0.4)
    """

    alphas: list[float]
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.alphas = [_check_alpha(a) for a in self.alphas]
        if not self.alphas:
            raise ValueError("a curve needs at least one alpha")
        self.metrics = {str(k): [float(x) for x in v] for k, v in dict(self.metrics).items()}
        for name, values in self.metrics.items():
            if len(values) != len(self.alphas):
                raise ValueError(
                    f"metric {name!r} has {len(values)} values for {len(self.alphas)} alphas"
                )

    def _values(self, metric: Optional[str]) -> tuple[str, list[float]]:
        if metric is None:
            if "loss" in self.metrics:
                metric = "loss"
            elif len(self.metrics) == 1:
                metric = next(iter(self.metrics))
            else:
                raise ValueError(
                    f"the curve has several metrics ({', '.join(self.metrics)}) and no 'loss': "
                    "name one"
                )
        if metric not in self.metrics:
            raise KeyError(f"no metric {metric!r} in the curve (it has: {', '.join(self.metrics)})")
        return metric, self.metrics[metric]

    def _index_of(self, alpha: float) -> int:
        for i, a in enumerate(self.alphas):
            if a == alpha:
                return i
        raise ValueError(
            f"the curve has no point at alpha={alpha:g}; endpoints and barriers need the alphas "
            "0 and 1 on the curve"
        )

    def endpoints(self, metric: Optional[str] = None) -> tuple[float, float]:
        """The metric at model A (alpha 0) and at model B (alpha 1)."""
        _, values = self._values(metric)
        return values[self._index_of(0.0)], values[self._index_of(1.0)]

    def barrier(
        self, metric: Optional[str] = None, *, higher_is_better: Optional[bool] = None
    ) -> float:
        """``max_a [m(a) - ((1 - a) m(0) + a m(1))]`` over the alphas in [0, 1], or with the
        sign flipped (the drop below the line) when higher is better.

        ``higher_is_better=None`` guesses from the name: accuracy-like names (containing
        ``acc``, ``top1``, ``f1``, ``auc``, ``score``, ...) are higher-is-better, anything
        else (``loss``, ``error``, ``value``) lower-is-better. ``metric=None`` takes ``"loss"``
        or the curve's only metric. The barrier is never negative (the endpoints give 0).
        """
        name, values = self._values(metric)
        if higher_is_better is None:
            higher_is_better = any(hint in name.lower() for hint in _HIGHER_IS_BETTER_HINTS)
        start, end = self.endpoints(name)
        sign = -1.0 if higher_is_better else 1.0
        return max(
            sign * (v - ((1.0 - a) * start + a * end))
            for a, v in zip(self.alphas, values)
            if 0.0 <= a <= 1.0
        )

    def to_dict(self) -> dict:
        """A JSON-ready dict: alphas, metrics, and each metric's endpoints and barrier (when
        the curve has alphas 0 and 1)."""
        out: dict[str, Any] = {"alphas": list(self.alphas), "metrics": dict(self.metrics)}
        if 0.0 in self.alphas and 1.0 in self.alphas:
            out["endpoints"] = {m: list(self.endpoints(m)) for m in self.metrics}
            out["barrier"] = {m: self.barrier(m) for m in self.metrics}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Curve:
        """The curve back from :meth:`to_dict`."""
        return cls(list(data["alphas"]), dict(data["metrics"]))

    def plot(self, path, metrics: Optional[Sequence[str]] = None) -> None:
        """Write a PNG with one panel per metric (default: all) against alpha.

        Needs matplotlib (``pip install 'fastmerge[plot]'``); raises ImportError otherwise.
        """
        plot_curves({"": self}, path, metrics)


def plot_curves(curves: Mapping[str, Curve], path, metrics: Optional[Sequence[str]] = None) -> None:
    """Write a PNG comparing several curves (e.g. plain, WSA, aligned, both): one panel per
    metric, one line per curve, labelled with its barrier.

    Needs matplotlib (``pip install 'fastmerge[plot]'``); raises ImportError otherwise.
    """
    if not curves:
        raise ValueError("curves is empty: nothing to plot")
    names = list(metrics) if metrics is not None else _all_metrics(curves.values())
    if not names:
        raise ValueError("no metric to plot")
    fig = new_figure((4.2 * len(names), 3.2))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, metric in zip(axes, names):
        for label, curve in curves.items():
            if metric not in curve.metrics:
                continue
            text = label
            if 0.0 in curve.alphas and 1.0 in curve.alphas:
                text = f"{label} (barrier {curve.barrier(metric):.3g})".strip()
            ax.plot(curve.alphas, curve.metrics[metric], marker="o", markersize=3, label=text)
        for edge in (0.0, 1.0):
            ax.axvline(edge, color="grey", linewidth=0.6, linestyle=":")
        ax.set_xlabel("alpha (0 = model A, 1 = model B)")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    save_png(fig, path)


def _all_metrics(curves: Iterable[Curve]) -> list[str]:
    seen: dict[str, None] = {}
    for curve in curves:
        seen.update(dict.fromkeys(curve.metrics))
    return list(seen)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for m in model.modules()
    )


def _alpha_grid(alphas: Union[int, Sequence[float]]) -> list[float]:
    if isinstance(alphas, bool):
        raise TypeError("alphas must be a number of points or a sequence of alphas, got a bool")
    if isinstance(alphas, numbers.Integral):
        if alphas < 2:
            raise ValueError(f"alphas must be at least 2 points (0 and 1), got {alphas}")
        return [i / (int(alphas) - 1) for i in range(int(alphas))]
    grid = [_check_alpha(a) for a in alphas]
    if not grid:
        raise ValueError("alphas is empty")
    return grid


def _as_metrics(result: Any, alpha: float) -> dict[str, float]:
    if isinstance(result, Mapping):
        return {str(k): float(v) for k, v in result.items()}
    if isinstance(result, torch.Tensor) and result.numel() == 1:
        return {SCALAR_METRIC: float(result)}
    if isinstance(result, numbers.Real) and not isinstance(result, bool):
        return {SCALAR_METRIC: float(result)}
    raise TypeError(
        f"evaluate must return a number or a mapping of metric name -> number; at alpha={alpha:g}"
        f" it returned {type(result).__name__}"
    )


def interpolation_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    evaluate: Evaluate,
    *,
    alphas: Union[int, Sequence[float]] = 21,
    bn_data: Optional[Iterable[Any]] = None,
    align: Optional[str] = None,
    align_data: Optional[Iterable[Any]] = None,
    progress: bool = True,
) -> Curve:
    """Evaluate the models on the straight path from ``model_a`` to ``model_b``.

    Args:
        model_a, model_b: two models of the same architecture.
        evaluate: called with each interpolated model (in eval mode, without gradients);
            returns a number
            (recorded as metric ``"value"``) or a mapping such as
            ``{"loss": ..., "accuracy": ...}`` with the same keys every time.
        alphas: a number of evenly spaced points from 0 to 1 (default 21), or the alphas
            themselves (values outside [0, 1] extrapolate; barriers use the points in
            [0, 1] and need 0 and 1 among them).
        bn_data: batches (or ``(input, target)`` tuples) on which every interpolated model's
            BatchNorm running statistics are re-estimated before it is evaluated
            (:func:`fastmerge.pleas.recompute_batchnorm`); None keeps the interpolated
            statistics (with a warning when the models have BatchNorm).
        align: None, or ``"permute"`` to first permute ``model_b``'s units to match
            ``model_a``'s (:func:`permutation_align`, full permutation), or ``"weights"`` to
            do so by Git Re-Basin weight matching (:func:`fastmerge.pleas.weight_matching`,
            data-free: only one batch is read, to trace the model).
        align_data: batches for the alignment's activations; default ``bn_data``.
        progress: show a tqdm progress bar over the alphas (if tqdm is installed).

    Returns:
        A :class:`Curve`; ``curve.barrier("loss")`` is the loss barrier.

    Raises:
        ValueError: different architectures (naming the parameter), an unknown ``align``,
            ``align="permute"`` or ``"weights"`` without data, or ``evaluate`` returning
            different metrics at different alphas.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> a, b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
        >>> x = torch.randn(32, 4)
        >>> y = x.sum(1, keepdim=True)
        >>> mse = lambda m: {"loss": float(((m(x) - y) ** 2).mean())}
        >>> curve = fastmerge.wsa.interpolation_curve(a, b, mse, alphas=5, progress=False)
        >>> curve.alphas
        [0.0, 0.25, 0.5, 0.75, 1.0]
        >>> curve.barrier("loss") >= 0
        True
    """
    if not callable(evaluate):
        raise TypeError(f"evaluate must be callable, got {type(evaluate).__name__}")
    if align is not None and align not in ALIGN_METHODS:
        raise ValueError(f"align must be None, 'permute' or 'weights', got {align!r}")
    check_same_architecture(model_a, model_b)
    grid = _alpha_grid(alphas)
    bn_batches = _reusable(bn_data, "bn_data") if bn_data is not None else None
    if bn_batches is None and _has_batchnorm(model_a):
        warnings.warn(
            "the models have BatchNorm layers but bn_data is None: the interpolated running "
            "statistics are not those of the interpolated networks (pass bn_data to "
            "re-estimate them at every alpha)",
            stacklevel=2,
        )
    if align is not None:
        data = align_data if align_data is not None else bn_batches
        if data is None:
            need = "data for the activations" if align == "permute" else "a batch to trace"
            raise ValueError(f"align={align!r} needs {need}: pass align_data or bn_data")
        method = "activations" if align == "permute" else "weights"
        model_b = permutation_align(model_a, model_b, data, distributed=False, method=method)
    metrics: dict[str, list[float]] = {}
    for i, alpha in enumerate(progress_bar(grid, progress, "interpolation", len(grid))):
        model = interpolate(model_a, model_b, alpha)
        if bn_batches is not None:
            recompute_batchnorm(model, bn_batches, distributed=False)  # rank-local, as evaluate
        model.eval()
        with torch.no_grad():
            point = _as_metrics(evaluate(model), alpha)
        if i == 0:
            metrics = {name: [] for name in point}
        elif point.keys() != metrics.keys():
            raise ValueError(
                f"evaluate returned metrics {sorted(point)} at alpha={alpha:g} but "
                f"{sorted(metrics)} before"
            )
        for name, value in point.items():
            metrics[name].append(value)
    return Curve(grid, metrics)
