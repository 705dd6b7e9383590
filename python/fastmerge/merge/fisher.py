"""Fisher merging (Matena & Raffel, 2022, "Merging Models with Fisher-Weighted Averaging").

:func:`fisher_information` estimates the diagonal Fisher information of every trainable
parameter θ of a classifier: the mean over examples of the squared gradient of the example's
log-likelihood, ``F = E_x[(∂ log p(y | x; θ) / ∂θ)^2]``, with per-example gradients from
``torch.func.vmap(grad(...))`` over ``functional_call`` (one vectorized backward per batch,
not one per example). The label y is the data's (``labels="empirical"``) or the model's own
prediction (``labels="model"``: the argmax class, the most probable term of the true
Fisher). A model output of shape (B, C) is one label per example; (B, ..., C) with labels
(B, ...) sums the log-likelihoods of the positions (labels of -100 are ignored), as for
token classification or language modeling.

:func:`fisher_merge` returns the per-parameter Fisher-weighted average
``θ = Σ_i λ_i F_i θ_i / Σ_i λ_i F_i`` with model weights λ_i (default: equal). Every F_i is
floored at `floor` (default 1e-6) first: where no model's Fisher says anything (a
parameter that no example's gradient reaches) the result falls back to the λ-weighted
average instead of 0/0. Tensors without a Fisher (buffers, frozen parameters) are the
λ-weighted average; non-floating tensors are copied from the first model.

The Fisher sums and the example count are mergeable: with ``distributed`` (default: when a
torch.distributed group of more than one rank is initialized) each rank passes its own
shard of the data and both are summed over the ranks before the mean (one ``all_reduce``).
These functions need data, so they are a library API; ``fastmerge merge`` does not list them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from fastmerge.merge import fisher_information, fisher_merge
    >>> _ = torch.manual_seed(0)
    >>> models = [nn.Linear(4, 3), nn.Linear(4, 3)]
    >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    >>> fishers = [fisher_information(m, data) for m in models]
    >>> sorted(fishers[0]), fisher_merge(models, fishers).weight.shape
    (['bias', 'weight'], torch.Size([3, 4]))
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from .. import dist
from . import _data

__all__ = ["fisher_information", "fisher_merge"]

LABEL_SOURCES = ("empirical", "model")
#: Label value that marks a position without a label (as in torch's cross_entropy).
IGNORE_INDEX = -100
#: Default floor of every Fisher value in :func:`fisher_merge`.
DEFAULT_FLOOR = 1e-6

Model = Union[nn.Module, Mapping[str, torch.Tensor]]


def _log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of ``log p(label)`` over the positions of one example (labels -100 skipped)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    keep = labels != IGNORE_INDEX
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum()


def _check_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"fisher: labels must be class indices (integers), got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"fisher: labels of shape {tuple(labels.shape)} do not fit logits of shape "
            f"{tuple(logits.shape)} (expected {tuple(logits.shape[:-1])})"
        )


def fisher_information(
    model: nn.Module,
    data: Iterable[Any],
    *,
    labels: str = "empirical",
    max_batches: Optional[int] = None,
    chunk_size: Optional[int] = None,
    distributed: Optional[bool] = None,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher information of each trainable parameter of `model` on `data`.

    Args:
        model: a classifier whose output (a tensor, ``.logits`` or the first element) has
            the classes last. Run in eval mode (its flags are restored).
        data: batches ``(inputs, labels, ...)``, dicts with ``"labels"`` (the rest are
            keyword inputs), or bare input tensors with ``labels="model"``.
        labels: ``"empirical"`` (the data's labels) or ``"model"`` (the model's argmax).
        max_batches: use at most this many batches.
        chunk_size: examples per vectorized gradient (``vmap``'s chunk_size; default: the
            whole batch), to bound memory (batch x parameters values).
        distributed: sum over the ranks (default: when a multi-rank group is initialized).

    Returns:
        ``{parameter name: float32 tensor of its shape}``: mean squared per-example gradient.

    Raises:
        ValueError: an unknown `labels`, batches without labels for ``"empirical"``, labels
            that do not fit the logits, data without examples.

    Example:
        >>> from torch import nn
        >>> model = nn.Linear(2, 3)
        >>> x, y = torch.randn(5, 2), torch.tensor([0, 1, 2, 0, 1])
        >>> fisher = fastmerge.merge.fisher_information(model, [(x, y)])
        >>> loop = torch.zeros(3)
        >>> for i in range(5):  # the plain per-example loop
        ...     model.zero_grad()
        ...     torch.log_softmax(model(x[i:i + 1]), -1)[0, y[i]].backward()
        ...     loop += model.bias.grad ** 2 / 5
        >>> torch.allclose(fisher["bias"], loop, atol=1e-6)
        True
    """
    if labels not in LABEL_SOURCES:
        raise ValueError(f"labels must be one of {LABEL_SOURCES}, got {labels!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _data.check_max_batches(max_batches)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("fisher: the model has no trainable parameter")
    constants = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    constants.update({n: b for n, b in model.named_buffers()})
    device = _data.device_of(model)

    def example_ll(p: dict[str, torch.Tensor], inputs: Any, target: torch.Tensor):
        one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, inputs)
        kwargs = one if isinstance(one, Mapping) else {}
        args = () if isinstance(one, Mapping) else (one,)
        out = functional_call(model, {**p, **constants}, args, kwargs)
        return _log_likelihood(_data.logits_of(out)[0], target)

    per_example = vmap(grad(example_ll), in_dims=(None, 0, 0), chunk_size=chunk_size)
    sums = {
        n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()
    }
    count = 0
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for batch in _data.limited(_data.reusable(data, "data"), max_batches):
            inputs, target = _data.split_batch(batch)
            inputs = _data.to_device(inputs, device)
            if labels == "model" or target is None:
                if labels == "empirical":
                    raise ValueError(
                        "fisher: labels='empirical' needs labelled batches ((inputs, labels) "
                        "tuples or dicts with 'labels'); use labels='model' for bare inputs"
                    )
                with torch.no_grad():
                    target = _data.logits_of(_data.call(model, inputs)).argmax(-1)
            else:
                target = target.to(device) if device is not None else target
                if count == 0:  # a clear error instead of vmap's
                    with torch.no_grad():
                        _check_labels(_data.logits_of(_data.call(model, inputs)), target)
            if target.shape[0] == 0:
                continue
            grads = per_example(params, inputs, target)
            for n, g in grads.items():
                sums[n] += g.float().pow(2).sum(0)
            count += int(target.shape[0])
    finally:
        for m, flag in flags:
            m.training = flag
    if dist.should_reduce(distributed):
        names = list(sums)
        totals = dist.sum_tensors([sums[n] for n in names])
        sums = dict(zip(names, totals))
        count = int(dist.all_reduce_values([float(count)])[0])
    if count == 0:
        raise ValueError("fisher: data yielded no examples")
    return {n: s / count for n, s in sums.items()}


