"""PLeaS (Permutations and Least Squares) merging.

:func:`permutation_groups` finds which units of a model are permuted together
(torch.fx tracing, residual adds tie channels, norm parameters follow their channels, groups
touching the model's input or output are left alone), :meth:`PermutationSpec.from_axes`
describes them by hand for models fx cannot trace, and :func:`apply_permutation` reorders a
copy of a model's units without changing its function. :func:`match` (with
:func:`collect_features`) matches two models' units group by group from their activations,
:func:`partial_layout` turns a match and a ratio into the ``[merged | only-A | only-B]``
layout, and :func:`allocate` (with :func:`layer_costs` and :func:`relative_flops`) picks
per-group ratios for a relative-FLOPs budget. :func:`merge` builds the merged model
(:func:`merge_weights`, :func:`solve_least_squares`, :func:`recompute_batchnorm`) with PLeaS
or a baseline, and :class:`Ensemble` is the 2x reference. :func:`weight_matching` (Git
Re-Basin) matches the units from the weights alone, without data.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> spec = fastmerge.pleas.permutation_groups(model, torch.randn(3, 4))
    >>> [(g.name, g.size) for g in spec.groups.values()]
    [('0', 8)]
"""

from .allocation import LayerCost, allocate, layer_costs, relative_flops
from .groups import (
    Axis,
    ExcludedGroup,
    LayerGroups,
    PermutationGroup,
    PermutationSpec,
    UntraceableModelError,
    apply_permutation,
    permutation_groups,
)
from .least_squares_stage import LayerFit, recompute_batchnorm, solve_least_squares
from .matching import GroupMatch, PartialLayout, collect_features, match, partial_layout
from .merging import Ensemble, identity_layouts, layouts_for, merge, merge_weights
from .weight_matching import WeightMatch, weight_matching

__all__ = [
    "Axis",
    "Ensemble",
    "ExcludedGroup",
    "GroupMatch",
    "LayerCost",
    "LayerFit",
    "LayerGroups",
    "PartialLayout",
    "PermutationGroup",
    "PermutationSpec",
    "UntraceableModelError",
    "WeightMatch",
    "allocate",
    "apply_permutation",
    "collect_features",
    "identity_layouts",
    "layer_costs",
    "layouts_for",
    "match",
    "merge",
    "merge_weights",
    "partial_layout",
    "permutation_groups",
    "recompute_batchnorm",
    "relative_flops",
    "solve_least_squares",
    "weight_matching",
]
