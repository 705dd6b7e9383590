"""Permutation groups: which units of a model can be permuted together.

A *permutation group* is a set of tensor axes (parameter or buffer name, dim) that must be
permuted with one common permutation for the model's function to stay the same: the output
axis of a Linear/Conv layer, its bias, the BatchNorm/LayerNorm parameters and buffers that
follow those channels, and the input axis of every layer that consumes them. A residual
``add`` ties both operands' channels, so a whole ResNet stage is one group.

:func:`permutation_groups` finds the groups by tracing the model with ``torch.fx`` and
running it once on an example input (for the shapes). Every axis of every tensor in the
graph is an element of a union-find structure; the rules tie axes that must share a
permutation. A group that touches the model's input or output is left alone (excluded), and
so is one that reaches an operation that does not commute with a permutation of that axis
(the reason is kept in :attr:`PermutationSpec.excluded`). Models that fx cannot trace
(data-dependent control flow) raise :class:`UntraceableModelError`; describe their groups
with :meth:`PermutationSpec.from_axes`. :func:`apply_permutation` reorders a copy of a model.

This module is the entry point; the parts live in their own modules, each importing only
those before it:

* :mod:`fastmerge.pleas.spec`: the data types (:class:`PermutationSpec`,
  :class:`PermutationGroup`, :class:`ExcludedGroup`, :class:`LayerGroups`, :class:`Axis`,
  :class:`UntraceableModelError`) and :meth:`PermutationSpec.from_axes`;
* :mod:`fastmerge.pleas.tracing`: the fx tracer and the shape propagation;
* :mod:`fastmerge.pleas.analysis`: the union-find over the graph's axes;
* :mod:`fastmerge.pleas.shape_rules` and :mod:`fastmerge.pleas.op_rules`: the per-op rules,
  as tables from function, method and module class to handler. **The list of supported
  operations is the docstring of** :mod:`fastmerge.pleas.op_rules`;
* :mod:`fastmerge.pleas.permute`: :func:`apply_permutation`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._common import _as_inputs, _layer_axes, _named_tensors, _unknown_name  # noqa: F401
from .analysis import _Analysis
from .op_rules import apply
from .permute import apply_permutation
from .spec import (
    Axis,
    ExcludedGroup,
    LayerGroups,
    PermutationGroup,
    PermutationSpec,
    UntraceableModelError,
)
from .tracing import _propagate_shapes, _trace

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


def permutation_groups(
    model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]
) -> PermutationSpec:
    """Find the permutation groups of ``model`` by ``torch.fx`` tracing.

    ``example_input`` (a tensor, or a tuple of the model's positional inputs) is run once
    through the traced graph, in eval mode and without gradients, to learn every tensor's
    shape; the model's training flags and running statistics are left as they were.
    Residual adds tie channels, norm parameters and buffers follow their channels, and groups
    that touch the model's input or output (or an unsupported operation) are listed in
    ``excluded`` instead of ``groups``. :mod:`fastmerge.pleas.op_rules` lists the supported ops.

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
    analysis.run(apply)
    return analysis.spec()
