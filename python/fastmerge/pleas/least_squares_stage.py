"""PLeaS step 2: fit every merged Conv/Linear layer to the original models by least squares.

For a layer with input group ``gi`` and output group ``go`` (their
:class:`~fastmerge.pleas.PartialLayout` ``[merged | only-A | only-B]``), the merged layer's
inputs and targets are laid out like the merged model's units:

* inputs ``X~ = [avg(x_a[merged_a], x_b[merged_b]) | x_a[only_a] | x_b[only_b]]`` along the
  channel axis (dim 1 of a conv input, the last axis of a Linear input); an input that is
  not permuted (the model's input, or an excluded group) is ``avg(x_a, x_b)``;
* targets ``Y~``: the layer's outputs (before any norm or nonlinearity) laid out the same
  way by the output group; an output that is not permuted (the classifier) has the target
  ``avg(y_a, y_b)`` (the average logits).

Every layer accumulates ``X~^T X~`` and ``X~^T Y~`` over the data in a
:class:`~fastmerge.LeastSquares` (convs through ``update_conv``: one sample per output pixel)
and is solved in closed form with the only-A <-> only-B blocks held at zero: only-A outputs
may use the merged and only-A inputs, only-B outputs the merged and only-B inputs, merged
outputs every input. By default all layers are independent (inputs from the original
models, one pass over the data); ``sequential=True`` solves the layers in graph order from
the merged model's own inputs (BatchNorm statistics re-estimated before each layer).
"""

from __future__ import annotations

import itertools
import warnings
from collections import deque
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import nn

from ..dist import all_reduce_values, should_reduce
from ..least_squares import LeastSquares
from ._common import _batch_list, _call, _device_of, _first_input, _to_device
from .groups import PermutationSpec
from .matching import PartialLayout

__all__ = ["LayerFit", "recompute_batchnorm", "solve_least_squares"]

_BN = nn.modules.batchnorm._BatchNorm


class LayerFit(NamedTuple):
    """One layer's least-squares objective, the mean over samples of ``||W x~ + b - y~||^2``,
    with the weights the merged model had before the solve (``before``) and the solution
    (``after``); ``samples`` is the number of samples (rows; output pixels for a conv).

    Example:
        >>> fit = fastmerge.pleas.LayerFit(before=2.0, after=0.5, samples=64)
        >>> fit.after < fit.before
        True
    """

    before: float
    after: float
    samples: int


def recompute_batchnorm(
    model: nn.Module, data: Iterable[Any], *, distributed: Optional[bool] = None
) -> nn.Module:
    """Re-estimate every BatchNorm layer's running statistics of ``model`` on ``data``, in
    place, and return ``model``.

    The statistics are reset and re-accumulated as a cumulative average over the batches
    (``momentum=None``) in forward passes without gradients with only the BatchNorm layers
    in train mode (dropout and the rest stay in eval mode). The training flags and momenta
    are restored afterwards. A model without BatchNorm is returned unchanged.

    With ``distributed`` (default: when a torch.distributed process group of more than one
    rank is initialized) each rank passes its own shard of the data, and the running means
    and variances are then averaged over every rank's batches (each layer's averages
    weighted by its batch count, in float64), so every rank ends with the statistics of
    all the batches, as one process would compute them up to rounding. A rank may then
    have no batches.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> data = [torch.randn(32, 3) + 5 for _ in range(2)]
        >>> _ = fastmerge.pleas.recompute_batchnorm(model, data)
        >>> int(model[1].num_batches_tracked), model.training
        (2, True)
    """
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return model
    reduce = should_reduce(distributed)
    batches = _batch_list(data)
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in bns]
    device = _device_of(model)
    n = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for batch in batches:
                _call(model, _to_device(_first_input(batch), device))
                n += 1
    finally:
        for m, flag in flags:
            m.training = flag
        for m, momentum in momenta:
            m.momentum = momentum
    if reduce:
        n = _average_batchnorm_over_ranks(bns, n)
    if n == 0:
        raise ValueError("data is empty: it yielded no batches")
    return model


