"""What the data-aware merges (RegMean, Fisher) share: batches, model calls, architecture
checks and the forward that stops after the last layer whose inputs are needed."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

#: Keys of a dict batch that are targets, not model inputs.
LABEL_KEYS = ("labels", "label")


class StopForward(Exception):
    """Raised by a forward pre-hook once every input a pass needs has been seen."""


def check_models(models: Any, what: str = "models") -> list[nn.Module]:
    """`models` as a non-empty list of nn.Modules of one architecture (the same state-dict
    keys and shapes); the error names the first parameter that differs.

    Example:
        >>> from torch import nn
        >>> len(check_models([nn.Linear(2, 3), nn.Linear(2, 3)]))
        2
    """
    if isinstance(models, nn.Module) or not isinstance(models, Sequence) or not models:
        raise TypeError(f"{what} must be a non-empty list of nn.Modules")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{what}[{i}] is a {type(m).__name__}, not an nn.Module")
    reference = models[0].state_dict()
    for i, m in enumerate(models[1:], start=1):
        check_same_keys(reference, m.state_dict(), f"{what}[{i}]", f"{what}[0]")
    return list(models)


def check_same_keys(ref: Mapping[str, Any], other: Mapping[str, Any], name: str, ref_name: str):
    """Raise a ValueError naming the first key whose presence or shape differs."""
    for key, value in ref.items():
        if key not in other:
            raise ValueError(
                f"{name} has no parameter {key!r} (which {ref_name} has): the models do not "
                "have the same architecture"
            )
        if tuple(other[key].shape) != tuple(value.shape):
            raise ValueError(
                f"{name}: parameter {key!r} has shape {tuple(other[key].shape)} but "
                f"{tuple(value.shape)} in {ref_name}: the models do not have the same "
                "architecture"
            )
    extra = [k for k in other if k not in ref]
    if extra:
        raise ValueError(
            f"{name} has parameter {extra[0]!r}, which {ref_name} does not have: the models "
            "do not have the same architecture"
        )


def is_batch(item: Any) -> bool:
    """A tensor, a dict, or a tuple starting with a tensor (``(inputs, labels)``)."""
    if isinstance(item, (torch.Tensor, Mapping)):
        return True
    return isinstance(item, tuple) and bool(item) and isinstance(item[0], torch.Tensor)


def reusable(data: Any, what: str) -> Iterable[Any]:
    """`data` checked to be an iterable of batches; an iterator is listed (read once)."""
    if isinstance(data, (torch.Tensor, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(
            f"{what} must be an iterable of batches (tensors, (inputs, labels) tuples or "
            f"dicts), got {type(data).__name__}; wrap a single batch in a list: [x]"
        )
    return list(data) if iter(data) is data else data


def per_model(data: Any, n_models: int) -> list[Iterable[Any]]:
    """One iterable of batches per model: `data` itself when it is a list/tuple of
    `n_models` iterables that are not batches, else `data` shared by every model."""
    if (
        isinstance(data, (list, tuple))
        and len(data) == n_models
        and not any(is_batch(item) for item in data)
        and all(isinstance(item, Iterable) for item in data)
    ):
        return [reusable(item, f"data[{i}]") for i, item in enumerate(data)]
    shared = reusable(data, "data")
    return [shared] * n_models


def limited(data: Iterable[Any], max_batches: Optional[int]) -> Iterable[Any]:
    """The first `max_batches` batches of `data` (all when None)."""
    return data if max_batches is None else itertools.islice(data, max_batches)


def check_max_batches(max_batches: Optional[int]) -> None:
    if max_batches is None:
        return
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")


def device_of(model: nn.Module) -> Optional[torch.device]:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def to_device(x: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(t, device) for t in x)
    return x


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, labels or None)`` of a batch: a tensor (no labels), ``(inputs, labels,
    ...)`` or a dict (labels under ``"labels"``/``"label"``, the rest are inputs)."""
    if isinstance(batch, Mapping):
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}, labels
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("data yielded an empty tuple/list; expected (inputs, labels)")
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def call(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, ``output.logits`` or ``output[0]``."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def averaged_copy(models: Sequence[nn.Module]) -> nn.Module:
    """A deep copy of ``models[0]`` with every floating tensor the uniform average."""
    merged = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    with torch.no_grad():
        for key, value in merged.state_dict().items():
            if value.dtype.is_floating_point and len(models) > 1:
                total = sum(s[key].to(value.device, torch.float64) for s in states)
                value.copy_(total / len(models))
    return merged
