"""Permutation specs: the data types that say which axes of a model are permuted together.

:class:`PermutationSpec` holds a model's :class:`PermutationGroup` s (the axes, each an
:class:`Axis`, that one permutation reorders), the :class:`LayerGroups` of every Conv/Linear
layer and the :class:`ExcludedGroup` s that are left alone, with the reason.
:func:`~fastmerge.pleas.permutation_groups` finds them by tracing the model
(:class:`UntraceableModelError` when it cannot); :meth:`PermutationSpec.from_axes` writes
them by hand.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> spec = fastmerge.pleas.PermutationSpec.from_axes(
    ...     model, {"hidden": [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]})
    >>> spec.groups["hidden"].producers, spec.groups["hidden"].consumers
    (('0',), ('2',))
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import nn

from ._common import _layer_axes, _named_tensors, _unknown_name

__all__ = [
    "Axis",
    "ExcludedGroup",
    "LayerGroups",
    "PermutationGroup",
    "PermutationSpec",
    "UntraceableModelError",
]


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
