"""What the task-vector methods share: their parameters and the per-tensor step.

``task_arithmetic``, ``ties``, ``dare_*``, ``breadcrumbs*`` and ``della*`` are one
computation with different switches (mergekit's generalized task arithmetic). Per tensor,
with τ_i = θ_i − base for every non-base model:

1. **sparsify** each τ_i to its ``density``: by magnitude (TIES: the ``max(1, int(d·n))``
   largest |τ|), a band of magnitudes (breadcrumbs: drop the ``int(γ·n)`` largest and the
   smallest), at random (DARE: keep with probability d), or at random with a per-row
   rank-dependent probability (DELLA);
2. with ``rescale``, multiply the kept entries by ``‖τ_i‖₁ / ‖kept τ_i‖₁`` (mergekit's
   rule, the default; skipped when either is below 1e-7) or, with
   ``rescale_rule: density``, by ``1 / d`` (the DARE paper's rule);
3. weight by ``weight``; with a sign consensus (TIES-like methods) elect the sign of the
   weighted sum per entry (``sum >= 0`` is positive: mergekit's rule, the default;
   ``zero_sum: drop`` keeps nothing where the sum is exactly 0, the TIES paper's
   ``sgn(0) = 0``) and keep the agreeing deltas;
4. sum; with ``normalize`` divide by the sum of the counted weights (where that is 0: by 1);
5. add ``lambda`` times the result to the base.

The thresholds come from :func:`fastmerge.ops.magnitude_threshold` (exact radix
selection; every entry tied with the threshold is kept, where mergekit keeps exactly k
and breaks ties by its sort order), the per-entry step from
:func:`fastmerge.ops.gta_combine` (one fused pass; DARE's masks are drawn inside it from a
counter-based hash of (seed, expert, entry)). DELLA's rank-dependent drop is
:func:`fastmerge.ops.magprune` (per row an exact rank, the same hash; one pass writes the
kept delta and its L1 norms), whose kept deltas the same fused combine then takes with
their rescale factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ... import ops
from ...merge.static import mask_seed
from ...reference.gta_combine import GOLDEN, MASK64
from ..registry import MergeMethod, Parameter

SPARSIFIERS = (None, "magnitude", "random", "magnitude_outliers", "della_magprune")
RESCALE_RULES = ("l1", "density")
ZERO_SUM_RULES = ("positive", "drop")
#: mergekit skips the L1 rescale when either norm is below this.
RESCALE_EPS = 1e-7


def parameters(normalize: bool, rescale: bool, sparsify: Optional[str] = None,
               consensus: bool = False) -> tuple[Parameter, ...]:  # fmt: skip
    """The parameters of a task-vector method with these defaults and switches."""
    params = [
        Parameter("weight", float, "non_base", 1.0, doc="the model's weight"),
        Parameter("density", float, "non_base", 1.0, low=0.0, high=1.0, low_open=True,
                  doc="fraction of the delta kept"),  # fmt: skip
        Parameter("normalize", bool, "global", normalize, doc="divide by the counted weights"),
        Parameter("lambda", float, "global", 1.0, doc="factor of the merged delta"),
        Parameter("rescale", bool, "global", rescale, doc="rescale the kept deltas"),
        Parameter("rescale_rule", str, "global", "l1",
                  doc="l1 (mergekit: keep the L1 norm) or density (DARE paper: 1/density)"),
        Parameter("int8_mask", bool, "global", False, doc="accepted; no effect in fastmerge"),
    ]  # fmt: skip
    if sparsify == "magnitude_outliers":
        params.append(Parameter("gamma", float, "non_base", 0.01, low=0.0, high=1.0,
                                doc="fraction of the largest deltas dropped"))  # fmt: skip
    if sparsify == "della_magprune":
        params.append(Parameter("epsilon", float, "non_base", 0.15, low=0.0, high=1.0,
                                doc="spread of the keep probabilities around density"))  # fmt: skip
    if consensus:
        params.append(Parameter("zero_sum", str, "global", "positive",
                                doc="sign where the weighted sum is 0: positive (mergekit) "
                                "or drop (TIES paper)"))  # fmt: skip
    return tuple(params)


@dataclass
class Selection:
    """Per expert: the kept band ``lower <= |τ| <= upper``, the rescale factor, and for
    the random sparsifiers the keep probability (DARE: masks drawn inside
    :func:`fastmerge.ops.gta_combine` from `seed`) or the kept delta itself (DELLA: τ
    where :func:`fastmerge.ops.magprune` keeps it, 0 elsewhere; None: the whole τ)."""

    lower: list[float]
    upper: list[float]
    scales: list[float]
    deltas: Optional[list[Optional[torch.Tensor]]] = None
    keep_probability: Optional[list[float]] = None
    seed: int = 0


def _experts(task) -> list[dict[str, Any]]:
    return [p for j, p in enumerate(task.per_input) if j != task.base_index]


def _kth_largest(base: torch.Tensor, experts: list[torch.Tensor], ks: list[int]) -> list[float]:
    """``|experts[t] - base|``'s ks[t]-th largest value, one selection pass per distinct k."""
    out: list[float] = [0.0] * len(experts)
    for k in dict.fromkeys(ks):
        group = [t for t in range(len(experts)) if ks[t] == k]
        values = ops.magnitude_threshold(base, [experts[t] for t in group], k)
        for t, v in zip(group, values.tolist()):
            out[t] = v
    return out


