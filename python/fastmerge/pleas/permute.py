"""Applying permutations: reorder a copy of a model's units without changing its function.

:func:`apply_permutation` takes a :class:`~fastmerge.pleas.PermutationSpec` and one index
tensor per group and reorders every axis of each group (a layer's output units, its bias, the
norm parameters and buffers that follow them, and the input axis of every consumer) in a deep
copy of the model. Tensors shared under several names are reordered once.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> spec = fastmerge.pleas.permutation_groups(model, torch.randn(1, 2))
    >>> new = fastmerge.pleas.apply_permutation(model, spec, {"0": torch.tensor([1, 2, 0])})
    >>> torch.equal(new[2].weight, model[2].weight[:, [1, 2, 0]])
    True
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

from ._common import _named_tensors, _unknown_name
from .spec import PermutationSpec

__all__ = ["apply_permutation"]


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
