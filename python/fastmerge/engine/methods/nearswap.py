"""``nearswap``: take the other model's value where it is near the base's.

Per entry, with a = base, b = the other model and ``t`` the distance scale (>= 0):
``w = clamp(t / max(|a − b|, 1e-6), 0, 1)`` and ``nearswap = w · b + (1 − w) · a``, so
entries within t of each other take b and distant ones stay near a. Elementwise in
float32, in place (two temporaries of the tensor's size). Reference:
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001.
"""

from __future__ import annotations

from ..registry import MergeMethod, Parameter, register


def merge(task, tensors, statistics=None):
    """The nearswap merge of one tensor (or of the same rows of both inputs)."""
    b = task.base_index
    a, other = tensors[b], tensors[1 - b]
    w = (a - other).abs_().clamp_(min=1e-6).reciprocal_().mul_(task.shared["t"]).clamp_(0, 1)
    out = (1 - w).mul_(a)
    return out.addcmul_(w, other)


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