def select(task, base: torch.Tensor, experts, sparsify: Optional[str]) -> Selection:
    """The whole-tensor part of the merge of one tensor: thresholds, masks, rescales.

    `experts` may be an iterator (read one expert at a time, for row-block merges); a list
    of magnitude-trimmed experts is selected in one pass per distinct density."""
    params = _experts(task)
    n = base.numel()
    if sparsify == "magnitude" and isinstance(experts, list) and not task.shared["rescale"]:
        ks = [max(1, int(p["density"] * n)) if p["density"] < 1.0 and n else 0 for p in params]
        sparse = [t for t in range(len(experts)) if ks[t]]
        lower = [0.0] * len(experts)
        found = _kth_largest(base, [experts[t] for t in sparse], [ks[t] for t in sparse])
        for t, v in zip(sparse, found):
            lower[t] = v
        count = len(experts)
        return Selection(lower, [float("inf")] * count, [1.0] * count)
    out = Selection([], [], [], [] if sparsify == "della_magprune" else None)
    if sparsify in ("random", "della_magprune"):
        out.seed = mask_seed(task.seed, task.name, 0)
    if sparsify == "random":
        out.keep_probability = [min(1.0, p["density"]) for p in params]
    for t, expert in enumerate(experts):
        lower, upper, scale, delta = _select_one(task, t, params[t], base, expert, sparsify,
                                                 out.seed)  # fmt: skip
        out.lower.append(lower)
        out.upper.append(upper)
        out.scales.append(scale)
        if out.deltas is not None:
            out.deltas.append(delta)
    return out


def _select_one(task, t: int, p: dict, base: torch.Tensor, expert: torch.Tensor,
                sparsify: Optional[str], seed: int):  # fmt: skip
    """(lower, upper, scale, kept delta) of expert t (`seed`: the random sparsifiers' seed
    of the tensor; the kept delta: DELLA's, else None)."""
    n = base.numel()
    lower, upper = 0.0, float("inf")
    if sparsify is None or p["density"] >= 1.0 or n == 0:
        return lower, upper, 1.0, None
    d = p["density"]
    if sparsify == "della_magprune":
        delta, norms = ops.magprune(base, expert, d, p["epsilon"], seed=seed, expert_index=t)
        before, after = norms.tolist()  # float64 sums of |τ| and of the kept |τ|
        return lower, upper, _rescale(task, d, before, after), delta
    if sparsify == "magnitude":
        lower = _kth_largest(base, [expert], [max(1, int(d * n))])[0]
    elif sparsify == "magnitude_outliers":
        target, top = int(d * n), int(p["gamma"] * n)
        bottom = max(0, n - target - top)
        if target == 0:
            lower, upper = float("inf"), -1.0  # keeps nothing
        else:
            upper, lower = _kth_largest(
                base, [expert, expert], [n - bottom - target + 1, n - bottom]
            )
    scale = 1.0
    if task.shared["rescale"]:
        if task.shared["rescale_rule"] == "density":
            scale = 1.0 / d
        else:
            magnitude = (expert - base).abs_()
            before = magnitude.sum().item()  # float32, cascaded (mergekit: the same)
            if sparsify == "random":
                after = _random_kept_l1(base, expert, d, seed, t, magnitude)
            else:
                kept = (magnitude >= lower) & (magnitude <= upper)
                after = torch.where(kept, magnitude, 0).sum().item()
            scale = _rescale(task, d, before, after)
    return lower, upper, scale, None


def _rescale(task, density: float, before: float, after: float) -> float:
    """The factor of the kept deltas: 1 without ``rescale``; ``1 / density`` under
    ``rescale_rule: density``; else ``before / after`` (the L1 norms of τ and of the kept
    τ), 1 where either is below :data:`RESCALE_EPS` (or NaN)."""
    if not task.shared["rescale"]:
        return 1.0
    if task.shared["rescale_rule"] == "density":
        return 1.0 / density
    if before >= RESCALE_EPS and after >= RESCALE_EPS:
        return before / after
    return 1.0


