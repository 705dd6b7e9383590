"""Private helpers shared by the modules of :mod:`fastmerge.pleas`.

The tensors of a model by name, the example-input check, the hint for models fx cannot
trace and the weight axes of a Conv/Linear layer: used by the permutation groups
(:mod:`~fastmerge.pleas.spec`, :mod:`~fastmerge.pleas.permute`) and by the matching,
allocation and merging stages, which import them from here (or, as before, from
:mod:`fastmerge.pleas.groups`). And the data and device plumbing that every stage shares:
a batch's model input, moving it to the model's device, calling the model, and reading
`data` once into a reusable list (still importable from :mod:`~fastmerge.pleas.matching`
and :mod:`~fastmerge.pleas.least_squares_stage`, where they were first).
"""

from __future__ import annotations

import difflib
import itertools
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

__all__: list[str] = []

_FROM_AXES_HINT = (
    "Describe the groups explicitly with fastmerge.pleas.PermutationSpec.from_axes(model, "
    "{'group': [('fc1.weight', 0), ('fc1.bias', 0), ('fc2.weight', 1)], ...})."
)


_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _layer_axes(module: nn.Module) -> tuple[int, int] | None:
    """(input dim, output dim) of a Conv/Linear layer's weight, None for other modules."""
    if isinstance(module, _TRANSPOSED_TYPES):
        return 0, 1
    if isinstance(module, _LAYER_TYPES):
        return 1, 0
    return None


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and (non-None) buffer of `model` by name, shared ones under each name."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        out[name] = t
    for name, t in model.named_buffers(remove_duplicate=False):
        if t is not None:
            out[name] = t
    return out


def _unknown_name(name: str, known: Sequence[str]) -> str:
    """The error text for a parameter/buffer `name` not in `known`, with close matches."""
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return f"the model has no parameter or buffer named {name!r}{hint}"


def _as_inputs(example_input: Any) -> tuple:
    """`example_input` (a tensor or a sequence of tensors) as a tuple of positional inputs."""
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and all(
        isinstance(t, torch.Tensor) for t in example_input
    ):
        return tuple(example_input)
    raise TypeError(
        "example_input must be a tensor or a tuple of tensors (the model's positional "
        f"inputs), got {type(example_input).__name__}"
    )


def _first_input(batch: Any) -> Any:
    """A batch of model inputs: the batch itself, or the first element of a tuple/list."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("data yielded an empty tuple/list; expected inputs or (input, ...)")
        return batch[0]
    return batch


def _to_device(x: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(t, device) for t in x)
    return x


def _device_of(model: nn.Module) -> Optional[torch.device]:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def _call(model: nn.Module, x: Any) -> Any:
    return model(*x) if isinstance(x, tuple) else model(x)


def _batch_list(data: Iterable[Any]) -> Iterable[Any]:
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be an iterable of input batches (or of (input, target) tuples), got "
            f"{type(data).__name__}; wrap a single batch in a list: [x]"
        )
    return list(data) if iter(data) is data else data  # an iterator is consumed once
