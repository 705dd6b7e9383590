"""What the task-vector methods share: their parameters and the per-tensor step.

``task_arithmetic``, ``ties``, ``dare_ties`` and ``dare_linear`` are one computation with
different switches (mergekit's generalized task arithmetic): per tensor, with
τ_i = θ_i − base for every non-base model, trim each τ_i to its ``density`` (by magnitude
for TIES, at random for DARE), weight it by ``weight``, elect a sign per entry and keep the
agreeing deltas (TIES and DARE-TIES), sum, divide by the sum of the counted weights when
``normalize``, and add ``lambda`` times the result to the base. The step is
:class:`fastmerge.merge.TensorMerge` (fused threshold-selection and TIES kernels).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Optional

from ...merge import TensorMerge
from ..registry import MergeMethod, Parameter


def parameters(normalize: bool, rescale: bool) -> tuple[Parameter, ...]:
    """The parameters every task-vector method takes, with its own defaults."""
    return (
        Parameter("weight", float, "non_base", 1.0, doc="the model's weight"),
        Parameter(
            "density",
            float,
            "non_base",
            1.0,
            low=0.0,
            high=1.0,
            low_open=True,
            doc="fraction of the delta kept",
        ),  # fmt: skip
        Parameter("normalize", bool, "global", normalize, doc="divide by the counted weights"),
        Parameter("lambda", float, "global", 1.0, doc="factor of the merged delta"),
        Parameter("rescale", bool, "global", rescale, doc="rescale kept deltas (DARE)"),
        Parameter("int8_mask", bool, "global", False, doc="accepted; no effect in fastmerge"),
    )


@lru_cache(maxsize=256)
def _merger(key: tuple) -> TensorMerge:
    trim, consensus, weights, densities, normalize, scale, seed = key
    return TensorMerge(
        len(weights),
        weights=list(weights),
        densities=list(densities),
        trim=trim,
        consensus=consensus,
        normalize=normalize,
        scale=scale,
        keep_rounding="floor",  # the top int(density * n) entries, as mergekit keeps
        seed=seed,
    )


def tensor_merge(task, trim: Optional[str], consensus: bool) -> TensorMerge:
    """The :class:`~fastmerge.merge.TensorMerge` of one task's resolved parameters."""
    experts = [p for j, p in enumerate(task.per_input) if j != task.base_index]
    return _merger((
        trim, consensus, tuple(p["weight"] for p in experts),
        tuple(p["density"] for p in experts), task.shared["normalize"],
        task.shared["lambda"], task.seed,
    ))  # fmt: skip


def method(name: str, description: str, reference: str, *, trim: Optional[str],
           consensus: bool, normalize: bool, rescale: bool,
           check: Optional[Callable[[Any], Optional[str]]] = None) -> MergeMethod:  # fmt: skip
    """A task-vector :class:`~fastmerge.engine.registry.MergeMethod` with these switches."""

    def split(task, tensors):
        base = tensors[task.base_index]
        return base, [t for j, t in enumerate(tensors) if j != task.base_index]

    def merge(task, tensors, statistics=None):
        base, experts = split(task, tensors)
        return tensor_merge(task, trim, consensus).merge(task.name, base, experts, statistics)

    def statistics(task, base, experts):
        return tensor_merge(task, trim, consensus).thresholds(task.name, base, experts)

    return MergeMethod(
        name=name,
        description=description,
        reference=reference,
        parameters=parameters(normalize, rescale),
        base="required",
        min_models=2,
        merge=merge,
        statistics=statistics if trim == "magnitude" else None,
        blockwise=lambda task: trim != "random",
        check=check,
    )