def _average_batchnorm_over_ranks(bns: list[nn.Module], n_batches: int) -> int:
    """Average the running statistics of `bns` over the ranks, weighted by how many batches
    each layer saw on each rank (one all_reduce); returns the total number of batches."""
    device = bns[0].running_mean.device
    parts = [torch.tensor([float(n_batches)], dtype=torch.float64, device=device)]
    for m in bns:
        seen = float(m.num_batches_tracked)
        parts += [
            torch.tensor([seen], dtype=torch.float64, device=device),
            seen * m.running_mean.to(device, torch.float64),
            seen * m.running_var.to(device, torch.float64),
        ]
    sizes = [p.numel() for p in parts]
    totals = all_reduce_values(torch.cat(parts).tolist())
    pieces = torch.split(torch.tensor(totals, dtype=torch.float64), sizes)
    for i, m in enumerate(bns):
        seen, mean_sum, var_sum = pieces[1 + 3 * i : 4 + 3 * i]
        if float(seen) > 0:
            with torch.no_grad():
                m.running_mean.copy_(mean_sum / seen)
                m.running_var.copy_(var_sum / seen)
                m.num_batches_tracked.fill_(int(seen))
    return int(pieces[0])


def _layout_features(
    xa: torch.Tensor, xb: torch.Tensor, layout: Optional[PartialLayout], dim: int
) -> torch.Tensor:
    """``[avg of matched | a only | b only]`` along ``dim``; the average when not permuted."""
    if layout is None:
        return 0.5 * (xa + xb)
    dev = xa.device
    merged = 0.5 * (
        xa.index_select(dim, layout.merged_a.to(dev))
        + xb.index_select(dim, layout.merged_b.to(dev))
    )
    only_a = xa.index_select(dim, layout.only_a.to(dev))
    only_b = xb.index_select(dim, layout.only_b.to(dev))
    return torch.cat([merged, only_a, only_b], dim)


def _kinds(layout: PartialLayout) -> torch.Tensor:
    k = layout.n_kept
    return torch.tensor([0] * layout.n_merged + [1] * k + [2] * k)


