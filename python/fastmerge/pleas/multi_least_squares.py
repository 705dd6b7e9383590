"""PLeaS step 2 with N models: fit every merged Conv/Linear layer to all N models' features.

The two-model stage (:func:`~fastmerge.pleas.solve_least_squares`) generalized: for a layer
with input group ``gi`` and output group ``go`` (their
:class:`~fastmerge.pleas.MultiLayout` ``[merged | only-0 | ... | only-(N-1)]``):

* inputs ``X~ = [mean_i x_i[merged[i]] | x_0[only[0]] | ... | x_{N-1}[only[N-1]]]`` along the
  channel axis; an input that is not permuted (the model's input, an excluded group) is
  ``mean_i x_i``;
* targets ``Y~``: the layer's raw outputs laid out the same way by the output group; an
  output that is not permuted (the classifier) has the target ``mean_i y_i`` (the average
  logits of the N models).

Each output block is solved in closed form over its allowed inputs: merged outputs read
every input, only-i outputs the merged and only-i inputs (the only-i <-> only-j blocks,
i != j, are held at zero). ``sequential=True`` takes the inputs from the merged model itself,
layer by layer in graph order. For N = 2 every accumulated number, and so the solution, is
bit for bit the two-model stage's.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from ._common import _batch_list, _call, _device_of, _first_input, _to_device
from .groups import PermutationSpec
from .least_squares_stage import LayerFit, _capture, _channel_dim, _check_layer, _Fit, fit_rounds
from .multi_layouts import MultiLayout
from .multi_matching import check_models

__all__ = ["allowed_inputs_many", "solve_least_squares_many"]


def _mean(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    total = ts[0]
    for t in ts[1:]:
        total = total + t
    return total / len(ts)


def _layout_features_many(
    xs: Sequence[torch.Tensor], layout: Optional[MultiLayout], dim: int
) -> torch.Tensor:
    """``[mean of merged | only-0 | ... | only-(N-1)]`` along ``dim``; the mean when not
    permuted."""
    if layout is None:
        return _mean(xs)
    dev = xs[0].device
    merged = _mean([x.index_select(dim, layout.merged[i].to(dev)) for i, x in enumerate(xs)])
    only = [x.index_select(dim, layout.only[i].to(dev)) for i, x in enumerate(xs)]
    return torch.cat([merged, *only], dim)


def _kinds(layout: MultiLayout) -> torch.Tensor:
    k = layout.n_kept
    return torch.tensor(
        [0] * layout.n_merged + [i + 1 for i in range(layout.n_models) for _ in range(k)]
    )


def allowed_inputs_many(
    layout_in: Optional[MultiLayout], layout_out: Optional[MultiLayout], kernel: int = 1
) -> Optional[torch.Tensor]:
    """The ``(w_out, w_in * kernel)`` boolean mask of the inputs each merged output may use
    (None: all): only-i outputs do not read only-j inputs for j != i.

    Example:
        >>> from fastmerge.pleas.multi_least_squares import allowed_inputs_many
        >>> lay = fastmerge.pleas.MultiLayout(
        ...     "g", 2, torch.tensor([[0], [1], [0]]), torch.tensor([[1], [0], [1]]))
        >>> allowed_inputs_many(lay, lay).int().tolist()  # [merged | only-0 | only-1 | only-2]
        [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]
    """
    if layout_in is None or layout_out is None or not layout_in.n_kept or not layout_out.n_kept:
        return None
    ki, ko = _kinds(layout_in), _kinds(layout_out)
    cross = (ko[:, None] > 0) & (ki[None, :] > 0) & (ko[:, None] != ki[None, :])
    return (~cross).repeat_interleave(kernel, dim=1)


class _MultiFit(_Fit):
    """The two-model accumulators of one layer with the N-model mask."""

    def __init__(self, name: str, module: nn.Module, lin, lout) -> None:
        super().__init__(name, module, None, None)
        self.lin, self.lout = lin, lout
        kernel = module.weight[0, 0].numel() if self.conv else 1
        self.mask = allowed_inputs_many(lin, lout, kernel)


def solve_least_squares_many(
    merged: nn.Module,
    models: Sequence[nn.Module],
    data: Iterable[Any],
    spec: PermutationSpec,
    layouts: Mapping[str, MultiLayout],
    *,
    ridge: float = 1e-4,
    sequential: bool = False,
    distributed: Optional[bool] = None,
) -> dict[str, LayerFit]:
    """Overwrite the Conv/Linear weights of ``merged`` (in place, built by
    :func:`~fastmerge.pleas.merge_weights_many` from ``layouts``) with the least-squares fit
    of the N ``models``' features (see the module documentation); return each layer's
    objective before and after as :class:`~fastmerge.pleas.LayerFit`. Arguments, ridge,
    ``sequential`` and ``distributed`` as for :func:`~fastmerge.pleas.solve_least_squares`;
    BatchNorm statistics are not re-estimated at the end.

    Raises:
        NotImplementedError: a layer that is not ``nn.Linear`` or ``nn.Conv2d`` (groups=1).
        ValueError: empty ``data``, fewer than 2 models, a layout that does not fit its group.

    Example:
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> ms = [nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
        ...       for _ in range(3)]
        >>> data = [torch.randn(64, 3, dtype=torch.float64)]
        >>> spec = fastmerge.pleas.permutation_groups(ms[0], data[0])
        >>> matches = fastmerge.pleas.match_many(ms, data, spec)
        >>> layouts = {g: fastmerge.pleas.multi_layout(m, 0.5) for g, m in matches.items()}
        >>> merged = fastmerge.pleas.merge_weights_many(ms, spec, layouts)
        >>> fits = fastmerge.pleas.solve_least_squares_many(merged, ms, data, spec, layouts)
        >>> fits["2"].after < fits["2"].before, merged[0].weight.shape  # 2 + 3 * 2 units
        (True, torch.Size([8, 3]))
    """
    models = check_models(models)
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    batches = _batch_list(data)
    names = list(spec.layers)
    mods = [dict(m.named_modules()) for m in models]
    mods_m = dict(merged.named_modules())
    fits: dict[str, _MultiFit] = {}
    for name in names:
        module = mods_m.get(name)
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
            if lay is not None and (lay.width != size or lay.n_models != len(models)):
                raise ValueError(
                    f"layer {name!r}: its {role} group {lay.name!r} is {lay.width} units wide "
                    f"for {lay.n_models} models in the layout but {size} in merged for "
                    f"{len(models)} models; was merged built from these layouts?"
                )
        fits[name] = _MultiFit(name, module, lin, lout)

    def accumulate(todo: list[str]) -> int:
        return _accumulate(merged, models, batches, mods, mods_m, fits, todo, sequential)

    return fit_rounds(
        names,
        fits,
        accumulate,
        [merged, *models],
        merged,
        batches,
        ridge=ridge,
        sequential=sequential,
        distributed=distributed,
    )


def _accumulate(merged, models, batches, mods, mods_m, fits, todo, sequential) -> int:
    """Feed the layers of `todo` from every batch; returns the number of batches."""
    store: dict = {}
    handles = []
    devs = [_device_of(m) for m in models]
    dev_m = _device_of(merged)
    sides = [str(i) for i in range(len(models))]
    try:
        for name in todo:
            for side, mm in zip(sides, mods):
                handles.append(_capture(store, side, name, mm[name], not sequential))
            if sequential:
                handles.append(_capture(store, "m", name, mods_m[name], True))
        for m in (*models, merged):
            m.eval()
        n = 0
        with torch.no_grad():
            for batch in batches:
                x = _first_input(batch)
                for model, dev in zip(models, devs):
                    _call(model, _to_device(x, dev))
                if sequential:
                    _call(merged, _to_device(x, dev_m))
                for name in todo:
                    fit = fits[name]
                    qs = [store.get((side, name), deque()) for side in sides]
                    qm = store.get(("m", name), deque())
                    if any(len(q) != len(qs[0]) for q in qs) or (
                        sequential and len(qm) != len(qs[0])
                    ):
                        raise ValueError(
                            f"layer {name!r} ran a different number of times in the models "
                            f"on the same batch; they do not have the same architecture"
                        )
                    dim = _channel_dim(fit.module)
                    while qs[0]:
                        pairs = [q.popleft() for q in qs]
                        dev = pairs[0][1].device
                        ys = [y.to(dev) for _, y in pairs]
                        if sequential:
                            xm = qm.popleft()[0].to(dev)
                        else:
                            xm = _layout_features_many(
                                [xi.to(pairs[0][0].device) for xi, _ in pairs], fit.lin, dim
                            )
                        fit.add(xm, _layout_features_many(ys, fit.lout, dim))
                n += 1
    finally:
        for h in handles:
            h.remove()
    return n
