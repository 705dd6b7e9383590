"""Static merges without a kernel of their own: averaging, task arithmetic and DARE.

All of them walk the base's keys once, read each key once from every model (so lazily
loaded state dicts are never materialized whole), compute in float32 (float64 when an
input is float64) and return tensors in the base's dtype. Averaging is one fused
weighted sum per tensor (:func:`fastmerge.ops.weighted_sum`: every input read once, the
output written once). Task arithmetic keeps its own order of operations (the task vectors
θ_t - base first, as mergekit rounds them): written as one weighted sum,
``(1 - λT)·base + λ Σ θ_t``, float32 rounding differs, and a result rounded to bfloat16
then differs from mergekit's in rare entries. Keys that are not selected by
`include`/`exclude`, and non-floating tensors, are copied from the base.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Optional

import torch

from .. import ops
from .._dtypes import KERNEL_DTYPE_CODES
from ..io._memory import empty_tensor
from ._select import (
    Patterns,
    StateDict,
    check_models,
    compute_dtype,
    key_selector,
    load_key,
    merge_selected,
    mergeable,
)


def average(
    models: Sequence[StateDict],
    *,
    weights: Optional[Sequence[float]] = None,
    include: Patterns = None,
    exclude: Patterns = None,
) -> dict[str, torch.Tensor]:
    """Weighted average ``Σ_i w_i θ_i / Σ_i w_i`` of models with the same keys and shapes.

    Args:
        models: one or more state dicts (name -> tensor mappings).
        weights: one weight per model (default: equal); they must not sum to 0.
        include, exclude: regex or list of regexes selecting the keys to merge
            (``re.search``); other keys are copied from the first model.

    Example:
        >>> import torch
        >>> from fastmerge.merge import average
        >>> a, b = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([2.0, 4.0])}
        >>> average([a, b])["w"].tolist(), average([a, b], weights=[3, 1])["w"].tolist()
        ([1.0, 3.0], [0.5, 2.5])
    """
    first = models[0] if isinstance(models, Sequence) and len(models) > 0 else {}
    keys = check_models(first, models, "models")
    if weights is None:
        weights = [1.0] * len(models)
    weights = [float(w) for w in weights]
    if len(weights) != len(models):
        raise ValueError(f"weights has {len(weights)} entries for {len(models)} models")
    total = sum(weights)
    if total == 0:
        raise ValueError("weights sum to 0")
    selected = key_selector(include, exclude)
    merged = {}
    for key in keys:
        ref = first[key]
        if not (selected(key, ref) and mergeable(ref)):
            merged[key] = ref.clone()
            continue
        tensors = [ref, *load_key(key, ref, models[1:], "models")]
        merged[key] = weighted_sum_like(tensors, [w / total for w in weights], ref)
    return merged


def weighted_sum_like(
    tensors: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    like: torch.Tensor,
    *,
    accumulate_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``Σ_i coefficients[i] * tensors[i]`` in `like`'s dtype, shape and device: one fused
    pass (:func:`fastmerge.ops.weighted_sum`, float32 arithmetic, float64 for float64
    inputs or with `accumulate_dtype`) into a new buffer whose pages fault in cheaply
    (:func:`fastmerge.io.empty_tensor`). Dtypes the kernels do not take (float8) are
    summed with torch operations in float32 instead.
    """
    tensors = [t.to(like.device) for t in tensors]
    if all(t.dtype in KERNEL_DTYPE_CODES for t in [like, *tensors]):
        out = empty_tensor(like.shape, like.dtype) if like.device.type == "cpu" else None
        return ops.weighted_sum(
            tensors, coefficients, out=out, out_dtype=like.dtype, accumulate_dtype=accumulate_dtype
        )
    dtype = accumulate_dtype or compute_dtype(tensors)
    acc = torch.zeros(like.shape, dtype=dtype, device=like.device)
    for c, t in zip(coefficients, tensors):
        acc += c * t.to(dtype)
    return acc.to(like.dtype)


