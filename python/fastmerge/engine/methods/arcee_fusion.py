"""``arcee_fusion``: keep the other model's changes where they matter most.

With b the base and p the other model, per entry
``importance = |p − b| · KL(softmax(p) ‖ softmax(b))`` (softmax and KL per row over the
last dimension, each probability + 1e-8), the threshold
``median + 1.5 · (q3 − q1)`` of the importances (quantile q: the sorted importance at
index ``int(q · (n − 1))``), and ``arcee_fusion = b + (p − b) · [importance >= threshold]``.
fastmerge takes the exact quantiles of every tensor; mergekit estimates them from a
random sample of 10^6 entries in tensors larger than that (so its result varies run to
run there). Reference: https://arcee.ai.
"""

from __future__ import annotations

import torch

from ... import ops
from ..registry import MergeMethod, register

EPS = 1e-8


def importance(p: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|p − b| times the per-row KL divergence of their softmaxes."""
    sp = torch.softmax(p, dim=-1) + EPS
    sb = torch.softmax(b, dim=-1) + EPS
    kl = (sp * torch.log(sp / sb)).sum(-1, keepdim=True)
    return (p - b).abs_().mul_(kl)


def threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 IQR of the (non-negative) `scores`, from exact order statistics: the
    ascending index ``int(q (n - 1))`` is the ``n - index``-th largest, one radix selection
    (:func:`fastmerge.ops.magnitude_threshold`) each."""
    n = scores.numel()
    zero = torch.zeros_like(scores)
    q1, median, q3 = (
        ops.magnitude_threshold(zero, [scores], n - int(q * (n - 1)))[0] for q in (0.25, 0.5, 0.75)
    )
    return median + 1.5 * (q3 - q1)


def merge(task, tensors, statistics=None):
    """The Arcee Fusion of one tensor."""
    b = tensors[task.base_index]
    p = tensors[1 - task.base_index]
    if b.numel() == 0:
        return b.clone()
    scores = importance(p, b)
    keep = scores >= threshold(scores)
    return b + (p - b) * keep


METHOD = register(
    MergeMethod(
        name="arcee_fusion",
        description="the other model's changes where their importance is an outlier",
        reference="https://arcee.ai",
        base="required",
        min_models=2,
        max_models=2,
        merge=merge,
        blockwise=lambda task: False,
    )
)
