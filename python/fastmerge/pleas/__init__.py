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
or a baseline, and :class:`Ensemble` is the 2x reference. :func:`merge_many` merges N models
(:func:`match_many` aligns them to a reference, :func:`multi_layout` gives the
``[merged | only-0 | ... | only-(N-1)]`` layout, budget in [1, N]).
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
from .multi import merge_many, merge_weights_many, relative_flops_many
from .multi_layouts import MultiLayout, multi_layout
from .multi_least_squares import solve_least_squares_many
from .multi_matching import MultiMatch, align_many, match_many
from .weight_matching import WeightMatch, weight_matching

__all__ = [
    "Axis",
    "Ensemble",
    "ExcludedGroup",
    "GroupMatch",
    "LayerCost",
    "LayerFit",
    "LayerGroups",
    "MultiLayout",
    "MultiMatch",
    "PartialLayout",
    "PermutationGroup",
    "PermutationSpec",
    "UntraceableModelError",
    "WeightMatch",
    "align_many",
    "allocate",
    "apply_permutation",
    "collect_features",
    "identity_layouts",
    "layer_costs",
    "layouts_for",
    "match",
    "match_many",
    "merge",
    "merge_many",
    "merge_weights",
    "merge_weights_many",
    "multi_layout",
    "partial_layout",
    "permutation_groups",
    "recompute_batchnorm",
    "relative_flops",
    "relative_flops_many",
    "solve_least_squares",
    "solve_least_squares_many",
    "weight_matching",
]
