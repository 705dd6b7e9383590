"""PLeaS (Permutations and Least Squares) merging — in progress.

So far: :func:`permutation_groups` finds which units of a model are permuted together
(torch.fx tracing, residual adds tie channels, norm parameters follow their channels, groups
touching the model's input or output are left alone), :meth:`PermutationSpec.from_axes`
describes them by hand for models fx cannot trace, and :func:`apply_permutation` reorders a
copy of a model's units without changing its function.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> spec = fastmerge.pleas.permutation_groups(model, torch.randn(3, 4))
    >>> [(g.name, g.size) for g in spec.groups.values()]
    [('0', 8)]
"""

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
