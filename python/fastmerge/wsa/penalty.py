"""The WSA penalty: sum over layers of a divergence between each layer's weight scope
and a target scope, with a fused one-pass backward."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

from .._tensors import as_tensor_list
from ..ops._library import define, tracing
from ..ops.scope_grad import scope_grad_op
from ..ops.scope_stats import scope_stats_op
from ..stats import ScopeStats
from .divergence import DIVERGENCES

Target = Union[ScopeStats, tuple]
REDUCTIONS = ("sum", "mean")


def wsa_penalty(
    tensors: Sequence[torch.Tensor],
    target: Target,
    *,
    divergence: str = "kl",
    reduction: str = "sum",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Differentiable Weight Scope Alignment penalty of a list of weight tensors.

    ``sum_l D(N(mu_l, sigma_l^2) || N(mu_t,l, sigma_t,l^2))`` where (mu_l, sigma_l) is the
    mean and population std of ``tensors[l]`` and D is, by ``divergence``:

    * ``"kl"`` (default): KL(layer || target) = log(st/s) + (s^2 + (m-mt)^2)/(2 st^2) - 1/2
    * ``"reverse_kl"``: KL(target || layer)
    * ``"w2"``: squared 2-Wasserstein distance (m-mt)^2 + (s-st)^2 (finite at s = 0)

    The target is a constant (no gradient flows into it). The forward is one fused
    :func:`~fastmerge.scope_stats` pass; the backward writes every tensor's gradient
    in one fused :func:`~fastmerge.ops.scope_grad` pass (it is affine in w - mu_l).

    Args:
        tensors: the weights, e.g. ``[m.weight for m in linear_layers]``.
        target: a :class:`~fastmerge.ScopeStats` with one entry per tensor (or one entry
            for all), or a ``(mean, std)`` pair of numbers or 1-D tensors.
        divergence: ``"kl"``, ``"reverse_kl"`` or ``"w2"``.
        reduction: ``"sum"`` over layers or their ``"mean"``.
        backend: as for :func:`~fastmerge.scope_stats`.

    Returns:
        A scalar in the tensors' dtype (at least float32).

    Raises:
        ValueError: a target std that is not positive, a target of the wrong length,
            an empty tensor, or an unknown divergence or reduction.

    Example:
        >>> import torch, fastmerge
        >>> w = torch.randn(64, 32, requires_grad=True)
        >>> loss = fastmerge.wsa_penalty([w], (0.0, 0.05))
        >>> loss.backward()
        >>> w.grad.shape
        torch.Size([64, 32])
    """
    _check_options(divergence, reduction)
    ts = _weights(tensors)
    target_mean, target_std = _target_tensors(target, len(ts), ts[0].device)
    return penalty_op(ts, target_mean, target_std, divergence, reduction, backend)[0]


def _check_options(divergence: str, reduction: str) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def _weights(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    ts = as_tensor_list(tensors, "tensors")
    if not ts:
        raise ValueError("tensors is empty: the penalty needs at least one weight tensor")
    for i, t in enumerate(ts):
        if t.numel() == 0:
            raise ValueError(f"tensors[{i}] is empty: its scope is undefined")
    return ts


def _target_tensors(
    target: Target, n: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(target, ScopeStats):
        mean, std = target.mean, target.std
    elif isinstance(target, (tuple, list)) and len(target) == 2:
        mean, std = target
    else:
        raise TypeError(
            f"target must be a ScopeStats or a (mean, std) pair, got {type(target).__name__}"
        )
    mean = torch.as_tensor(mean, dtype=torch.float64).to(device).reshape(-1)
    std = torch.as_tensor(std, dtype=torch.float64).to(device).reshape(-1)
    for name, value in (("mean", mean), ("std", std)):
        if value.shape[0] not in (1, n):
            raise ValueError(
                f"target {name} has {value.shape[0]} entries; expected 1 or one per tensor ({n})"
            )
    check_target(mean, std)
    return mean.expand(n), std.expand(n)


def check_target(mean: torch.Tensor, std: torch.Tensor) -> None:
    """ValueError for a non-finite target mean or a target std that is not positive and
    finite. Traced (torch.compile, export), the checks are asserts in the graph, which
    raise RuntimeError with the same message when the values are bad: the values are not
    known while tracing, and a Python branch on them would break the graph."""
    if tracing(mean, std):
        torch._assert_async(torch.isfinite(mean).all(), "target mean must be finite")
        good = ((std > 0) & torch.isfinite(std)).all()
        torch._assert_async(good, "target std must be positive and finite")
        return
    if not bool(torch.isfinite(mean).all()):
        raise ValueError("target mean must be finite")
    if not bool((std > 0).all()) or not bool(torch.isfinite(std).all()):
        bad = int(torch.nonzero(~((std > 0) & torch.isfinite(std)))[0])
        raise ValueError(
            f"target std must be positive and finite; entry {bad} is {float(std[bad])}"
        )


# ---- the op: value and the backward's coefficients in one fused scope_stats pass --------


def _kernel(tensors, target_mean, target_std, divergence, reduction, backend):
    """(penalty, coefficients): coefficients are the float64 rows (mean, alpha, beta) of
    the gradient ``alpha + beta (w - mean)`` per tensor, for a unit upstream gradient."""
    stats = scope_stats_op.kernel(list(tensors), backend)
    mean, std, n = stats[0], stats[1], stats[2]
    value, d_mean, d_std = DIVERGENCES[divergence](mean, std, target_mean, target_std)
    scale = 1.0 / len(tensors) if reduction == "mean" else 1.0
    # d sigma / d w = (w - mu) / (n sigma); at sigma = 0 use the zero subgradient.
    beta = torch.where(std > 0, d_std * scale / (n * std), torch.zeros_like(n))
    coefficients = torch.stack([mean, d_mean * scale / n, beta])
    return (value.sum() * scale).to(_out_dtype(tensors)), coefficients


def _fake(tensors, target_mean, target_std, divergence, reduction, backend):
    first = tensors[0]
    return (
        first.new_empty((), dtype=_out_dtype(tensors)),
        first.new_empty((3, len(tensors)), dtype=torch.float64),
    )


def _setup_context(ctx, inputs, output) -> None:
    tensors, *_, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(output[1], *tensors)


def _backward(ctx, grad_value, grad_coefficients):
    coefficients, *tensors = ctx.saved_tensors
    needed = [i for i, need in enumerate(ctx.needs_input_grad[0]) if need]
    grads: list[Optional[torch.Tensor]] = [None] * len(tensors)
    if needed:
        g = grad_value.to(torch.float64)
        scaled = coefficients * torch.stack([torch.ones_like(g), g, g])[:, None]
        if len(needed) < len(tensors):
            scaled = scaled[:, needed]
        computed = scope_grad_op([tensors[i] for i in needed], scaled, ctx.backend)
        for i, grad in zip(needed, computed):
            grads[i] = grad
    return grads, None, None, None, None, None


def _out_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    out = torch.float32
    for t in tensors:
        out = torch.promote_types(out, t.dtype)
    return out


penalty_op = define(
    "wsa_penalty",
    "(Tensor[] tensors, Tensor target_mean, Tensor target_std, str divergence, str reduction, "
    "str? backend) -> (Tensor, Tensor)",
    _kernel,
    _fake,
    backward=_backward,
    setup_context=_setup_context,
)
