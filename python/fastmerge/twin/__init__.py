"""Twin-Merging: a shared expert plus per-task exclusive knowledge, mixed per input.

1. :class:`TwinMerger` merges T fine-tuned experts of one base into a shared expert
   (task arithmetic, TIES, DARE, averaging or a callable) and keeps each task's
   ``theta_t - theta_shared`` as truncated-SVD factors (2-D tensors) or dense deltas
   (the rest); :meth:`TwinMerger.save` / :meth:`TwinMerger.load` use safetensors.
2. :func:`fit_router` trains the :class:`Router` MLP on features of the shared model
   (:meth:`TwinModel.features`, :func:`default_features`).
3. :class:`TwinModel` serves mixed-task batches: each routed ``nn.Linear`` computes
   ``W_s x + sum_t g_t(x) U_t S_t V_t^T x`` with :func:`fastmerge.lowrank_mixture`.

Example:
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> base = net.state_dict()
    >>> experts = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    >>> merger = fastmerge.twin.TwinMerger(
    ...     base, experts, shared_kwargs={"scale": 0.5}, rank=0.5, progress=False
    ... )
    >>> model = fastmerge.twin.TwinModel(net, merger)
    >>> model(torch.randn(3, 4), gates=torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])).shape
    torch.Size([3, 2])
"""

import warnings
from typing import Any

from .merger import TwinMerger, TwinSizes, load_twin, save_twin
from .model import GateContext, RoutedLinear, TwinModel
from .router import (
    Router,
    RouterHistory,
    default_features,
    fit_router,
    gates_from_logits,
    load_router,
    mean_pool,
)
from .svd import TruncatedSVD, resolve_rank, truncated_svd

__all__ = [
    "GateContext",
    "RoutedLinear",
    "Router",
    "RouterHistory",
    "TruncatedSVD",
    "TwinMerger",
    "TwinModel",
    "TwinSizes",
    "default_features",
    "fit_router",
    "gates_from_logits",
    "load_router",
    "load_twin",
    "mean_pool",
    "resolve_rank",
    "save_twin",
    "truncated_svd",
]


def __getattr__(name: str) -> Any:
    """``fastmerge.twin.key_selector``: deprecated, fastmerge's one key selector is
    :func:`fastmerge.merge.key_selector` (the same function)."""
    if name == "key_selector":
        warnings.warn(
            "fastmerge.twin.key_selector is deprecated; use fastmerge.merge.key_selector "
            "(the same function: regexes, lists or a callable (key, tensor) -> bool)",
            DeprecationWarning,
            stacklevel=2,
        )
        from ..merge import key_selector

        return key_selector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
