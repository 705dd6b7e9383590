"""Reference FeatureStats prologue: ``x - shift`` in the output dtype, and float64 column
sums and sums of squares of the stored values."""

from __future__ import annotations

import torch


def feature_center(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``x - shift`` (both rounded to ``out.dtype`` first) into `out`; return the
    float64 (2, cols) sums of `out` and of its squares over the rows."""
    out.copy_(x.to(out.dtype) - shift.to(out.dtype))
    d = out.to(torch.float64)
    return torch.stack([d.sum(0), (d * d).sum(0)])
