"""The per-op rules of the permutation-group analysis, as tables of handlers.

:func:`apply` gives a graph node its value from the rule its op has in one of three tables:
:data:`FUNCTION_RULES` (``call_function`` nodes, by function), :data:`METHOD_RULES`
(``call_method`` nodes, by tensor method name) and :data:`MODULE_RULES` (``call_module``
nodes, by module class, subclasses included). An op that is in no table is *opaque*: every
axis of its inputs and outputs is excluded, with a reason naming it. The tables are the list
of supported operations:

* ``Linear``/``F.linear``, ``Conv1d/2d/3d``/``F.conv*d`` (``groups=1`` or depthwise with
  multiplier 1; other grouped convolutions exclude their channels), ``ConvTranspose*d``
  (``groups=1``), ``Embedding``/``F.embedding`` (its embedding axis; the vocabulary axis is
  excluded).
* ``BatchNorm*d``/``SyncBatchNorm``/``F.batch_norm``, ``InstanceNorm*d``, ``LayerNorm``/
  ``F.layer_norm``, ``RMSNorm``, ``GroupNorm``/``F.group_norm`` (only with 1 or C groups),
  ``PReLU``: parameters and buffers follow the channels of their input.
* Elementwise ops with broadcasting (``+ - * /``, ``torch.add/mul/...``, ``where``,
  activations such as ReLU/GELU/SiLU/Sigmoid/Tanh/LeakyReLU/ELU/Hardswish/Softplus,
  dropout, identity, dtype/device casts): axes of equal size are tied.
* Softmax/log-softmax (equivariant along every axis); ``matmul``/``@``/``bmm`` (the
  contracted axes are tied); ``F.scaled_dot_product_attention``.
* Max/avg/adaptive/LP pooling (batch and channel axes pass through);
  ``flatten``/``view``/``reshape``/``squeeze``/``unsqueeze``/``unflatten`` when an axis keeps
  its size (flattening ``(N, C, 1, 1)`` keeps the channels; merging or splitting axes of size
  > 1, e.g. attention heads or flattening ``(N, C, 7, 7)``, excludes them);
  ``transpose``/``permute``/``.T``; ``mean``/``sum``/``amax``/``amin``/``logsumexp``;
  ``cat``/``stack`` (the concatenated axis is excluded), ``chunk``/``split`` (the split axis
  is excluded); basic indexing with integers, full slices, ``None`` and ``...``.
* Anything else (including modules fx treats as leaves, such as ``nn.MultiheadAttention``)
  is opaque: every axis of its inputs and outputs is excluded, with a reason naming it.

A rule returns the node's value (a :class:`~fastmerge.pleas.analysis._T` per output tensor),
or None when it cannot follow this call (the op is then opaque too). Supporting a new op is
one handler and one table entry.

Example:
    >>> from fastmerge.pleas.op_rules import FUNCTION_RULES, METHOD_RULES, MODULE_RULES
    >>> torch.nn.Linear in MODULE_RULES, torch.cat in FUNCTION_RULES, "view" in METHOD_RULES
    (True, True, True)
    >>> torch.nn.MultiheadAttention in MODULE_RULES
    False
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ._common import _TRANSPOSED_TYPES
from .analysis import _T, _UNKNOWN, _Analysis, _iter_tensors
from .shape_rules import _cat, _expand, _getitem, _reshape, _split
from .tracing import _node_desc

__all__ = ["FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES", "apply"]


def _k_of(name: str) -> int:
    """The number of spatial axes of a ``...1d/2d/3d`` op, from its name."""
    return int(name.rstrip("d")[-1])


_ELEMENTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pos,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt,
    torch.rsqrt, torch.clamp, torch.square, torch.pow, torch.erf,
    F.relu, F.relu6, F.gelu, F.silu, F.elu, F.selu, F.celu, F.leaky_relu, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.mish, F.softplus, F.sigmoid, F.tanh, F.dropout,
    F.alpha_dropout, F.dropout1d, F.dropout2d, F.dropout3d,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "pow", "relu", "sigmoid", "tanh", "exp", "abs", "neg", "sqrt",
    "rsqrt", "clamp", "square", "contiguous", "clone", "detach", "float", "double", "half",
    "bfloat16", "add_", "sub_", "mul_", "div_", "relu_", "masked_fill",
}  # fmt: skip
_SELF_METHODS = {"to", "type_as", "type", "cpu", "cuda"}
_SHAPE_QUERIES = {"size", "dim", "numel", "shape", "dtype", "device", "ndim", "is_cuda"}
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softmax,
    nn.LogSoftmax,
)  # fmt: skip
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)  # fmt: skip
_POOL_FUNCS = {
    f: _k_of(f.__name__)
    for f in (
        F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
        F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    )
}  # fmt: skip
_SOFTMAX = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}
_RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"}
_REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.logsumexp}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "logsumexp"}
_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_LAYER_NORMS = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


# --------------------------------------------------------------------------------------------
# Function and method calls


class _Call:
    """One ``call_function``/``call_method`` node with its argument values."""

    def __init__(self, node: fx.Node, args: tuple, kwargs: dict, out: Any) -> None:
        self.node = node
        self.args = args
        self.kwargs = kwargs
        self.out = out  # the node's tensor_meta
        self.tensors = list(_iter_tensors((args, kwargs)))
        self.x = args[0] if args else None
        self.is_fn = node.op == "call_function"
        self.desc = _node_desc(node)

    def arg(self, i: int, key: str, default: Any = None) -> Any:
        """Argument `i` (positional) or `key` (keyword)."""
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(key, default)


CallRule = Callable[[_Analysis, _Call], Any]


def _on_tensor(rule: CallRule) -> CallRule:
    """`rule` for ops whose first argument must be a tensor value (else: unsupported)."""

    @functools.wraps(rule)
    def checked(a: _Analysis, c: _Call) -> Any:
        return rule(a, c) if isinstance(c.x, _T) else None

    return checked


def _shape_query(a: _Analysis, c: _Call) -> Any:
    return _UNKNOWN


def _getattr(a: _Analysis, c: _Call) -> Any:
    attr = c.args[1]
    if attr in _SHAPE_QUERIES:
        return _UNKNOWN
    x = c.args[0]
    if isinstance(x, _T) and attr == "T":
        return a.permute(x, list(reversed(range(x.ndim))))
    if isinstance(x, _T) and attr == "mT":
        return a.transpose(x, -2, -1)
    return None


def _elementwise(a: _Analysis, c: _Call) -> Any:
    return a.broadcast(c.tensors)


def _cat_call(a: _Analysis, c: _Call) -> Any:
    x = c.x
    if isinstance(x, _T):
        return None
    ts = [t for t in (x or ()) if isinstance(t, _T)]
    if len(ts) != len(x or ()):
        return None
    return _cat(a, c.desc, ts, c.arg(1, "dim", 0), c.node.target is torch.stack, c.out)


@_on_tensor
def _same(a: _Analysis, c: _Call) -> Any:
    return c.x


@_on_tensor
def _reshape_call(a: _Analysis, c: _Call) -> Any:
    return _reshape(a, c.desc, c.x, c.out)


@_on_tensor
def _transpose(a: _Analysis, c: _Call) -> Any:
    return a.transpose(c.x, c.arg(1, "dim0"), c.arg(2, "dim1"))


@_on_tensor
def _permute(a: _Analysis, c: _Call) -> Any:
    order = c.args[1:] if not c.is_fn else (c.arg(1, "dims"),)
    if len(order) == 1 and isinstance(order[0], (tuple, list)):
        order = order[0]
    return a.permute(c.x, list(order))


@_on_tensor
def _t(a: _Analysis, c: _Call) -> Any:
    return a.permute(c.x, list(reversed(range(c.x.ndim))))


@_on_tensor
def _matmul(a: _Analysis, c: _Call) -> Any:
    y = c.arg(1, "other")
    return a.matmul(c.x, y) if isinstance(y, _T) else None


@_on_tensor
def _sdpa(a: _Analysis, c: _Call) -> Any:
    k, v = c.arg(1, "key"), c.arg(2, "value")
    if not (isinstance(k, _T) and isinstance(v, _T)):
        return None
    return a.sdpa(c.x, k, v, c.arg(3, "attn_mask"))


@_on_tensor
def _reduce(a: _Analysis, c: _Call) -> Any:
    return a.reduce(c.x, c.arg(1, "dim"), bool(c.arg(2, "keepdim", False)))


@_on_tensor
def _expand_call(a: _Analysis, c: _Call) -> Any:
    return _expand(a, c.x, c.out)


@_on_tensor
def _split_call(a: _Analysis, c: _Call) -> Any:
    return _split(a, c.desc, c.x, c.arg(2, "dim", 0), c.out)


@_on_tensor
def _getitem_call(a: _Analysis, c: _Call) -> Any:
    return _getitem(a, c.desc, c.x, c.args[1])


def _tensor_or_none(value: Any) -> _T | None:
    return value if isinstance(value, _T) else None


@_on_tensor
def _linear(a: _Analysis, c: _Call) -> Any:
    w, b = c.arg(1, "weight"), c.arg(2, "bias")
    if not isinstance(w, _T) or w.ndim != 2:
        return None
    return a.linear(a.layer_name(w, c.node), c.x, w, _tensor_or_none(b))


@_on_tensor
def _conv(a: _Analysis, c: _Call) -> Any:
    w, b = c.arg(1, "weight"), c.arg(2, "bias")
    if not isinstance(w, _T):
        return None
    groups = c.arg(6, "groups", 1)
    return a.conv(a.layer_name(w, c.node), c.x, w, _tensor_or_none(b), groups, False, c.out)


@_on_tensor
def _batch_norm(a: _Analysis, c: _Call) -> Any:
    keys = ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))
    return a.channel_params(c.x, 1, [_tensor_or_none(c.arg(i, k)) for i, k in keys])


@_on_tensor
def _layer_norm(a: _Analysis, c: _Call) -> Any:
    shape = c.arg(1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    ps = [_tensor_or_none(c.arg(2, "weight")), _tensor_or_none(c.arg(3, "bias"))]
    return a.layer_norm(c.x, ps, k)


@_on_tensor
def _group_norm(a: _Analysis, c: _Call) -> Any:
    ps = [_tensor_or_none(c.arg(2, "weight")), _tensor_or_none(c.arg(3, "bias"))]
    return a.group_norm(c.desc, c.x, c.arg(1, "num_groups"), ps)


@_on_tensor
def _pool(a: _Analysis, c: _Call) -> Any:
    return a.pool(c.desc, c.x, _POOL_FUNCS[c.node.target], c.out)


@_on_tensor
def _embedding(a: _Analysis, c: _Call) -> Any:
    w = c.arg(1, "weight")
    if not isinstance(w, _T):
        return None
    return a.embedding(c.desc, c.x, w)


def _table(*entries: tuple[Any, Any]) -> dict:
    """``{key: rule}`` from ``(keys, rule)`` pairs; a key listed twice is a bug."""
    table: dict = {}
    for keys, rule in entries:
        for key in keys:
            assert key not in table, f"{key!r} has two rules"
            table[key] = rule
    return table


# Rules that also run when no argument is a tensor value (every other op without one gets
# fresh, untied axes for its outputs, e.g. torch.arange).
_WITHOUT_TENSORS = {_shape_query, _getattr}

FUNCTION_RULES: dict[Callable, CallRule] = _table(
    ((getattr,), _getattr),
    (_ELEMENTWISE_FUNCS, _elementwise),
    ((torch.cat, torch.stack), _cat_call),
    (_SOFTMAX, _same),
    (_RESHAPE_FUNCS, _reshape_call),
    ((torch.transpose,), _transpose),
    ((torch.permute,), _permute),
    ((torch.t,), _t),
    ((torch.matmul, operator.matmul, torch.bmm), _matmul),
    ((F.scaled_dot_product_attention,), _sdpa),
    (_REDUCE_FUNCS, _reduce),
    ((torch.chunk, torch.split), _split_call),
    ((operator.getitem,), _getitem_call),
    ((F.linear,), _linear),
    ((F.conv1d, F.conv2d, F.conv3d), _conv),
    ((F.batch_norm,), _batch_norm),
    ((F.layer_norm,), _layer_norm),
    ((F.group_norm,), _group_norm),
    (_POOL_FUNCS, _pool),
    ((F.embedding,), _embedding),
)
"""The rule of each supported function (``call_function`` nodes)."""

METHOD_RULES: dict[str, CallRule] = _table(
    (_SHAPE_QUERIES, _shape_query),
    (_ELEMENTWISE_METHODS, _elementwise),
    (_SELF_METHODS | {"softmax", "log_softmax"}, _same),
    (_RESHAPE_METHODS | {"view_as", "reshape_as"}, _reshape_call),
    (("transpose", "swapaxes"), _transpose),
    (("permute",), _permute),
    (("t",), _t),
    (("matmul", "bmm"), _matmul),
    (_REDUCE_METHODS, _reduce),
    (("expand", "expand_as"), _expand_call),
    (("chunk", "split"), _split_call),
)
"""The rule of each supported tensor method (``call_method`` nodes), by name."""


# --------------------------------------------------------------------------------------------
# Modules

ModuleRule = Callable[[_Analysis, str, nn.Module, _T, Any], Any]


def _module_linear(a: _Analysis, name: str, m: nn.Module, x: _T, out: Any) -> Any:
    return a.linear(name, x, a.module_param(name, "weight"), a.module_param(name, "bias"))


def _module_conv(a: _Analysis, name: str, m: nn.Module, x: _T, out: Any) -> Any:
    transposed = isinstance(m, _TRANSPOSED_TYPES)
    if transposed and m.groups != 1:
        return None
    w = a.module_param(name, "weight", axis_dims=(0, 1))
    return a.conv(name, x, w, a.module_param(name, "bias"), m.groups, transposed, out)


def _module_batch_norm(a: _Analysis, name: str, m: nn.Module, x: _T, out: Any) -> Any:
    ps = [a.module_param(name, n) for n in ("weight", "bias", "running_mean", "running_var")]
    return a.channel_params(x, 1, ps)


def _module_instance_norm(a: _Analysis, name: str, m: nn.Module, x: _T, out: Any) -> Any:
    c = x.ndim - _k_of(type(m).__name__) - 1
    ps = [a.module_param(name, n) for n in ("weight", "bias", "running_mean", "running_var")]
    return a.channel_params(x, c, ps)


def _module_layer_norm(a: _Analysis, name: str, m: nn.Module, x: _T, out: Any) -> Any:
    ps = [a.module_param(name, "weight"), a.module_param(name, "bias")]
    return a.layer_norm(x, ps, len(m.normalized_shape))


def _module_group_norm(a: _Analysis, name: str, m: nn.Module, x: _T, out: Any) -> Any:
    ps = [a.module_param(name, "weight"), a.module_param(name, "bias")]
    return a.group_norm(f"{name} (GroupNorm)", x, m.num_groups, ps)


def _module_prelu(a: _Analysis, name: str, m: nn.Module, x: _T, out: Any) -> Any:
    if m.num_parameters == 1:
        return x
    return a.channel_params(x, 1 if x.ndim > 1 else 0, [a.module_param(name, "weight")])


def _module_same(a: _Analysis, name: str, m: nn.Module, x: _T, out: Any) -> Any:
    return x


def _module_pool(a: _Analysis, name: str, m: nn.Module, x: _T, out: Any) -> Any:
    return a.pool(f"{name} ({type(m).__name__})", x, _k_of(type(m).__name__), out)


def _module_reshape(a: _Analysis, name: str, m: nn.Module, x: _T, out: Any) -> Any:
    return _reshape(a, f"{name} ({type(m).__name__})", x, out)


def _module_embedding(a: _Analysis, name: str, m: nn.Module, x: _T, out: Any) -> Any:
    return a.embedding(name, x, a.module_param(name, "weight"))


MODULE_RULES: dict[type, ModuleRule] = _table(
    ((nn.Linear,), _module_linear),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d) + _TRANSPOSED_TYPES, _module_conv),
    (_NORM_MODULES, _module_batch_norm),
    (_INSTANCE_NORMS, _module_instance_norm),
    (_LAYER_NORMS, _module_layer_norm),
    ((nn.GroupNorm,), _module_group_norm),
    ((nn.PReLU,), _module_prelu),
    (_ELEMENTWISE_MODULES, _module_same),
    (_POOL_MODULES, _module_pool),
    ((nn.Flatten, nn.Unflatten), _module_reshape),
    ((nn.Embedding,), _module_embedding),
)
"""The rule of each supported module class (``call_module`` nodes; subclasses included)."""


def _module_rule(m: nn.Module) -> ModuleRule | None:
    """The rule of `m`'s class or of its nearest base class in :data:`MODULE_RULES`."""
    for cls in type(m).__mro__:
        rule = MODULE_RULES.get(cls)
        if rule is not None:
            return rule
    return None


# --------------------------------------------------------------------------------------------
# Dispatch


def apply(a: _Analysis, node: fx.Node, args: tuple, kwargs: dict, out: Any) -> Any:
    """The value of an op node from its rule (None: unsupported, the analysis makes it opaque).

    `args` and `kwargs` are the node's arguments with every input node replaced by its value,
    `out` the node's ``tensor_meta``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> spec = fastmerge.pleas.permutation_groups(model, torch.randn(3, 4))  # uses apply
        >>> list(spec.groups)
        ['0']
    """
    if node.op == "call_module":
        name = node.target
        m = a.gm.get_submodule(name)
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, _T):
            return None
        rule = _module_rule(m)
        if rule is None:
            return a.opaque(
                node, (args, kwargs), f"inside {name!r} ({type(m).__name__}), which is opaque"
            )
        return rule(a, name, m, x, out)
    c = _Call(node, args, kwargs, out)
    table = FUNCTION_RULES if c.is_fn else METHOD_RULES
    call_rule = table.get(node.target)
    if call_rule in _WITHOUT_TENSORS:
        return call_rule(a, c)
    if not c.tensors:
        return a.like_meta(out, None)  # e.g. torch.arange: no tie to anything
    return call_rule(a, c) if call_rule is not None else None
