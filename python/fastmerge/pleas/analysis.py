"""The axis analysis behind :func:`~fastmerge.pleas.permutation_groups`: a union-find.

Every axis of every tensor value of the traced graph is an element; a value is a :class:`_T`,
one element per axis. The rules tie the elements that must share one permutation (a layer's
output axis and the input axis of the layer that reads it, both operands of an add, a norm's
parameters and its channels) and *block* those that may not be permuted, with a reason.
Parameters and buffers are created once per tensor, so shared weights tie. :meth:`_Analysis.run`
walks the graph; which rule each op gets is the table of :mod:`fastmerge.pleas.op_rules`.
:meth:`_Analysis.spec` reads the result off the classes: a class with no reason is a
:class:`~fastmerge.pleas.PermutationGroup`, one that touches the model's input or output or
carries a reason is an :class:`~fastmerge.pleas.ExcludedGroup`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from .spec import Axis, ExcludedGroup, LayerGroups, PermutationGroup, PermutationSpec
from .tracing import _node_desc

__all__: list[str] = []


@dataclass(frozen=True)
class _T:
    """A tensor value in the graph: one union-find element per axis."""

    dims: tuple[int, ...]
    shape: tuple[int, ...]
    param: str | None = None  # canonical parameter/buffer name when the value is one

    @property
    def ndim(self) -> int:
        return len(self.dims)


class _Unknown:
    """A value that is not a tensor (a shape, a number, a string...): it ties nothing."""

    def __repr__(self) -> str:
        return "<non-tensor>"


_UNKNOWN = _Unknown()


def _iter_tensors(obj: Any) -> Iterator[_T]:
    """The :class:`_T` values anywhere in `obj` (nested tuples, lists and dicts)."""
    if isinstance(obj, _T):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _iter_tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _iter_tensors(o)


Rule = Callable[["_Analysis", fx.Node, tuple, dict, Any], Any]
"""``apply(analysis, node, args, kwargs, out) -> value`` (None: unsupported op)."""


class _Analysis:
    """Union-find over every axis of every tensor of the traced graph."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule):
        self.model = model
        self.gm = gm
        self.parent: list[int] = []
        self.size: list[int] = []
        self.axis: list[Axis | None] = []
        self.reasons: list[list[str]] = []
        self.io: list[set[str]] = []
        self.producer: dict[int, str] = {}
        self.consumer: dict[int, str] = {}
        self.layers: dict[str, tuple[int, int]] = {}
        self.values: dict[fx.Node, Any] = {}
        self.params: dict[str, _T] = {}
        self.canonical: dict[int, str] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        for name, t in model.named_parameters(remove_duplicate=False):
            self.canonical.setdefault(id(t), name)
            self.tensors[name] = t
        for name, t in model.named_buffers(remove_duplicate=False):
            if t is not None:
                self.canonical.setdefault(id(t), name)
                self.tensors[name] = t

    # union-find -----------------------------------------------------------------------------
    def new(self, size: int, axis: Axis | None = None, reason: str | None = None) -> int:
        e = len(self.parent)
        self.parent.append(e)
        self.size.append(int(size))
        self.axis.append(axis)
        self.reasons.append([reason] if reason else [])
        self.io.append(set())
        return e

    def find(self, e: int) -> int:
        root = e
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[e] != root:
            self.parent[e], e = root, self.parent[e]
        return root

    def tie(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            reason = f"internal: tied axes of sizes {self.size[ra]} and {self.size[rb]}"
            self.reasons[ra].append(reason)
        self.parent[max(ra, rb)] = min(ra, rb)

    def block(self, e: int, reason: str) -> None:
        self.reasons[e].append(reason)

    def fresh(self, shape: Sequence[int], reason: str | None = None) -> _T:
        return _T(tuple(self.new(s, reason=reason) for s in shape), tuple(int(s) for s in shape))

    # values -----------------------------------------------------------------------------------
    def param(self, name: str, axis_dims: Sequence[int] | None = None) -> _T | None:
        """Dims of a parameter/buffer (created once per tensor, so shared weights tie)."""
        t = self.tensors.get(name)
        if t is None:
            return None
        name = self.canonical[id(t)]
        if name not in self.params:
            dims = []
            for d, s in enumerate(t.shape):
                keep = axis_dims is None or d in axis_dims
                dims.append(self.new(s, axis=Axis(name, d) if keep else None))
            self.params[name] = _T(tuple(dims), tuple(t.shape), name)
        return self.params[name]

    def module_param(self, mname: str, pname: str, **kw) -> _T | None:
        module = self.gm.get_submodule(mname)
        if getattr(module, pname, None) is None:
            return None
        return self.param(f"{mname}.{pname}" if mname else pname, **kw)

    def like_meta(self, meta: Any, reason: str | None) -> Any:
        if isinstance(meta, TensorMetadata):
            return self.fresh(tuple(meta.shape), reason)
        if isinstance(meta, (tuple, list)):
            return type(meta)(self.like_meta(m, reason) for m in meta)
        return _UNKNOWN

    def opaque(self, node: fx.Node, args: Any, reason: str) -> Any:
        for t in _iter_tensors(args):
            for e in t.dims:
                self.block(e, reason)
        return self.like_meta(node.meta.get("tensor_meta"), reason)

    def matches(self, value: Any, meta: Any) -> bool:
        if isinstance(meta, TensorMetadata):
            return (
                isinstance(value, _T)
                and value.shape == tuple(meta.shape)
                and all(self.size[self.find(e)] == s for e, s in zip(value.dims, value.shape))
            )
        if isinstance(meta, (tuple, list)):
            return (
                isinstance(value, (tuple, list))
                and len(value) == len(meta)
                and all(self.matches(v, m) for v, m in zip(value, meta))
            )
        return not isinstance(value, _T)

    # axis rules (op_rules says which op gets which) -------------------------------------------
    def broadcast(self, tensors: Sequence[_T]) -> _T:
        shape = tuple(torch.broadcast_shapes(*[t.shape for t in tensors]))
        dims = []
        for i in range(1, len(shape) + 1):
            same = [t.dims[-i] for t in tensors if t.ndim >= i and t.shape[-i] == shape[-i]]
            for e in same[1:]:
                self.tie(same[0], e)
            dims.append(same[0])
        return _T(tuple(reversed(dims)), shape)

    def linear(self, name: str, x: _T, w: _T, b: _T | None) -> _T:
        self.tie(x.dims[-1], w.dims[1])
        if b is not None:
            self.tie(b.dims[0], w.dims[0])
        self.record_layer(name, w.dims[1], w.dims[0])
        return _T(x.dims[:-1] + (w.dims[0],), x.shape[:-1] + (w.shape[0],))

    def conv(
        self, name: str, x: _T, w: _T, b: _T | None, groups: int, transposed: bool, out: Any
    ) -> Any:
        if not isinstance(out, TensorMetadata):
            return _UNKNOWN
        k = w.ndim - 2
        c = x.ndim - k - 1
        for e in w.dims[2:]:
            self.block(e, f"kernel window axis of {name}")
        for e in x.dims[c + 1 :]:
            self.block(e, f"spatial axis of the input of {name}")
        in_e, out_e = (w.dims[0], w.dims[1]) if transposed else (w.dims[1], w.dims[0])
        cin = x.shape[c]
        if groups == 1:
            self.tie(x.dims[c], in_e)
        elif not transposed and groups == cin and w.shape[1] == 1 and w.shape[0] == cin:
            self.tie(x.dims[c], out_e)  # depthwise: channel k in -> channel k out
            in_e = out_e
        else:
            reason = f"grouped convolution {name} (groups={groups})"
            for e in (x.dims[c], in_e, out_e):
                self.block(e, reason)
        if b is not None:
            self.tie(b.dims[0], out_e)
        self.record_layer(name, in_e, out_e)
        spatial = self.fresh(tuple(out.shape)[c + 1 :], f"spatial axis of the output of {name}")
        return _T(x.dims[:c] + (out_e,) + spatial.dims, tuple(out.shape))

    def record_layer(self, name: str, in_e: int, out_e: int) -> None:
        self.layers.setdefault(name, (in_e, out_e))
        self.producer.setdefault(out_e, name)
        self.consumer.setdefault(in_e, name)

    def channel_params(self, x: _T, c: int, params: Sequence[_T | None]) -> _T:
        for p in params:
            if p is not None:
                self.tie(p.dims[0], x.dims[c])
        return x

    def layer_norm(self, x: _T, params: Sequence[_T | None], k: int) -> _T:
        for p in params:
            if p is not None:
                for i in range(k):
                    self.tie(p.dims[i], x.dims[x.ndim - k + i])
        return x

    def group_norm(self, name: str, x: _T, num_groups: int, params: Sequence[_T | None]) -> _T:
        if 1 < num_groups < x.shape[1]:
            self.block(x.dims[1], f"{name} normalizes {num_groups} groups of channels")
        return self.channel_params(x, 1, params)

    def pool(self, name: str, x: _T, k: int, out: Any) -> Any:
        if not isinstance(out, TensorMetadata) or len(out.shape) != x.ndim:
            return None
        reason = f"pooling window axis of {name}"
        for e in x.dims[-k:]:
            self.block(e, reason)
        return _T(x.dims[:-k] + self.fresh(tuple(out.shape)[-k:], reason).dims, tuple(out.shape))

    def permute(self, x: _T, order: Sequence[int]) -> _T:
        order = [o % x.ndim for o in order]
        return _T(tuple(x.dims[o] for o in order), tuple(x.shape[o] for o in order))

    def transpose(self, x: _T, d0: int, d1: int) -> _T:
        order = list(range(x.ndim))
        d0, d1 = d0 % x.ndim, d1 % x.ndim
        order[d0], order[d1] = order[d1], order[d0]
        return self.permute(x, order)

    def matmul(self, a: _T, b: _T) -> _T | None:
        if a.ndim < 2 or b.ndim < 2:
            return None
        self.tie(a.dims[-1], b.dims[-2])
        batch = self.broadcast([_T(a.dims[:-2], a.shape[:-2]), _T(b.dims[:-2], b.shape[:-2])])
        return _T(batch.dims + (a.dims[-2], b.dims[-1]), batch.shape + (a.shape[-2], b.shape[-1]))

    def sdpa(self, q: _T, k: _T, v: _T, mask: Any) -> _T | None:
        if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
            return None
        self.tie(q.dims[-1], k.dims[-1])
        self.tie(k.dims[-2], v.dims[-2])
        batch = self.broadcast([_T(t.dims[:-2], t.shape[:-2]) for t in (q, k, v)])
        if isinstance(mask, _T):
            scores = _T(
                batch.dims + (q.dims[-2], k.dims[-2]), batch.shape + (q.shape[-2], k.shape[-2])
            )
            self.broadcast([scores, mask])
        return _T(batch.dims + (q.dims[-2], v.dims[-1]), batch.shape + (q.shape[-2], v.shape[-1]))

    def reduce(self, x: _T, dim: Any, keepdim: bool) -> _T | None:
        if dim is None:
            dims_ = list(range(x.ndim))
        elif isinstance(dim, int):
            dims_ = [dim]
        elif isinstance(dim, (tuple, list)) and all(isinstance(d, int) for d in dim):
            dims_ = list(dim)
        else:
            return None
        red = {d % x.ndim for d in dims_} if x.ndim else set()
        dims, shape = [], []
        for i in range(x.ndim):
            if i not in red:
                dims.append(x.dims[i])
                shape.append(x.shape[i])
            elif keepdim:
                dims.append(self.new(1))
                shape.append(1)
        return _T(tuple(dims), tuple(shape))

    def layer_name(self, w: _T, node: fx.Node) -> str:
        if w.param is None:
            return node.name
        return w.param[: -len(".weight")] if w.param.endswith(".weight") else w.param

    def embedding(self, name: str, idx: _T, w: _T) -> _T:
        self.block(w.dims[0], f"vocabulary axis of {name}: rows are looked up by index")
        return _T(idx.dims + (w.dims[1],), idx.shape + (w.shape[1],))

    # the walk over the graph ------------------------------------------------------------------
    def run(self, apply: Rule) -> None:
        """Give every node of the graph its value, applying `apply` to each op node.

        `apply(analysis, node, args, kwargs, out)` returns the node's value (``out`` is its
        ``tensor_meta``), or None for an op it does not support: that op is then opaque.
        """
        for node in self.gm.graph.nodes:
            meta = node.meta.get("tensor_meta")
            if node.op == "placeholder":
                value = self.like_meta(meta, None)
                for t in _iter_tensors(value):
                    for e in t.dims:
                        self.io[e].add("input")
            elif node.op == "get_attr":
                value = self.param(node.target)
                if value is None:
                    value = self.like_meta(
                        meta, f"constant {node.target!r} is not a parameter or buffer"
                    )
            elif node.op == "output":
                for t in _iter_tensors(self.lookup(node.args)):
                    for e in t.dims:
                        self.io[e].add("output")
                continue
            else:
                args = self.lookup(node.args)
                kwargs = self.lookup(node.kwargs)
                try:
                    value = apply(self, node, args, kwargs, meta)
                except Exception as exc:  # never let an odd op crash the analysis
                    value = None
                    why = f"internal: could not analyse {_node_desc(node)}: {exc}"
                else:
                    why = f"unsupported operation at {_node_desc(node)}"
                if value is None or not self.matches(value, meta):
                    if value is not None:
                        why = f"internal: unexpected output shape at {_node_desc(node)}"
                    value = self.opaque(node, (args, kwargs), why)
            self.values[node] = value

    def lookup(self, obj: Any) -> Any:
        """`obj` with every graph node replaced by its value."""
        return fx.node.map_aggregate(
            obj, lambda a: self.values.get(a, _UNKNOWN) if isinstance(a, fx.Node) else a
        )

    # result -----------------------------------------------------------------------------------
    def spec(self) -> PermutationSpec:
        """The groups read off the union-find classes: permuted, or excluded with reasons."""
        classes: dict[int, list[int]] = {}
        for e in range(len(self.parent)):
            classes.setdefault(self.find(e), []).append(e)
        groups: dict[str, PermutationGroup] = {}
        excluded: list[ExcludedGroup] = []
        name_of: dict[int, str] = {}
        ordered = sorted(classes.items(), key=lambda kv: kv[0])
        for root, members in ordered:
            axes = tuple(self.axis[e] for e in members if self.axis[e] is not None)
            size = self.size[root]
            if not axes or size <= 1:
                continue
            producers = tuple(
                dict.fromkeys(self.producer[e] for e in members if e in self.producer)
            )
            consumers = tuple(
                dict.fromkeys(self.consumer[e] for e in members if e in self.consumer)
            )
            io = set().union(*(self.io[e] for e in members))
            reasons = list(dict.fromkeys(r for e in members for r in self.reasons[e]))
            if io:
                which = " and ".join(w for w in ("input", "output") if w in io)
                reasons.insert(0, f"touches the model's {which}")
            name = producers[0] if producers else f"{axes[0].name}[{axes[0].dim}]"
            name_of[root] = name
            if reasons:
                excluded.append(
                    ExcludedGroup(name, size, axes, producers, consumers, "; ".join(reasons))
                )
            else:
                groups[name] = PermutationGroup(name, size, axes, producers, consumers)
        layers = {}
        for lname, (in_e, out_e) in self.layers.items():
            gi, go = name_of.get(self.find(in_e)), name_of.get(self.find(out_e))
            layers[lname] = LayerGroups(gi if gi in groups else None, go if go in groups else None)
        return PermutationSpec(groups, layers, tuple(excluded))