def _state(model: Model, i: int) -> Mapping[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        return model
    raise TypeError(f"models[{i}] must be an nn.Module or a state dict, got {type(model).__name__}")


def fisher_merge(
    models: Sequence[Model],
    fishers: Sequence[Mapping[str, torch.Tensor]],
    *,
    weights: Optional[Sequence[float]] = None,
    floor: float = DEFAULT_FLOOR,
) -> Model:
    """The Fisher-weighted average ``Σ_i λ_i F_i θ_i / Σ_i λ_i F_i`` of `models`.

    Args:
        models: nn.Modules (the result is a new model, a copy of the first) or state dicts
            (the result is a state dict), of one architecture.
        fishers: one ``{name: Fisher}`` per model (:func:`fisher_information`), the same
            names in each; tensors not named are λ-weighted averages.
        weights: λ_i, one non-negative weight per model (default: equal), not all 0.
        floor: every Fisher value is raised to at least this (> 0) before the average.

    Raises:
        ValueError: different architectures (names the first differing parameter), Fishers
            of other names or shapes (named), bad weights or floor.

    Example:
        >>> from fastmerge.merge import fisher_merge
        >>> a, b = {"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}
        >>> fa, fb = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([1.0, 3.0])}
        >>> [round(v, 4) for v in fisher_merge([a, b], [fa, fb])["w"].tolist()]  # F_a[1] = 0
        [0.5, 1.0]
    """
    if isinstance(models, (nn.Module, Mapping)) or not isinstance(models, Sequence) or not models:
        raise TypeError("models must be a non-empty list of nn.Modules or state dicts")
    states = [_state(m, i) for i, m in enumerate(models)]
    for i, s in enumerate(states[1:], start=1):
        _data.check_same_keys(states[0], s, f"models[{i}]", "models[0]")
    if isinstance(fishers, Mapping) or len(fishers) != len(models):
        raise ValueError(f"fishers must be a list with one dict per model ({len(models)})")
    lam = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    if len(lam) != len(models):
        raise ValueError(f"weights has {len(lam)} entries for {len(models)} models")
    if any(w < 0 for w in lam) or sum(lam) <= 0:
        raise ValueError(f"weights must be >= 0 and not all 0, got {lam}")
    if not float(floor) > 0:
        raise ValueError(f"floor must be > 0, got {floor!r}")
    names = set(fishers[0])
    for i, f in enumerate(fishers):
        if not isinstance(f, Mapping):
            raise TypeError(f"fishers[{i}] must be a dict of name -> tensor")
        if set(f) != names:
            odd = sorted(set(f) ^ names)[0]
            raise ValueError(f"fishers[{i}] and fishers[0] differ in parameter {odd!r}")
        for n, t in f.items():
            if n not in states[0]:
                raise ValueError(f"fishers[{i}] has {n!r}, which is not a tensor of the models")
            if tuple(t.shape) != tuple(states[0][n].shape):
                raise ValueError(
                    f"fishers[{i}][{n!r}] has shape {tuple(t.shape)}, the parameter "
                    f"{tuple(states[0][n].shape)}"
                )
    total = sum(lam)
    merged: dict[str, torch.Tensor] = {}
    for key, ref in states[0].items():
        if not ref.dtype.is_floating_point:
            merged[key] = ref.clone()
            continue
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        thetas = [s[key].to(ref.device, dtype) for s in states]
        if key in names:
            f = [fi[key].to(ref.device, dtype).clamp_min(float(floor)) * w
                 for fi, w in zip(fishers, lam)]  # fmt: skip
            value = sum(fi * t for fi, t in zip(f, thetas)) / sum(f)
        else:
            value = sum(w * t for w, t in zip(lam, thetas)) / total
        merged[key] = value.to(ref.dtype)
    if not isinstance(models[0], nn.Module):
        return merged
    out = copy.deepcopy(models[0])
    out.load_state_dict(merged)
    return out
