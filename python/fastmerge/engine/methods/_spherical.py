"""What the spherical methods share (``slerp``, ``nuslerp``, ``multislerp``, ``karcher``,
``model_stock``): every one of them returns a linear combination of its inputs whose
coefficients depend only on the inputs' dot products. So each is two passes over memory:
the Gram matrix of the inputs (:func:`fastmerge.ops.gram`: float64 sums, per tensor, per
row or per column), a few scalar formulas on it, then one weighted sum
(:func:`fastmerge.ops.weighted_sum`; per row or column: one broadcast multiply-add per
input).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from ... import ops


def gram(tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor] = None,
         axis: Optional[int] = None) -> torch.Tensor:  # fmt: skip
    """float64 Gram matrix of `tensors` (minus `base`): (k, k) for the whole tensor, else
    (R, k, k) per row (``axis=-1``) or per column (``axis=0``)."""
    return ops.gram(list(tensors), base=base, axis=axis)


def combine(tensors: Sequence[torch.Tensor], coefficients: torch.Tensor, out_dtype: torch.dtype,
            axis: Optional[int] = None) -> torch.Tensor:  # fmt: skip
    """``Σ_i coefficients[..., i] · tensors[i]``: one weighted sum for a (k,) vector of
    coefficients (whole tensors), else per row (``axis=-1``, (R, k)) or per column
    (``axis=0``, (M, k)), in float32 (float64 for float64 inputs)."""
    if axis is None:
        return ops.weighted_sum(list(tensors), coefficients.tolist(), out_dtype=out_dtype,
                                accumulate_dtype=torch.float64)  # fmt: skip
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    shape = tensors[0].shape
    c = coefficients.to(dtype)
    if axis == 0 and len(shape) > 1:
        view = (shape[0], -1)
        out = sum(t.reshape(view) * c[None, :, i] for i, t in enumerate(tensors))
    else:
        view = (-1, shape[-1] if len(shape) else 1)
        out = sum(t.reshape(view) * c[:, i, None] for i, t in enumerate(tensors))
    return out.reshape(shape).to(out_dtype)


def norms(g: torch.Tensor) -> torch.Tensor:
    """The vectors' norms from their Gram matrix (or matrices)."""
    return torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(0).sqrt()
