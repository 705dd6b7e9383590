"""Permutation groups: which units of a model can be permuted together.

A *permutation group* is a set of tensor axes (parameter or buffer name, dim) that must be
permuted with one common permutation for the model's function to stay the same: the output
axis of a Linear/Conv layer, its bias, the BatchNorm/LayerNorm parameters and buffers that
follow those channels, and the input axis of every layer that consumes them. A residual
``add`` ties both operands' channels, so a whole ResNet stage is one group.

:func:`permutation_groups` finds the groups by tracing the model with ``torch.fx`` and
running it once on an example input (for the shapes). Every axis of every tensor in the
graph is an element of a union-find structure; the rules below tie axes that must share a
permutation. A group that touches the model's input or output is left alone (excluded), and
so is one that reaches an operation that does not commute with a permutation of that axis
(the reason is kept in :attr:`PermutationSpec.excluded`).

Supported operations (modules, their ``torch.nn.functional`` forms and tensor methods):

* ``Linear``/``F.linear``, ``Conv1d/2d/3d``/``F.conv*d`` (``groups=1`` or depthwise with
  multiplier 1; other grouped convolutions exclude their channels), ``ConvTranspose*d``
  (``groups=1``), ``Embedding`` (its embedding axis; the vocabulary axis is excluded).
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

Models that fx cannot trace (data-dependent control flow) raise
:class:`UntraceableModelError`; describe their groups with :meth:`PermutationSpec.from_axes`.
"""

from __future__ import annotations

import copy
import difflib
import operator
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

__all__ = [
    "Axis",
    "ExcludedGroup",
    "LayerGroups",
    "PermutationGroup",
    "PermutationSpec",
    "UntraceableModelError",
    "apply_permutation",
    "permutation_groups",
]

_FROM_AXES_HINT = (
    "Describe the groups explicitly with fastmerge.pleas.PermutationSpec.from_axes(model, "
    "{'group': [('fc1.weight', 0), ('fc1.bias', 0), ('fc2.weight', 1)], ...})."
)


class Axis(NamedTuple):
    """One axis of a parameter or buffer: ``(name, dim)``, e.g. ``("fc1.weight", 0)``.

    Example:
        >>> from fastmerge.pleas import Axis
        >>> Axis("fc1.weight", 0) == ("fc1.weight", 0)
        True
    """

    name: str
    dim: int


class LayerGroups(NamedTuple):
    """The groups of a Conv/Linear layer's input and output axes (``None``: not permuted).

    Example:
        >>> from fastmerge.pleas import LayerGroups
        >>> LayerGroups(input=None, output="fc1").output
        'fc1'
    """

    input: str | None
    output: str | None


@dataclass(frozen=True)
class PermutationGroup:
    """Axes permuted together by one permutation of ``size`` units.

    ``producers`` are the Conv/Linear layers whose *output* axis is in the group,
    ``consumers`` those whose *input* axis is.

    Example:
        >>> from fastmerge.pleas import PermutationGroup
        >>> g = PermutationGroup("fc1", 16, (("fc1.weight", 0), ("fc2.weight", 1)), ("fc1",))
        >>> g.size, g.axes[1].name, g.consumers
        (16, 'fc2.weight', ())
    """

    name: str
    size: int
    axes: tuple[Axis, ...]
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes", tuple(Axis(str(n), int(d)) for n, d in self.axes))
        object.__setattr__(self, "producers", tuple(self.producers))
        object.__setattr__(self, "consumers", tuple(self.consumers))


@dataclass(frozen=True)
class ExcludedGroup:
    """Axes that are tied together but may not be permuted, and why.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> spec = fastmerge.pleas.permutation_groups(model, torch.randn(3, 4))
        >>> [(g.name, g.reason) for g in spec.excluded]
        [('0.weight[1]', "touches the model's input"), ('2', "touches the model's output")]
    """

    name: str
    size: int
    axes: tuple[Axis, ...]
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    reason: str


