"""Axis rules of the ops that reshape, expand, index, concatenate or split tensors.

The shape-changing part of the per-op rules of :mod:`fastmerge.pleas.op_rules`, each a
function of the analysis (:class:`~fastmerge.pleas.analysis._Analysis`), the op's input
value(s) and its output ``tensor_meta``. An axis that keeps its size and position passes
through (its output axis is the same union-find element); one that is merged, split,
concatenated along or indexed is blocked, with a reason naming the op. A rule returns None
when it cannot follow the call (the op is then opaque).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch.fx.passes.shape_prop import TensorMetadata

from .analysis import _T, _UNKNOWN, _Analysis

__all__: list[str] = []


def _reshape(a: _Analysis, name: str, x: _T, out: Any) -> Any:
    """flatten/view/reshape/...: an axis keeping its size passes, merged or split are blocked."""
    if not isinstance(out, TensorMetadata):
        return None
    oshape = tuple(out.shape)
    odims: list[int | None] = [None] * len(oshape)
    ins = [i for i, s in enumerate(x.shape) if s != 1]
    outs = [j for j, s in enumerate(oshape) if s != 1]
    if 0 in x.shape or 0 in oshape:
        return None
    i = j = 0
    while i < len(ins) and j < len(outs):
        ci, cj = [ins[i]], [outs[j]]
        pi, po = x.shape[ins[i]], oshape[outs[j]]
        while pi != po:
            if pi < po:
                i += 1
                if i >= len(ins):
                    return None
                ci.append(ins[i])
                pi *= x.shape[ins[i]]
            else:
                j += 1
                if j >= len(outs):
                    return None
                cj.append(outs[j])
                po *= oshape[outs[j]]
        if len(ci) == 1 and len(cj) == 1:
            odims[cj[0]] = x.dims[ci[0]]
        else:
            reason = (
                f"{name} reshapes axes of sizes {[x.shape[k] for k in ci]} into "
                f"{[oshape[k] for k in cj]}"
            )
            for k in ci:
                a.block(x.dims[k], reason)
            for k in cj:
                odims[k] = a.new(oshape[k], reason=reason)
        i += 1
        j += 1
    if i != len(ins) or j != len(outs):
        return None
    dims = tuple(d if d is not None else a.new(oshape[k]) for k, d in enumerate(odims))
    return _T(dims, oshape)


def _cat(a: _Analysis, name: str, tensors: Sequence[_T], dim: int, stack: bool, out: Any) -> Any:
    """cat/stack: the other axes of all inputs are tied, the concatenated one is blocked."""
    if not tensors or not isinstance(out, TensorMetadata):
        return None
    nd = tensors[0].ndim
    if any(t.ndim != nd for t in tensors):
        return None
    d = dim % (nd + 1 if stack else nd)
    reason = f"{name} concatenates along this axis"
    dims = []
    for i in range(nd):
        if i == d and not stack:
            for t in tensors:
                a.block(t.dims[i], reason)
            continue
        for t in tensors[1:]:
            a.tie(tensors[0].dims[i], t.dims[i])
        dims.append(tensors[0].dims[i])
    dims.insert(d, a.new(out.shape[d], reason=reason))
    return _T(tuple(dims), tuple(out.shape))


def _split(a: _Analysis, name: str, x: _T, dim: int, out: Any) -> Any:
    """chunk/split: the split axis is blocked, the other axes pass to every piece."""
    if not isinstance(out, (tuple, list)):
        return None
    d = dim % x.ndim
    reason = f"{name} splits this axis"
    a.block(x.dims[d], reason)
    res = []
    for m in out:
        if not isinstance(m, TensorMetadata) or len(m.shape) != x.ndim:
            return None
        dims = list(x.dims)
        dims[d] = a.new(m.shape[d], reason=reason)
        res.append(_T(tuple(dims), tuple(m.shape)))
    return tuple(res)


def _expand(a: _Analysis, x: _T, out: Any) -> Any:
    """expand/expand_as: axes that keep their size pass, new and broadcast ones are fresh."""
    if not isinstance(out, TensorMetadata) or len(out.shape) < x.ndim:
        return None
    oshape = tuple(out.shape)
    lead = len(oshape) - x.ndim
    dims = [a.new(s) for s in oshape[:lead]]
    for i in range(x.ndim):
        same = x.shape[i] == oshape[lead + i]
        dims.append(x.dims[i] if same else a.new(oshape[lead + i]))
    return _T(tuple(dims), oshape)


def _getitem(a: _Analysis, name: str, x: Any, idx: Any) -> Any:
    """Basic indexing (integers, slices, None, ...): full slices pass, the rest is blocked."""
    if isinstance(x, (tuple, list)):
        if isinstance(idx, int):
            return x[idx]
        return None
    if not isinstance(x, _T):
        return _UNKNOWN
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in idx):
        return None
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if sum(1 for i in idx if i is Ellipsis) > 1 or n_real > x.ndim:
        return None
    full: list = []
    for i in idx:
        if i is Ellipsis:
            full.extend([slice(None)] * (x.ndim - n_real))
        else:
            full.append(i)
    full.extend([slice(None)] * (x.ndim - sum(1 for i in full if i is not None)))
    dims, shape, src = [], [], 0
    reason = f"{name} indexes this axis"
    for i in full:
        if i is None:
            dims.append(a.new(1))
            shape.append(1)
            continue
        e, s = x.dims[src], x.shape[src]
        src += 1
        if isinstance(i, int):
            a.block(e, reason)
        elif i == slice(None) or i.indices(s) == (0, s, 1):
            dims.append(e)
            shape.append(s)
        else:
            a.block(e, reason)
            n = len(range(*i.indices(s)))
            dims.append(a.new(n, reason=reason))
            shape.append(n)
    return _T(tuple(dims), tuple(shape))