def allowed_inputs(
    layout_in: Optional[PartialLayout], layout_out: Optional[PartialLayout], kernel: int = 1
) -> Optional[torch.Tensor]:
    """The ``(w_out, w_in * kernel)`` boolean mask of the inputs each merged output may use
    (None: all): only-A outputs do not read only-B inputs and vice versa. ``kernel`` is the
    number of kernel positions of a conv (its unfolded inputs are channel-major).

    Example:
        >>> from fastmerge.pleas.least_squares_stage import allowed_inputs
        >>> lay = fastmerge.pleas.PartialLayout(
        ...     "g", 2, torch.tensor([0]), torch.tensor([1]), torch.tensor([1]), torch.tensor([0]))
        >>> allowed_inputs(lay, lay).int().tolist()  # [merged | only-A | only-B]
        [[1, 1, 1], [1, 1, 0], [1, 0, 1]]
    """
    if layout_in is None or layout_out is None or not layout_in.n_kept or not layout_out.n_kept:
        return None
    ki, ko = _kinds(layout_in), _kinds(layout_out)
    cross = ((ko[:, None] == 1) & (ki[None, :] == 2)) | ((ko[:, None] == 2) & (ki[None, :] == 1))
    return (~cross).repeat_interleave(kernel, dim=1)


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def _check_layer(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        return
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        if module.padding_mode != "zeros":
            raise NotImplementedError(
                f"least squares: layer {name!r} uses padding_mode={module.padding_mode!r}; "
                f"only zero padding is supported"
            )
        return
    raise NotImplementedError(
        f"least squares: layer {name!r} is a {type(module).__name__}"
        + (f" with groups={module.groups}" if hasattr(module, "groups") else "")
        + "; only nn.Linear and nn.Conv2d with groups=1 are supported"
    )


class _Fit:
    """Accumulators of one layer."""

    def __init__(self, name: str, module: nn.Module, lin, lout) -> None:
        self.name, self.module, self.lin, self.lout = name, module, lin, lout
        self.conv = isinstance(module, nn.Conv2d)
        w = module.weight
        kernel = w[0, 0].numel() if self.conv else 1
        self.ls = LeastSquares(w.shape[1] * kernel, w.shape[0], bias=module.bias is not None)
        self.mask = allowed_inputs(lin, lout, kernel)
        self.yy = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.conv:
            self.ls.update_conv(x, y, self.module)
        else:
            self.ls.update(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
        self.yy += float(y.double().pow(2).sum())

    def objective(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> float:
        g, c = self.ls.gram, self.ls.cross
        w = weight.reshape(weight.shape[0], -1).to(g)
        if bias is not None:
            w = torch.cat([w, bias.to(g)[:, None]], 1)
        value = (w @ g * w).sum() - 2 * (w * c.T).sum() + self.yy
        return max(float(value), 0.0) / self.ls.count

    def solve(self, ridge: float) -> LayerFit:
        m = self.module
        before = self.objective(m.weight.detach(), None if m.bias is None else m.bias.detach())
        mask = None if self.mask is None else self.mask.to(self.ls.gram.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            weight, bias = self.ls.solve(ridge=ridge, blocks=mask)
        for w in caught:
            warnings.warn(f"layer {self.name!r}: {w.message}", w.category, stacklevel=3)
        after = self.objective(weight, bias)
        with torch.no_grad():
            m.weight.copy_(weight.reshape(m.weight.shape).to(m.weight))
            if bias is not None:
                m.bias.copy_(bias.to(m.bias))
        return LayerFit(before, after, self.ls.count)


def _capture(store: dict, side: str, name: str, module: nn.Module, want_input: bool):
    def hook(_m, args, out):
        x = args[0] if args else None
        store.setdefault((side, name), deque()).append(
            ((x.detach().clone() if want_input else None), out.detach().clone())
        )

    return module.register_forward_hook(hook)


def solve_least_squares(
    merged: nn.Module,
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    spec: PermutationSpec,
    layouts: Mapping[str, PartialLayout],
    *,
    ridge: float = 1e-4,
    sequential: bool = False,
    layers: Optional[Iterable[str]] = None,
    distributed: Optional[bool] = None,
) -> dict[str, LayerFit]:
    """Overwrite the Conv/Linear weights of ``merged`` (in place) with the least-squares fit of
    ``model_a`` and ``model_b``'s features; return each layer's objective before and after.

    ``merged`` must have the merged widths of ``layouts`` (as built by
    :func:`~fastmerge.pleas.merge_weights`): every permuted group ``g`` of ``spec`` is
    ``layouts[g].width`` wide in the order ``[merged | only-A | only-B]``. For every layer of
    ``spec.layers`` (or of ``layers``) the inputs and targets are laid out as in the module
    documentation, the Gram and cross matrices are summed over all batches of ``data`` (input
    batches or ``(input, ...)`` tuples; the original models run in eval mode without
    gradients), and each output block is solved over its allowed inputs with the ridge
    ``ridge * trace(G) / d`` (:meth:`fastmerge.LeastSquares.solve`). A block that is not
    positive definite is solved by a pseudo-inverse with a ``RuntimeWarning`` naming the
    layer. With ``sequential=True`` the layers are solved one by one in graph order from the
    merged model's own inputs (its BatchNorm statistics re-estimated on ``data`` before each
    layer): one or two passes over the data per layer instead of one in all. The BatchNorm
    statistics of ``merged`` are not re-estimated at the end: call
    :func:`recompute_batchnorm`.

    With ``distributed`` (default: when a torch.distributed process group of more than one
    rank is initialized) each rank passes its own shard of the data; the Gram and cross
    matrices are summed over the ranks (:meth:`fastmerge.LeastSquares.all_reduce`) before
    the solves, so every rank writes the same weights into its ``merged``.

    Raises:
        NotImplementedError: a layer that is not ``nn.Linear`` or ``nn.Conv2d`` (groups=1,
            zero padding).
        ValueError: empty ``data``, a layout that does not fit its group, ``ridge < 0``.

    Example:
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> a = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
        >>> b = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
        >>> data = [torch.randn(64, 3, dtype=torch.float64) for _ in range(2)]
        >>> spec = fastmerge.pleas.permutation_groups(a, data[0])
        >>> layouts = fastmerge.pleas.layouts_for(fastmerge.pleas.match(a, b, data, spec), 0.5)
        >>> merged = fastmerge.pleas.merge_weights(a, b, spec, layouts)
        >>> fits = fastmerge.pleas.solve_least_squares(merged, a, b, data, spec, layouts)
        >>> fits["2"].after < fits["2"].before, merged[0].weight.shape
        (True, torch.Size([6, 3]))
        >>> round(fits["0"].before, 12)  # the first layer's average is exact already
        0.0
    """
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    batches = _batch_list(data)
    names = list(spec.layers) if layers is None else list(layers)
    mods = {n: dict(m.named_modules()) for n, m in (("a", model_a), ("b", model_b), ("m", merged))}
    fits: dict[str, _Fit] = {}
    for name in names:
        if name not in spec.layers:
            raise ValueError(f"layers: {name!r} is not a Conv/Linear layer of spec")
        module = mods["m"].get(name)
        if module is None:
            raise ValueError(f"merged has no module {name!r}")
        _check_layer(name, module)
        lg = spec.layers[name]
        lin = None if lg.input is None else layouts[lg.input]
        lout = None if lg.output is None else layouts[lg.output]
        for role, lay, size in (
            ("input", lin, module.weight.shape[1]),
            ("output", lout, module.weight.shape[0]),
        ):
            if lay is not None and lay.width != size:
                raise ValueError(
                    f"layer {name!r}: its {role} group {lay.name!r} is {lay.width} units wide "
                    f"in the layout but {size} in merged; was merged built from these layouts?"
                )
        fits[name] = _Fit(name, module, lin, lout)

    def accumulate(todo: list[str]) -> int:
        return _accumulate(merged, model_a, model_b, batches, mods, fits, todo, sequential)

    return fit_rounds(
        names,
        fits,
        accumulate,
        [model_a, model_b, merged],
        merged,
        batches,
        ridge=ridge,
        sequential=sequential,
        distributed=distributed,
    )


def fit_rounds(
    names: list[str],
    fits: Mapping[str, Any],
    accumulate: Callable[[list[str]], int],
    models: Sequence[nn.Module],
    merged: nn.Module,
    batches: list[Any],
    *,
    ridge: float,
    sequential: bool,
    distributed: Optional[bool],
) -> dict[str, LayerFit]:
    """The accumulate-and-solve rounds of the least-squares stage (two models or N): one round
    over all layers, or with `sequential` one per layer in order after re-estimating the merged
    model's BatchNorm statistics; `accumulate(todo)` feeds the layers of `todo` and returns the
    number of batches; sums over the ranks under `distributed`. Restores every module's
    training flag."""
    reduce = should_reduce(distributed)
    rounds = [[n] for n in names] if sequential else [names]
    out: dict[str, LayerFit] = {}
    flags = [(m, m.training) for m in itertools.chain(*(x.modules() for x in models))]
    try:
        for todo in rounds:
            if sequential:
                recompute_batchnorm(merged, batches, distributed=reduce)
            n = accumulate(todo)
            if reduce:  # every rank reaches the collectives, then all raise alike
                n = _sum_over_ranks([fits[name] for name in todo], n)
            if n == 0:
                raise ValueError("data is empty: it yielded no batches")
            for name in todo:
                out[name] = fits[name].solve(ridge)
    finally:
        for m, flag in flags:
            m.training = flag
    return {name: out[name] for name in names}


def _sum_over_ranks(fits: list[_Fit], n_batches: int) -> int:
    """Sum the layers' accumulators and target norms over the ranks; returns the total
    number of batches. The same layers in the same order on every rank."""
    totals = all_reduce_values([float(n_batches)] + [fit.yy for fit in fits])
    for fit, yy in zip(fits, totals[1:]):
        fit.ls.all_reduce()
        fit.yy = yy
    return int(totals[0])


def _accumulate(merged, model_a, model_b, batches, mods, fits, todo, sequential) -> int:
    """Feed the layers of `todo` from every batch; returns the number of batches."""
    store: dict = {}
    handles = []
    dev_a, dev_b, dev_m = _device_of(model_a), _device_of(model_b), _device_of(merged)
    try:
        for name in todo:
            handles.append(_capture(store, "a", name, mods["a"][name], not sequential))
            handles.append(_capture(store, "b", name, mods["b"][name], not sequential))
            if sequential:
                handles.append(_capture(store, "m", name, mods["m"][name], True))
        for m in (model_a, model_b, merged):
            m.eval()
        n = 0
        with torch.no_grad():
            for batch in batches:
                x = _first_input(batch)
                _call(model_a, _to_device(x, dev_a))
                _call(model_b, _to_device(x, dev_b))
                if sequential:
                    _call(merged, _to_device(x, dev_m))
                for name in todo:
                    fit = fits[name]
                    qa, qb = store.get(("a", name), deque()), store.get(("b", name), deque())
                    qm = store.get(("m", name), deque())
                    if len(qa) != len(qb) or (sequential and len(qm) != len(qa)):
                        raise ValueError(
                            f"layer {name!r} ran a different number of times in the models "
                            f"on the same batch; they do not have the same architecture"
                        )
                    dim = _channel_dim(fit.module)
                    while qa:
                        (xa, ya), (xb, yb) = qa.popleft(), qb.popleft()
                        yb = yb.to(ya.device)
                        if sequential:
                            xm = qm.popleft()[0].to(ya.device)
                        else:
                            xm = _layout_features(xa, xb.to(xa.device), fit.lin, dim)
                        fit.add(xm, _layout_features(ya, yb, fit.lout, dim))
                n += 1
    finally:
        for h in handles:
            h.remove()
    return n
