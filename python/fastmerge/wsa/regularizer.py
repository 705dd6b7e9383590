"""``WeightScopeRegularizer``: the WSA term as an ``nn.Module`` to add to a task loss."""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch import nn

from ..stats import ScopeStats
from .penalty import _check_options, _weights, check_target, penalty_op
from .scope import Include, scope_of, scoped_parameters

#: lambda when `strength` is not given. The WSA quality study (docs/wsa.md) found lambda
#: 0.01 harmless with either target and the former default, ``"init"`` with lambda 1, the
#: worst setting (-5.5 points of raw-path midpoint accuracy, -6.5 in federated learning).
DEFAULT_STRENGTH = 0.01


class WeightScopeRegularizer(nn.Module):
    """``strength * wsa_penalty(selected weights of module, target)`` on every call.

    Args:
        module: the model being trained; its parameters are read at call time.
        target: a :class:`~fastmerge.ScopeStats` with one entry per selected parameter
            (e.g. a fused scope from :func:`fuse_scopes`), a ``(mean, std)`` pair for all
            layers, or ``"init"`` for the module's own scope at construction.
        strength: lambda, the weight of the term in the loss. Default
            :data:`DEFAULT_STRENGTH` (0.01), which the WSA quality study supports; it was
            1.0 up to fastmerge 0.1.0, so leaving it out warns (``FutureWarning``) until
            the next minor release: pass it explicitly.
        include: parameter filter (default: Linear/Conv weights).
        divergence, reduction: as for :func:`fastmerge.wsa_penalty`.

    The target is stored as buffers, so it follows ``.to(device)`` and ``state_dict``.
    Use :meth:`set_target` to move it (e.g. to the server's fused scope each round).

    Example:
        >>> import torch, fastmerge
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> reg = fastmerge.wsa.WeightScopeRegularizer(model, "init", strength=0.1)
        >>> loss = model(torch.randn(5, 8)).square().mean() + reg()
        >>> loss.backward()
    """

    def __init__(
        self,
        module: nn.Module,
        target: Union[ScopeStats, tuple, str] = "init",
        strength: Optional[float] = None,
        include: Optional[Include] = None,
        *,
        divergence: str = "kl",
        reduction: str = "sum",
    ) -> None:
        super().__init__()
        if strength is None:
            warnings.warn(
                f"WeightScopeRegularizer's default strength is now {DEFAULT_STRENGTH} (it was "
                "1.0 up to fastmerge 0.1.0; the WSA quality study in docs/wsa.md found lambda 1 "
                "with the 'init' target the worst setting); pass strength= explicitly to "
                "silence this warning",
                FutureWarning,
                stacklevel=2,
            )
            strength = DEFAULT_STRENGTH
        if strength < 0:
            raise ValueError(f"strength must be non-negative, got {strength}")
        # Kept out of the module tree on purpose: the regularizer must not re-register
        # (and so duplicate in state_dict / parameters()) the model it regularizes.
        self.__dict__["module"] = module
        self.include = include
        self.strength = float(strength)
        _check_options(divergence, reduction)
        self.divergence = divergence
        self.reduction = reduction
        self.names = tuple(name for name, _ in scoped_parameters(module, include))
        if not self.names:
            raise ValueError("no parameter of the module matches `include`")
        self.register_buffer("target_mean", torch.empty(0, dtype=torch.float64))
        self.register_buffer("target_std", torch.empty(0, dtype=torch.float64))
        self.set_target(target)

    def set_target(self, target: Union[ScopeStats, tuple, str]) -> None:
        """Replace the target scope (same forms as the constructor's `target`)."""
        if isinstance(target, str):
            if target != "init":
                raise ValueError(
                    f"target must be a ScopeStats, a (mean, std) pair or 'init', got {target!r}"
                )
            target = scope_of(self.module, self.include)
        if isinstance(target, ScopeStats):
            if (
                target.names is not None
                and len(target) == len(self.names)
                and target.names != self.names
            ):
                raise ValueError(
                    "target scope describes other parameters than the module's (names differ)"
                )
            mean, std = target.mean, target.std
        else:
            mean, std = target
        n = len(self.names)
        device = next(self.module.parameters()).device
        mean = torch.as_tensor(mean, dtype=torch.float64).to(device).reshape(-1).expand(n).clone()
        std = torch.as_tensor(std, dtype=torch.float64).to(device).reshape(-1)
        if std.shape[0] not in (1, n):
            raise ValueError(f"target std has {std.shape[0]} entries; expected 1 or {n}")
        std = std.expand(n).clone()
        check_target(mean, std)
        self.target_mean, self.target_std = mean, std

    def forward(self) -> torch.Tensor:
        # The target was checked once, by set_target: no per-step check of its values,
        # which would also be a data-dependent branch under torch.compile.
        params = _weights([p for _, p in scoped_parameters(self.module, self.include)])
        if len(params) != self.target_mean.shape[0]:
            raise ValueError(
                f"the module has {len(params)} scoped parameters now but the target has "
                f"{self.target_mean.shape[0]} entries (set_target after changing the model)"
            )
        penalty, _ = penalty_op(
            params, self.target_mean, self.target_std, self.divergence, self.reduction, None
        )
        return self.strength * penalty

    def extra_repr(self) -> str:
        return (
            f"layers={len(self.names)}, strength={self.strength}, "
            f"divergence={self.divergence!r}, reduction={self.reduction!r}"
        )