def task_arithmetic(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    scale: float = 1.0,
    include: Patterns = None,
    exclude: Patterns = None,
) -> dict[str, torch.Tensor]:
    """Task arithmetic: ``base + scale * Σ_t (θ_t - base)``.

    Args:
        base: the pre-trained state dict.
        experts: one or more fine-tuned state dicts with the base's keys and shapes.
        scale: the factor λ of the summed task vectors.
        include, exclude: as for :func:`average`; other keys are copied from the base.

    Raises:
        ValueError: no experts, or an expert whose keys or shapes differ from the base's
            (the message names the key and the expert).

    Example:
        >>> import torch
        >>> from fastmerge.merge import task_arithmetic
        >>> base = {"w": torch.tensor([1.0, 1.0])}
        >>> experts = [{"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([1.0, 3.0])}]
        >>> task_arithmetic(base, experts, scale=0.5)["w"].tolist()
        [1.5, 2.0]
    """
    return _sum_of_deltas(base, experts, scale, include, exclude, lambda key, t, tau: tau)


def dare(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    drop: float = 0.9,
    scale: float = 1.0,
    seed: int = 0,
    include: Patterns = None,
    exclude: Patterns = None,
) -> dict[str, torch.Tensor]:
    """DARE: drop each entry of each task vector with probability `drop`, rescale the
    kept ones by ``1 / (1 - drop)``, then task arithmetic with `scale`.

    Reproducible: the random mask of a tensor depends only on ``(seed, key, expert
    index)`` (a CPU ``torch.Generator`` seeded from a BLAKE2b hash of them), not on the
    order keys are visited or on the device.

    Args:
        base, experts, scale, include, exclude: as for :func:`task_arithmetic`.
        drop: drop probability, ``0 <= drop < 1``.
        seed: random seed.

    Example:
        >>> import torch
        >>> from fastmerge.merge import dare
        >>> base = {"w": torch.zeros(1000)}
        >>> merged = dare(base, [{"w": torch.ones(1000)}], drop=0.75, seed=1)["w"]
        >>> sorted(set(merged.tolist())), bool(200 < (merged > 0).sum() < 300)
        ([0.0, 4.0], True)
    """
    drop = float(drop)
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    keep_scale = 1.0 / (1.0 - drop)

    def dropped(key: str, t: int, tau: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(mask_seed(seed, key, t))
        keep = torch.rand(tau.shape, generator=gen) >= drop
        return torch.where(keep.to(tau.device), tau * keep_scale, torch.zeros_like(tau))

    return _sum_of_deltas(base, experts, scale, include, exclude, dropped)


def task_vectors(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    include: Patterns = None,
    exclude: Patterns = None,
) -> list[dict[str, torch.Tensor]]:
    """Task vectors ``θ_t - base`` of the selected floating keys, one dict per expert, in
    float32 (float64 for float64 inputs).

    Example:
        >>> import torch
        >>> from fastmerge.merge import task_vectors
        >>> base = {"w": torch.tensor([1.0]), "step": torch.tensor(3)}
        >>> task_vectors(base, [{"w": torch.tensor([4.0]), "step": torch.tensor(5)}])
        [{'w': tensor([3.])}]
    """
    keys = check_models(base, experts, "experts")
    selected = key_selector(include, exclude)
    vectors: list[dict[str, torch.Tensor]] = [{} for _ in experts]
    for key in keys:
        b = base[key]
        if not (selected(key, b) and mergeable(b)):
            continue
        tensors = load_key(key, b, experts, "experts")
        dtype = compute_dtype([b, *tensors])
        bc = b.to(dtype)
        for t, e in enumerate(tensors):
            vectors[t][key] = e.to(device=b.device, dtype=dtype) - bc
    return vectors


def _sum_of_deltas(base, experts, scale, include, exclude, transform) -> dict[str, torch.Tensor]:
    """``base + scale * Σ_t transform(key, t, θ_t - base)`` for the selected keys."""

    def merge_key(key: str, b: torch.Tensor, tensors: list) -> torch.Tensor:
        dtype = compute_dtype([b, *tensors])
        bc = b.to(dtype)
        total = torch.zeros_like(bc)
        for t, e in enumerate(tensors):
            total += transform(key, t, e.to(device=b.device, dtype=dtype) - bc)
        return (bc + scale * total).to(b.dtype)

    return merge_selected(base, experts, include, exclude, merge_key)


def mask_seed(seed: int, key: str, expert: int) -> int:
    """A 63-bit generator seed from (seed, key, expert index), stable across runs.

    Example:
        >>> mask_seed(0, "w", 1) == mask_seed(0, "w", 1) != mask_seed(0, "w", 2)
        True
    """
    digest = hashlib.blake2b(f"{int(seed)}\0{expert}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