class UntraceableModelError(RuntimeError):
    """``torch.fx`` could not trace the model (or run the traced graph on the example input).

    ``node`` is the name of the last graph node created (the failing one for data-dependent
    control flow), ``module`` the qualified name of the submodule being traced.

    Example:
        >>> from fastmerge.pleas import UntraceableModelError
        >>> issubclass(UntraceableModelError, RuntimeError)
        True
    """

    def __init__(self, message: str, node: str | None = None, module: str | None = None):
        super().__init__(message)
        self.node = node
        self.module = module


_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _layer_axes(module: nn.Module) -> tuple[int, int] | None:
    """(input dim, output dim) of a Conv/Linear layer's weight, None for other modules."""
    if isinstance(module, _TRANSPOSED_TYPES):
        return 0, 1
    if isinstance(module, _LAYER_TYPES):
        return 1, 0
    return None


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        out[name] = t
    for name, t in model.named_buffers(remove_duplicate=False):
        if t is not None:
            out[name] = t
    return out


def _unknown_name(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return f"the model has no parameter or buffer named {name!r}{hint}"


@dataclass(frozen=True)
class PermutationSpec:
    """All permutation groups of a model and, per Conv/Linear layer, its input and output group.

    ``groups`` maps a group's name to its :class:`PermutationGroup` (in graph order),
    ``layers`` maps every Conv/Linear layer (module name) to :class:`LayerGroups`, and
    ``excluded`` lists the tied axes that are not permuted, with the reason.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> spec = fastmerge.pleas.permutation_groups(model, torch.randn(3, 4))
        >>> list(spec.groups), spec.layers["2"]
        (['0'], LayerGroups(input='0', output=None))
    """

    groups: dict[str, PermutationGroup]
    layers: dict[str, LayerGroups] = field(default_factory=dict)
    excluded: tuple[ExcludedGroup, ...] = ()

    @classmethod
    def from_axes(
        cls,
        model: nn.Module,
        groups: Mapping[str, Sequence[tuple[str, int]]],
        layers: Mapping[str, tuple[str | None, str | None]] | None = None,
    ) -> PermutationSpec:
        """A spec written by hand, for models that ``torch.fx`` cannot trace.

        ``groups`` maps a group name to its axes ``(parameter or buffer name, dim)``; every
        axis must exist in ``model`` and all axes of a group must have the same size. The
        input/output group of each Conv/Linear layer is read from the axes of its weight;
        ``layers`` (optional) states them too, and is checked against the axes. A layer's
        bias must be in the group of its weight's output axis.

        Example:
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            >>> spec = fastmerge.pleas.PermutationSpec.from_axes(
            ...     model, {"hidden": [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]})
            >>> spec.groups["hidden"].size, spec.layers["0"], spec.layers["2"]
            (8, LayerGroups(input=None, output='hidden'), LayerGroups(input='hidden', output=None))
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(groups, Mapping):
            raise TypeError(
                f"groups must be a mapping of group name -> [(name, dim), ...], "
                f"got {type(groups).__name__}"
            )
        tensors = _named_tensors(model)
        owner: dict[Axis, str] = {}
        sizes: dict[str, int] = {}
        norm_groups: dict[str, list[Axis]] = {}
        for gname, axes in groups.items():
            if not isinstance(gname, str) or not gname:
                raise TypeError(f"groups: group names must be non-empty strings, got {gname!r}")
            if isinstance(axes, (str, bytes)) or not isinstance(axes, Sequence) or not axes:
                raise ValueError(
                    f"groups[{gname!r}] must be a non-empty list of (name, dim) pairs, got {axes!r}"
                )
            norm: list[Axis] = []
            first: tuple[Axis, int] | None = None
            for axis in axes:
                if (
                    not isinstance(axis, (tuple, list))
                    or len(axis) != 2
                    or not isinstance(axis[0], str)
                    or isinstance(axis[1], bool)
                    or not isinstance(axis[1], int)
                ):
                    raise ValueError(
                        f"groups[{gname!r}]: each axis must be a (name, dim) pair, got {axis!r}"
                    )
                name, dim = axis
                if name not in tensors:
                    raise ValueError(f"groups[{gname!r}]: {_unknown_name(name, list(tensors))}")
                t = tensors[name]
                if not -t.dim() <= dim < t.dim():
                    raise ValueError(
                        f"groups[{gname!r}]: dim {dim} is out of range for {name!r} of shape "
                        f"{tuple(t.shape)}"
                    )
                ax = Axis(name, dim % t.dim())
                if ax in owner:
                    where = "twice" if owner[ax] == gname else f"also in group {owner[ax]!r}"
                    raise ValueError(f"groups[{gname!r}]: axis {tuple(ax)} is listed {where}")
                owner[ax] = gname
                size = int(t.shape[ax.dim])
                if first is None:
                    first = (ax, size)
                elif size != first[1]:
                    raise ValueError(
                        f"groups[{gname!r}]: axes have different sizes: {first[0].name!r} dim "
                        f"{first[0].dim} has {first[1]} units, {name!r} dim {ax.dim} has {size}"
                    )
                norm.append(ax)
            norm_groups[gname] = norm
            sizes[gname] = first[1] if first else 0

        inferred: dict[str, LayerGroups] = {}
        for mname, module in model.named_modules():
            dims = _layer_axes(module)
            if dims is None:
                continue
            w = f"{mname}.weight" if mname else "weight"
            lg = LayerGroups(owner.get(Axis(w, dims[0])), owner.get(Axis(w, dims[1])))
            inferred[mname] = lg
            b = f"{mname}.bias" if mname else "bias"
            if getattr(module, "bias", None) is not None and owner.get(Axis(b, 0)) != lg.output:
                raise ValueError(
                    f"groups: {w!r} dim {dims[1]} is in group {lg.output!r} but {b!r} dim 0 is "
                    f"in {owner.get(Axis(b, 0))!r}; a layer's bias must follow its output units"
                )
        if layers is not None:
            modules = dict(model.named_modules())
            for lname, pair in layers.items():
                if lname not in modules:
                    close = difflib.get_close_matches(str(lname), list(modules), n=3)
                    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
                    raise ValueError(f"layers: the model has no module named {lname!r}{hint}")
                if lname not in inferred:
                    raise ValueError(
                        f"layers[{lname!r}] is a {type(modules[lname]).__name__}, "
                        f"not a Conv/Linear layer"
                    )
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise ValueError(
                        f"layers[{lname!r}] must be an (input_group, output_group) pair, "
                        f"got {pair!r}"
                    )
                dims = _layer_axes(modules[lname])
                assert dims is not None
                for role, gname, got, dim in (
                    ("input", pair[0], inferred[lname].input, dims[0]),
                    ("output", pair[1], inferred[lname].output, dims[1]),
                ):
                    if gname is not None and gname not in norm_groups:
                        raise ValueError(
                            f"layers[{lname!r}]: {role} group {gname!r} is not in groups "
                            f"({sorted(norm_groups)})"
                        )
                    if gname != got:
                        w = f"{lname}.weight" if lname else "weight"
                        raise ValueError(
                            f"layers[{lname!r}]: {role} group is {gname!r} but axis "
                            f"({w!r}, {dim}) is in group {got!r}; list the axis in the group "
                            f"it belongs to"
                        )
        spec_groups = {
            g: PermutationGroup(
                g,
                sizes[g],
                tuple(norm_groups[g]),
                tuple(n for n, lg in inferred.items() if lg.output == g),
                tuple(n for n, lg in inferred.items() if lg.input == g),
            )
            for g in norm_groups
        }
        return cls(spec_groups, inferred, ())

    def identity_perms(self) -> dict[str, torch.Tensor]:
        """The identity permutation of every group.

        Example:
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
            >>> fastmerge.pleas.permutation_groups(model, torch.randn(2, 4)).identity_perms()
            {'0': tensor([0, 1, 2])}
        """
        return {name: torch.arange(g.size) for name, g in self.groups.items()}

    def random_perms(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """A uniformly random permutation of every group.

        Example:
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
            >>> spec = fastmerge.pleas.permutation_groups(model, torch.randn(2, 4))
            >>> sorted(spec.random_perms(torch.Generator().manual_seed(0))["0"].tolist())
            [0, 1, 2]
        """
        return {
            name: torch.randperm(g.size, generator=generator) for name, g in self.groups.items()
        }

    def summary(self) -> str:
        """A readable listing of the groups, the layers and the excluded axes.

        Example:
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
            >>> print(fastmerge.pleas.permutation_groups(model, torch.randn(2, 4)).summary())
            group '0': 3 units, produced by ['0'], consumed by ['2'],
              axes 0.weight[0] 0.bias[0] 2.weight[1]
            excluded '0.weight[1]' (4 units): touches the model's input
            excluded '2' (2 units): touches the model's output
        """
        lines = []
        for g in self.groups.values():
            axes = " ".join(f"{a.name}[{a.dim}]" for a in g.axes)
            lines.append(
                f"group {g.name!r}: {g.size} units, produced by {list(g.producers)}, "
                f"consumed by {list(g.consumers)},\n  axes {axes}"
            )
        for e in self.excluded:
            lines.append(f"excluded {e.name!r} ({e.size} units): {e.reason}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Tracing


class _Tracer(fx.Tracer):
    """fx tracer that remembers which submodule it is inside (for error messages)."""

    def __init__(self) -> None:
        super().__init__()
        self._fm_stack: list[tuple[str, str]] = []

    def call_module(self, m, forward, args, kwargs):  # noqa: D102
        try:
            name = self.path_of_module(m)
        except NameError:
            name = "<unregistered module>"
        self._fm_stack.append((name, type(m).__name__))
        out = super().call_module(m, forward, args, kwargs)
        self._fm_stack.pop()
        return out


def _user_frame(exc: BaseException) -> str:
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.abspath(__file__)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not os.path.abspath(f.filename).startswith(torch_dir)
        and os.path.abspath(f.filename) != here
    ]
    if not frames:
        return ""
    f = frames[-1]
    code = f" `{f.line.strip()}`" if f.line else ""
    return f" at {f.filename}:{f.lineno}{code}"


def _node_desc(node: fx.Node) -> str:
    target = (
        node.target
        if isinstance(node.target, str)
        else getattr(node.target, "__name__", node.target)
    )
    return f"node {node.name!r} ({node.op} {target})"


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = (
            f"inside module {tracer._fm_stack[-1][0]!r} ({tracer._fm_stack[-1][1]})"
            if tracer._fm_stack
            else f"in {type(model).__name__}.forward"
        )
        nodes = list(tracer.graph.nodes) if getattr(tracer, "graph", None) is not None else []
        last = nodes[-1] if nodes else None
        at_node = f", at {_node_desc(last)}" if last is not None else ""
        raise UntraceableModelError(
            f"torch.fx could not trace {type(model).__name__} {where}{at_node}"
            f"{_user_frame(exc)}: {type(exc).__name__}: {exc}. {_FROM_AXES_HINT}",
            node=last.name if last is not None else None,
            module=tracer._fm_stack[-1][0] if tracer._fm_stack else None,
        ) from exc
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return fx.GraphModule(tracer.root, graph, name)


class _ShapeProp(ShapeProp):
    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def _propagate_shapes(model: nn.Module, gm: fx.GraphModule, inputs: tuple) -> None:
    flags = [(m, m.training) for m in model.modules()] + [(gm, gm.training)]
    prop = _ShapeProp(gm)
    prop.current = None
    try:
        gm.eval()  # shapes only: keep running statistics untouched
        with torch.no_grad():
            prop.propagate(*inputs)
    except Exception as exc:
        node = prop.current
        at = f" at {_node_desc(node)}" if node is not None else ""
        raise UntraceableModelError(
            f"example_input: running the traced {type(model).__name__} failed{at}: "
            f"{type(exc).__name__}: {exc}",
            node=node.name if node is not None else None,
        ) from exc
    finally:
        for m, flag in flags:
            m.training = flag


# --------------------------------------------------------------------------------------------
# Axis analysis


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
    def __repr__(self) -> str:
        return "<non-tensor>"


_UNKNOWN = _Unknown()


def _iter_tensors(obj: Any):
    if isinstance(obj, _T):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _iter_tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _iter_tensors(o)


def _k_of(name: str) -> int:
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

    # rules ------------------------------------------------------------------------------------
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

    def reshape(self, name: str, x: _T, out: Any) -> Any:
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
                    f"{name} reshapes axes of sizes {[x.shape[a] for a in ci]} into "
                    f"{[oshape[a] for a in cj]}"
                )
                for a in ci:
                    self.block(x.dims[a], reason)
                for a in cj:
                    odims[a] = self.new(oshape[a], reason=reason)
            i += 1
            j += 1
        if i != len(ins) or j != len(outs):
            return None
        dims = tuple(d if d is not None else self.new(oshape[a]) for a, d in enumerate(odims))
        return _T(dims, oshape)

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

    def cat(self, name: str, tensors: Sequence[_T], dim: int, stack: bool, out: Any) -> Any:
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
                    self.block(t.dims[i], reason)
                continue
            for t in tensors[1:]:
                self.tie(tensors[0].dims[i], t.dims[i])
            dims.append(tensors[0].dims[i])
        dims.insert(d, self.new(out.shape[d], reason=reason))
        return _T(tuple(dims), tuple(out.shape))

    def split(self, name: str, x: _T, dim: int, out: Any) -> Any:
        if not isinstance(out, (tuple, list)):
            return None
        d = dim % x.ndim
        reason = f"{name} splits this axis"
        self.block(x.dims[d], reason)
        res = []
        for m in out:
            if not isinstance(m, TensorMetadata) or len(m.shape) != x.ndim:
                return None
            dims = list(x.dims)
            dims[d] = self.new(m.shape[d], reason=reason)
            res.append(_T(tuple(dims), tuple(m.shape)))
        return tuple(res)

    def getitem(self, name: str, x: Any, idx: Any) -> Any:
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
                dims.append(self.new(1))
                shape.append(1)
                continue
            e, s = x.dims[src], x.shape[src]
            src += 1
            if isinstance(i, int):
                self.block(e, reason)
            elif i == slice(None) or i.indices(s) == (0, s, 1):
                dims.append(e)
                shape.append(s)
            else:
                self.block(e, reason)
                n = len(range(*i.indices(s)))
                dims.append(self.new(n, reason=reason))
                shape.append(n)
        return _T(tuple(dims), tuple(shape))

    # dispatch ---------------------------------------------------------------------------------
    def run(self) -> None:
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
                    value = self.apply(node, args, kwargs, meta)
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
        return fx.node.map_aggregate(
            obj, lambda a: self.values.get(a, _UNKNOWN) if isinstance(a, fx.Node) else a
        )

    def apply(self, node: fx.Node, args: tuple, kwargs: dict, out: Any) -> Any:
        tensors = list(_iter_tensors((args, kwargs)))
        if node.op == "call_module":
            return self.apply_module(node, args, kwargs, out)
        target = node.target
        desc = _node_desc(node)
        if node.op == "call_method" and target in _SHAPE_QUERIES:
            return _UNKNOWN
        if node.op == "call_function" and target is getattr:
            attr = args[1]
            if attr in _SHAPE_QUERIES:
                return _UNKNOWN
            x = args[0]
            if isinstance(x, _T) and attr == "T":
                return self.permute(x, list(reversed(range(x.ndim))))
            if isinstance(x, _T) and attr == "mT":
                return self.transpose(x, -2, -1)
            return None
        if not tensors:
            return self.like_meta(out, None)  # e.g. torch.arange: no tie to anything
        x = args[0] if args else None
        is_fn = node.op == "call_function"

        def arg(i: int, key: str, default: Any = None) -> Any:
            if len(args) > i:
                return args[i]
            return kwargs.get(key, default)

        if (is_fn and target in _ELEMENTWISE_FUNCS) or (
            not is_fn and target in _ELEMENTWISE_METHODS
        ):
            return self.broadcast(tensors)
        if not isinstance(x, _T):
            if is_fn and target in (torch.cat, torch.stack):
                ts = [t for t in (x or ()) if isinstance(t, _T)]
                if len(ts) != len(x or ()):
                    return None
                return self.cat(desc, ts, arg(1, "dim", 0), target is torch.stack, out)
            return None
        if (not is_fn and target in _SELF_METHODS) or (is_fn and target in _SOFTMAX):
            return x
        if not is_fn and target in ("softmax", "log_softmax"):
            return x
        if (is_fn and target in _RESHAPE_FUNCS) or (not is_fn and target in _RESHAPE_METHODS):
            return self.reshape(desc, x, out)
        if not is_fn and target in ("view_as", "reshape_as"):
            return self.reshape(desc, x, out)
        if target in (torch.transpose, "transpose") or (not is_fn and target == "swapaxes"):
            return self.transpose(x, arg(1, "dim0"), arg(2, "dim1"))
        if target in (torch.permute, "permute"):
            order = args[1:] if not is_fn else (arg(1, "dims"),)
            if len(order) == 1 and isinstance(order[0], (tuple, list)):
                order = order[0]
            return self.permute(x, list(order))
        if target in (torch.t, "t"):
            return self.permute(x, list(reversed(range(x.ndim))))
        if target in (torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm"):
            y = arg(1, "other")
            return self.matmul(x, y) if isinstance(y, _T) else None
        if is_fn and target is F.scaled_dot_product_attention:
            k, v = arg(1, "key"), arg(2, "value")
            if not (isinstance(k, _T) and isinstance(v, _T)):
                return None
            return self.sdpa(x, k, v, arg(3, "attn_mask"))
        if (is_fn and target in _REDUCE_FUNCS) or (not is_fn and target in _REDUCE_METHODS):
            return self.reduce(x, arg(1, "dim"), bool(arg(2, "keepdim", False)))
        if target in ("expand", "expand_as"):
            if not isinstance(out, TensorMetadata) or len(out.shape) < x.ndim:
                return None
            oshape = tuple(out.shape)
            lead = len(oshape) - x.ndim
            dims = [self.new(s) for s in oshape[:lead]]
            for i in range(x.ndim):
                same = x.shape[i] == oshape[lead + i]
                dims.append(x.dims[i] if same else self.new(oshape[lead + i]))
            return _T(tuple(dims), oshape)
        if target in (torch.chunk, torch.split, "chunk", "split"):
            return self.split(desc, x, arg(2, "dim", 0), out)
        if target is operator.getitem:
            return self.getitem(desc, x, args[1])
        if is_fn and target is F.linear:
            w, b = arg(1, "weight"), arg(2, "bias")
            if not isinstance(w, _T) or w.ndim != 2:
                return None
            return self.linear(self.layer_name(w, node), x, w, b if isinstance(b, _T) else None)
        if is_fn and target in (F.conv1d, F.conv2d, F.conv3d):
            w, b = arg(1, "weight"), arg(2, "bias")
            if not isinstance(w, _T):
                return None
            groups = arg(6, "groups", 1)
            b = b if isinstance(b, _T) else None
            return self.conv(self.layer_name(w, node), x, w, b, groups, False, out)
        if is_fn and target is F.batch_norm:
            ps = [
                arg(i, k)
                for i, k in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))
            ]
            return self.channel_params(x, 1, [p if isinstance(p, _T) else None for p in ps])
        if is_fn and target is F.layer_norm:
            shape = arg(1, "normalized_shape")
            k = 1 if isinstance(shape, int) else len(shape)
            ps = [arg(2, "weight"), arg(3, "bias")]
            return self.layer_norm(x, [p if isinstance(p, _T) else None for p in ps], k)
        if is_fn and target is F.group_norm:
            ps = [arg(2, "weight"), arg(3, "bias")]
            ps = [p if isinstance(p, _T) else None for p in ps]
            return self.group_norm(desc, x, arg(1, "num_groups"), ps)
        if is_fn and target in _POOL_FUNCS:
            return self.pool(desc, x, _POOL_FUNCS[target], out)
        if is_fn and target is F.embedding:
            w = arg(1, "weight")
            if not isinstance(w, _T):
                return None
            return self.embedding(desc, x, w)
        return None

    def layer_name(self, w: _T, node: fx.Node) -> str:
        if w.param is None:
            return node.name
        return w.param[: -len(".weight")] if w.param.endswith(".weight") else w.param

    def embedding(self, name: str, idx: _T, w: _T) -> _T:
        self.block(w.dims[0], f"vocabulary axis of {name}: rows are looked up by index")
        return _T(idx.dims + (w.dims[1],), idx.shape + (w.shape[1],))

    def apply_module(self, node: fx.Node, args: tuple, kwargs: dict, out: Any) -> Any:
        name = node.target
        m = self.gm.get_submodule(name)
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, _T):
            return None

        def p(pname: str, **kw) -> _T | None:
            return self.module_param(name, pname, **kw)

        if isinstance(m, nn.Linear):
            return self.linear(name, x, p("weight"), p("bias"))
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d) + _TRANSPOSED_TYPES):
            if isinstance(m, _TRANSPOSED_TYPES) and m.groups != 1:
                return None
            w = p("weight", axis_dims=(0, 1))
            transposed = isinstance(m, _TRANSPOSED_TYPES)
            return self.conv(name, x, w, p("bias"), m.groups, transposed, out)
        if isinstance(m, _NORM_MODULES):
            ps = [p(n) for n in ("weight", "bias", "running_mean", "running_var")]
            return self.channel_params(x, 1, ps)
        if isinstance(m, _INSTANCE_NORMS):
            c = x.ndim - _k_of(type(m).__name__) - 1
            ps = [p(n) for n in ("weight", "bias", "running_mean", "running_var")]
            return self.channel_params(x, c, ps)
        if isinstance(m, _LAYER_NORMS):
            k = len(m.normalized_shape)
            return self.layer_norm(x, [p("weight"), p("bias")], k)
        if isinstance(m, nn.GroupNorm):
            return self.group_norm(f"{name} (GroupNorm)", x, m.num_groups, [p("weight"), p("bias")])
        if isinstance(m, nn.PReLU):
            if m.num_parameters == 1:
                return x
            return self.channel_params(x, 1 if x.ndim > 1 else 0, [p("weight")])
        if isinstance(m, _ELEMENTWISE_MODULES):
            return x
        if isinstance(m, _POOL_MODULES):
            return self.pool(f"{name} ({type(m).__name__})", x, _k_of(type(m).__name__), out)
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return self.reshape(f"{name} ({type(m).__name__})", x, out)
        if isinstance(m, nn.Embedding):
            return self.embedding(name, x, p("weight"))
        return self.opaque(
            node, (args, kwargs), f"inside {name!r} ({type(m).__name__}), which is opaque"
        )

    # result -----------------------------------------------------------------------------------
    def spec(self) -> PermutationSpec:
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


def _as_inputs(example_input: Any) -> tuple:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and all(
        isinstance(t, torch.Tensor) for t in example_input
    ):
        return tuple(example_input)
    raise TypeError(
        "example_input must be a tensor or a tuple of tensors (the model's positional "
        f"inputs), got {type(example_input).__name__}"
    )


def permutation_groups(
    model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]
) -> PermutationSpec:
    """Find the permutation groups of ``model`` by ``torch.fx`` tracing.

    ``example_input`` (a tensor, or a tuple of the model's positional inputs) is run once
    through the traced graph, in eval mode and without gradients, to learn every tensor's
    shape; the model's training flags and running statistics are left as they were.
    Residual adds tie channels, norm parameters and buffers follow their channels, and groups
    that touch the model's input or output (or an unsupported operation) are listed in
    ``excluded`` instead of ``groups``. See the module documentation for the supported ops.

    Raises :class:`UntraceableModelError` (naming the node and module) when fx cannot trace
    the model; use :meth:`PermutationSpec.from_axes` for such models.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(
        ...     nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> spec = fastmerge.pleas.permutation_groups(model, torch.randn(2, 4))
        >>> {name: (g.size, g.producers, g.consumers) for name, g in spec.groups.items()}
        {'0': (16, ('0',), ('2',)), '2': (8, ('2',), ('4',))}
        >>> spec.groups["0"].axes
        (Axis(name='0.weight', dim=0), Axis(name='0.bias', dim=0), Axis(name='2.weight', dim=1))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_inputs(example_input)
    gm = _trace(model)
    n_in = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(inputs) > n_in:
        raise ValueError(
            f"example_input has {len(inputs)} tensors but the model's forward takes {n_in} inputs"
        )
    _propagate_shapes(model, gm, inputs)
    analysis = _Analysis(model, gm)
    analysis.run()
    return analysis.spec()


def apply_permutation(
    model: nn.Module, spec: PermutationSpec, perms: Mapping[str, Any]
) -> nn.Module:
    """A deep copy of ``model`` with every group's units reordered by its permutation.

    ``perms`` maps group names to index tensors (``new unit k = old unit perms[g][k]``) and
    may leave groups out (identity). Every axis of a group is reordered with its permutation,
    so the copy computes the same function as ``model``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> spec = fastmerge.pleas.permutation_groups(model, torch.randn(2, 4))
        >>> perm = {"0": torch.tensor([2, 0, 1])}
        >>> permuted = fastmerge.pleas.apply_permutation(model, spec, perm)
        >>> torch.equal(permuted[0].bias, model[0].bias[[2, 0, 1]])
        True
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(permuted(x), model(x), atol=1e-6)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    if not isinstance(perms, Mapping):
        raise TypeError(
            f"perms must be a mapping of group name -> index tensor, got {type(perms).__name__}"
        )
    checked: dict[str, torch.Tensor] = {}
    for gname, perm in perms.items():
        if gname not in spec.groups:
            raise KeyError(f"perms: {gname!r} is not a group of spec (groups: {list(spec.groups)})")
        size = spec.groups[gname].size
        p = torch.as_tensor(perm)
        if p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
            raise TypeError(f"perms[{gname!r}] must hold integer indices, got dtype {p.dtype}")
        p = p.to(device="cpu", dtype=torch.long)
        if p.shape != (size,) or not torch.equal(torch.sort(p).values, torch.arange(size)):
            raise ValueError(
                f"perms[{gname!r}] must be a permutation of 0..{size - 1} (shape ({size},)), "
                f"got shape {tuple(p.shape)}"
                + ("" if p.shape != (size,) else " with repeated or out-of-range indices")
            )
        checked[gname] = p
    new = copy.deepcopy(model)
    tensors = _named_tensors(new)
    done: set[tuple[int, int]] = set()
    with torch.no_grad():
        for gname, p in checked.items():
            group = spec.groups[gname]
            for axis in group.axes:
                if axis.name not in tensors:
                    raise KeyError(
                        f"spec group {gname!r}: {_unknown_name(axis.name, list(tensors))}"
                    )
                t = tensors[axis.name]
                if t.dim() <= axis.dim or t.shape[axis.dim] != group.size:
                    raise ValueError(
                        f"spec group {gname!r}: {axis.name!r} of shape {tuple(t.shape)} has no "
                        f"axis {axis.dim} of size {group.size}; was the spec made for this model?"
                    )
                key = (id(t), axis.dim)
                if key in done:
                    continue
                done.add(key)
                t.copy_(t.index_select(axis.dim, p.to(t.device)))
    return new