def _random_kept_l1(base: torch.Tensor, expert: torch.Tensor, density: float, seed: int,
                    t: int, scratch: torch.Tensor) -> float:  # fmt: skip
    """Σ |τ_t| over the entries that :func:`fastmerge.ops.gta_combine` keeps for expert t
    of a call with `seed`: the same mask from a one-expert call whose seed is shifted so
    that its expert 0 draws expert t's stream (keys are ``mix64(seed + (t + 1) GOLDEN)``).
    `scratch` (a tensor of base's shape) is overwritten."""
    shifted = (int(seed) + t * GOLDEN) & MASK64
    kept = ops.gta_combine(base, [expert], [1.0], keep_probability=[density], seed=shifted,
                           out=scratch)  # base + the kept τ_t  # fmt: skip
    return kept.sub_(base).abs_().sum().item()


def combine(task, base: torch.Tensor, experts: list[torch.Tensor], selection: Selection,
            consensus: bool) -> torch.Tensor:  # fmt: skip
    """Steps 3-5 of the module doc for one tensor (or the same rows of every input)."""
    weights = [p["weight"] for p in _experts(task)]
    zero_sum = task.shared.get("zero_sum", "positive")
    if selection.deltas is None:
        return ops.gta_combine(
            base, experts, weights, lower=selection.lower, upper=selection.upper,
            scales=selection.scales, keep_probability=selection.keep_probability,
            seed=selection.seed, consensus=consensus, zero_sum=zero_sum,
            normalize=task.shared["normalize"], lam=task.shared["lambda"],
        )  # fmt: skip
    # DELLA: the kept deltas about a zero base (τ - 0 = τ exactly), τ of the experts that
    # keep everything (density 1) formed here; their rescale factors applied in the pass.
    deltas = [e - base if k is None else k for e, k in zip(experts, selection.deltas)]
    shared = task.shared
    return masked_combine(base, deltas, weights, scales=selection.scales, consensus=consensus,
                          zero_sum=zero_sum, normalize=shared["normalize"],
                          lam=shared["lambda"])  # fmt: skip


def masked_combine(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float],
                   **options: Any) -> torch.Tensor:  # fmt: skip
    """Steps 3-5 on deltas already masked (DELLA's path): the fused combine of the deltas
    about a zero base (τ − 0 = τ exactly; `options` as for :func:`fastmerge.ops.gta_combine`,
    e.g. the rescale ``scales``), then added to the base."""
    dtypes = {d.dtype for d in deltas}
    zero_dtype = dtypes.pop() if len(dtypes) == 1 else base.dtype  # no conversion copies
    zero = torch.zeros(base.shape, dtype=zero_dtype, device=base.device)
    out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    mixed = ops.gta_combine(zero, deltas, weights, out=out, **options)
    return mixed.add_(base)


def check_common(task) -> Optional[str]:
    """The checks every task-vector method makes of its resolved parameters."""
    rule = task.shared.get("rescale_rule", "l1")
    if rule not in RESCALE_RULES:
        return f"rescale_rule must be one of {', '.join(RESCALE_RULES)}, got {rule!r}"
    zero_sum = task.shared.get("zero_sum", "positive")
    if zero_sum not in ZERO_SUM_RULES:
        return f"zero_sum must be one of {', '.join(ZERO_SUM_RULES)}, got {zero_sum!r}"
    for j, p in enumerate(task.per_input):
        if j == task.base_index or "epsilon" not in p or p["density"] >= 1.0:
            continue
        d, e = p["density"], p["epsilon"]
        if not (0.0 < d - e and d + e < 1.0):
            return (
                f"epsilon {e:g} with density {d:g} makes a keep probability leave (0, 1) "
                f"(density - epsilon and density + epsilon must be in (0, 1)) for input {j}"
            )
    return None


def method(name: str, description: str, reference: str, *, sparsify: Optional[str],
           consensus: bool, normalize: bool, rescale: bool,
           check: Optional[Callable[[Any], Optional[str]]] = None) -> MergeMethod:  # fmt: skip
    """A task-vector :class:`~fastmerge.engine.registry.MergeMethod` with these switches."""
    if sparsify not in SPARSIFIERS:
        raise ValueError(f"sparsify must be one of {SPARSIFIERS}, got {sparsify!r}")

    def split(task, tensors):
        base = tensors[task.base_index]
        return base, [t for j, t in enumerate(tensors) if j != task.base_index]

    def merge(task, tensors, statistics=None):
        base, experts = split(task, tensors)
        selection = statistics if statistics is not None else select(task, base, experts, sparsify)
        return combine(task, base, experts, selection, consensus)

    def statistics(task, base, experts):
        return select(task, base, list(experts), sparsify)

    def check_all(task) -> Optional[str]:
        return check_common(task) or (check(task) if check is not None else None)

    random = sparsify in ("random", "della_magprune")
    return MergeMethod(
        name=name,
        description=description,
        reference=reference,
        parameters=parameters(normalize, rescale, sparsify, consensus),
        base="required",
        min_models=2,
        merge=merge,
        statistics=None if random else statistics,
        blockwise=lambda task: not random,
        check=check_all,
    )
