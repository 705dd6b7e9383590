"""``passthrough``: one model's tensors as they are, optionally scaled.

Used with ``slices`` to stack layers of one or more models into a deeper one (the output
layers are renumbered and ``num_hidden_layers`` of ``config.json`` is updated). Each
tensor has exactly one input; ``scale`` (per model, default none) multiplies it.
Reference: mergekit's passthrough method (https://github.com/arcee-ai/mergekit).
"""

from __future__ import annotations

from ... import ops
from ..registry import MergeMethod, Parameter, register


def merge(task, tensors, statistics=None):
    """The input tensor, times ``scale`` when one is set."""
    scale = task.per_input[0].get("scale")
    if scale is None:
        return tensors[0]
    return ops.weighted_sum(tensors[:1], [scale], out_dtype=task.dtype)


METHOD = register(
    MergeMethod(
        name="passthrough",
        description="one model's tensors unchanged (layer stacking with slices), times scale",
        reference="https://github.com/arcee-ai/mergekit",
        parameters=(Parameter("scale", float, "model", None, doc="factor of the tensor"),),
        base="ignored",
        min_models=1,
        max_models=1,
        merge=merge,
    )
)
