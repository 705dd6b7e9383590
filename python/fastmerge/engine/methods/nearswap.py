"""``nearswap``: take the other model's value where it is near the base's.

Per entry, with a = base, b = the other model and ``t`` the distance scale (>= 0):
``w = clamp(t / max(|a − b|, 1e-6), 0, 1)`` and ``nearswap = w · b + (1 − w) · a``, so
entries within t of each other take b and distant ones stay near a. One fused pass
(:func:`fastmerge.ops.nearswap`, float32). mergekit evaluates ``t / d`` as
``t · (1 / d)`` (torch's rule for a number over a tensor), fastmerge as a true division:
the two differ by about one float32 rounding of the weight. Reference:
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001.
"""

from __future__ import annotations

from ... import ops
from ..registry import MergeMethod, Parameter, register


def merge(task, tensors, statistics=None):
    """The nearswap merge of one tensor (or of the same rows of both inputs)."""
    b = task.base_index
    return ops.nearswap(tensors[b], tensors[1 - b], task.shared["t"], out_dtype=task.dtype)


METHOD = register(
    MergeMethod(
        name="nearswap",
        description="the other model's value where it is within t of the base's",
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        parameters=(Parameter("t", float, "global", low=0.0, doc="distance scale of the swap"),),
        base="required",
        min_models=2,
        max_models=2,
        merge=merge,
    )
)
