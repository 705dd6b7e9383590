"""Generalized task arithmetic: per-model weights and densities, optional trimming
(magnitude or random), optional sign consensus, optional normalization.

One function covers task arithmetic, TIES, DARE and DARE-TIES with per-model
parameters, in the form merge configuration files use. Where the parameters reduce to a
merge that has a fused implementation (uniform weights and density), that one runs:
:func:`~fastmerge.merge.ties` (fused threshold selection and combine kernels),
:func:`~fastmerge.merge.task_arithmetic` or :func:`~fastmerge.merge.dare`. Otherwise the
tensor is merged with torch operations (thresholds still from
:func:`fastmerge.ops.magnitude_threshold`).

Per tensor, with τ_t = θ_t - base:

1. trim: ``"magnitude"`` keeps the k_t largest ``|τ_t|`` (k_t from `density` and
   `keep_rounding`; entries tied with the k-th are kept too), ``"random"`` keeps each
   entry with probability `density` and rescales the kept ones by ``1 / density``;
2. δ_t = w_t τ_t;
3. with `consensus`, the elected sign is that of Σ_t δ_t and only the δ_t of that sign
   count (none where the sum is 0);
4. mixed = Σ δ_t (counted ones), divided by the sum of the counted weights when
   `normalize`;
5. result = base + scale · mixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from .. import ops
from .._dtypes import KERNEL_DTYPE_CODES
from ..io._memory import empty_tensor
from ._select import Patterns, StateDict, check_models, key_selector, load_key, mergeable
from .static import dare, mask_seed, task_arithmetic
from .ties import keep_count

TRIMS = (None, "magnitude", "random")


def keep_entries(density: float, n: int, rounding: str = "ceil") -> int:
    """Entries kept of an n-entry tensor: ``"ceil"`` is :func:`keep_count` (TIES's rule in
    fastmerge), ``"floor"`` is ``max(1, floor(density · n))`` (the rule of tools that
    take the top ``int(density · n)`` entries).

    Example:
        >>> keep_entries(0.3, 11), keep_entries(0.3, 11, "floor")
        (4, 3)
    """
    if rounding == "ceil":
        return keep_count(density, n)
    if rounding == "floor":
        return min(n, max(1, int(float(density) * n))) if n > 0 else 0
    raise ValueError(f"rounding must be 'ceil' or 'floor', got {rounding!r}")


def _per_model(values, count: int, default: float, name: str) -> list[float]:
    if values is None:
        return [default] * count
    if isinstance(values, (int, float)):
        return [float(values)] * count
    values = [float(v) for v in values]
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} experts")
    return values


def generalized_task_arithmetic(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    weights: Optional[Sequence[float]] = None,
    densities: Optional[Sequence[float]] = None,
    trim: Optional[str] = None,
    consensus: bool = False,
    normalize: bool = False,
    scale: float = 1.0,
    keep_rounding: str = "ceil",
    seed: int = 0,
    include: Patterns = None,
    exclude: Patterns = None,
    backend: Optional[str] = None,
) -> dict[str, torch.Tensor]:
    """Merge experts fine-tuned from `base` with per-model weights and densities.

    Args:
        base: the pre-trained state dict (may be lazy: each key is read once per model).
        experts: fine-tuned state dicts with the base's keys and shapes.
        weights: one weight per expert (a number: the same for all; default 1).
        densities: fraction kept per expert by `trim`, in (0, 1] (default 1).
        trim: None, ``"magnitude"`` (TIES) or ``"random"`` (DARE).
        consensus: elect a sign per entry and keep only agreeing deltas (TIES).
        normalize: divide by the sum of the (counted) weights.
        scale: the factor λ of the merged delta.
        keep_rounding: ``"ceil"`` or ``"floor"``, see :func:`keep_entries`.
        seed: seed of the random trim (same mask rule as :func:`~fastmerge.merge.dare`).
        include, exclude: regexes choosing the keys to merge; others are copied from base.
        backend: backend of the fused kernels.

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(3)}
        >>> experts = [{"w": torch.tensor([2.0, -1.0, 4.0])}, {"w": torch.tensor([1.0, 3.0, -1.0])}]
        >>> generalized_task_arithmetic(base, experts, weights=[1.0, 0.25])["w"].tolist()
        [2.25, -0.25, 3.75]
        >>> merged = generalized_task_arithmetic(base, experts, weights=[1.0, 0.25],
        ...                                      consensus=True, normalize=True)
        >>> [round(v, 4) for v in merged["w"].tolist()]  # (2 + 0.25) / 1.25, -1 / 1, 4 / 1
        [1.8, -1.0, 4.0]
    """
    keys = check_models(base, experts, "experts")
    merger = TensorMerge(
        len(experts), weights=weights, densities=densities, trim=trim, consensus=consensus,
        normalize=normalize, scale=scale, keep_rounding=keep_rounding, seed=seed, backend=backend,
    )  # fmt: skip
    selected = key_selector(include, exclude)
    merged = {}
    for key in keys:
        b = base[key]
        if not (selected(key, b) and mergeable(b)):
            merged[key] = b.clone()
            continue
        merged[key] = merger.merge(key, b, load_key(key, b, experts, "experts"))
    return merged


class TensorMerge:
    """The per-tensor step of :func:`generalized_task_arithmetic`, usable block by block.

    ``merge(key, base, experts)`` merges a whole tensor. For tensors too large to hold T+1
    copies of, and when :attr:`blockwise` (no random trim, whose mask spans the tensor):
    ``thresholds(key, base, experts)`` takes the experts one at a time (an iterable), then
    ``merge(key, base_rows, expert_rows, thresholds)`` merges any slice of rows with
    the same result as the whole tensor.

    Example:
        >>> import torch
        >>> m = TensorMerge(2, trim="magnitude", densities=[0.5, 0.5], consensus=True,
        ...                 normalize=True)
        >>> b, es = torch.zeros(4, 2), [torch.randn(4, 2), torch.randn(4, 2)]
        >>> thr = m.thresholds("w", b, iter(es))
        >>> halves = [m.merge("w", b[i:i + 2], [e[i:i + 2] for e in es], thr) for i in (0, 2)]
        >>> torch.equal(torch.cat(halves), m.merge("w", b, es))
        True
    """

    def __init__(
        self,
        num_experts: int,
        *,
        weights: Optional[Sequence[float]] = None,
        densities: Optional[Sequence[float]] = None,
        trim: Optional[str] = None,
        consensus: bool = False,
        normalize: bool = False,
        scale: float = 1.0,
        keep_rounding: str = "ceil",
        seed: int = 0,
        backend: Optional[str] = None,
    ) -> None:
        if trim not in TRIMS:
            raise ValueError(f"trim must be one of {TRIMS}, got {trim!r}")
        self.w = _per_model(weights, num_experts, 1.0, "weights")
        self.d = _per_model(densities, num_experts, 1.0, "densities")
        for x in self.d:
            if not 0.0 < x <= 1.0:
                raise ValueError(f"densities must be in (0, 1], got {x}")
        keep_entries(1.0, 1, keep_rounding)  # validates the rounding name
        self.trim, self.consensus, self.normalize = trim, bool(consensus), bool(normalize)
        self.scale, self.rounding = float(scale), keep_rounding
        self.seed, self.backend = int(seed), backend
        uniform = _uniform(self.w) and _uniform(self.d) and self.w[0] != 0
        # weights cancel in the normalized disjoint mean: the fused TIES kernel applies
        self._fused_ties = uniform and trim == "magnitude" and self.consensus and self.normalize
        self._uniform = uniform

    @property
    def blockwise(self) -> bool:
        """True when slices of rows can be merged separately (given the thresholds)."""
        return self.trim != "random"

    def thresholds(self, key: str, base: torch.Tensor, experts) -> Optional[list[torch.Tensor]]:
        """Per-expert trim thresholds of the whole tensor (None without a magnitude
        trim); `experts` may be an iterator, read one expert at a time. A list is selected
        in one pass per distinct density (every expert at once)."""
        if self.trim != "magnitude":
            return None
        n = base.numel()
        ks = [keep_entries(d, n, self.rounding) if n else 0 for d in self.d]
        if isinstance(experts, Sequence):
            # all experts in memory: one selection per distinct k over all of its experts,
            # so that the kernel reads the base once per pass for all of them
            experts = [e.to(base.device) for e in experts]
            out: list = [None] * len(experts)
            for k in dict.fromkeys(ks[: len(experts)]):
                group = [t for t in range(len(experts)) if ks[t] == k]
                values = ops.magnitude_threshold(
                    base, [experts[t] for t in group], k, backend=self.backend
                )
                for t, value in zip(group, values):
                    out[t] = value
            return out
        out = []
        for t, e in enumerate(experts):
            out.append(
                ops.magnitude_threshold(base, [e.to(base.device)], ks[t], backend=self.backend)[0]
            )
        return out

    def merge(self, key: str, base: torch.Tensor, experts: Sequence[torch.Tensor],
              thresholds: Optional[list[torch.Tensor]] = None) -> torch.Tensor:  # fmt: skip
        """Merge one tensor, or a slice of rows of it when `thresholds` (of the whole
        tensor) are given; the result has base's dtype."""
        experts = [e.to(base.device) for e in experts]
        if self.trim == "magnitude" and thresholds is None:
            thresholds = self.thresholds(key, base, experts)
        if self._fused_ties and base.numel() > 0:
            thr = torch.stack([t.to(base.device) for t in thresholds])
            return ops.ties_combine(
                base, experts, thr, scale=self.scale, out=_output_like(base), backend=self.backend
            )
        total_w = sum(self.w)
        divisor = total_w if self.normalize and abs(total_w) >= 1e-8 else 1.0
        if self._uniform and not self.consensus and self.trim is None:
            one_b, one_e = {key: base}, [{key: e} for e in experts]
            return task_arithmetic(one_b, one_e, scale=self.scale * self.w[0] / divisor)[key]
        if self._uniform and not self.consensus and self.trim == "random":
            one_b, one_e = {key: base}, [{key: e} for e in experts]
            scale = self.scale * self.w[0] / divisor
            return dare(one_b, one_e, drop=1.0 - self.d[0], scale=scale, seed=self.seed)[key]
        return self._merge_with_torch(key, base, experts, thresholds)

    def _merge_with_torch(self, key, b, tensors, thresholds) -> torch.Tensor:
        dtype = (
            torch.float64 if any(t.dtype == torch.float64 for t in [b, *tensors]) else torch.float32
        )
        bc = b.to(dtype)
        deltas = []
        for t, e in enumerate(tensors):
            tau = e.to(dtype) - bc
            if thresholds is not None:
                thr = thresholds[t].to(device=b.device, dtype=dtype)
                tau = torch.where(tau.abs() >= thr, tau, torch.zeros_like(tau))
            elif self.trim == "random" and self.d[t] < 1.0:
                gen = torch.Generator().manual_seed(mask_seed(self.seed, key, t))
                keep = (torch.rand(tau.shape, generator=gen) >= 1.0 - self.d[t]).to(tau.device)
                tau = torch.where(keep, tau / self.d[t], torch.zeros_like(tau))
            deltas.append(tau * self.w[t])
        total = torch.zeros_like(bc)
        for delta in deltas:
            total += delta
        if self.consensus:
            mixed = torch.zeros_like(bc)
            counted = torch.zeros_like(bc)
            for t, delta in enumerate(deltas):
                agrees = torch.where(total > 0, delta > 0, delta < 0) & (total != 0)
                mixed += torch.where(agrees, delta, torch.zeros_like(delta))
                counted += agrees.to(dtype) * self.w[t]
            divisor = torch.where(counted == 0, torch.ones_like(counted), counted)
        else:
            mixed = total
            divisor = sum(self.w) if abs(sum(self.w)) >= 1e-8 else 1.0
        if self.normalize:
            mixed = mixed / divisor
        return (bc + self.scale * mixed).to(b.dtype)


def _output_like(base: torch.Tensor) -> Optional[torch.Tensor]:
    """A new contiguous buffer of base's shape and dtype for a fused kernel to write (on
    the CPU one whose pages fault in cheaply), or None to let the op allocate."""
    if base.device.type != "cpu" or base.dtype not in KERNEL_DTYPE_CODES:
        return None
    return empty_tensor(base.shape, base.dtype)


def _uniform(values: list[float]) -> bool:
    return all(v == values[0] for v in values)
