"""Weight Scope Alignment (WSA): align each layer's weight mean/std to a target scope.

* :func:`wsa_penalty` — the differentiable penalty (fused forward and backward).
* :class:`WeightScopeRegularizer` — the penalty as an ``nn.Module`` for a training loop.
* :func:`scope_of` — a model's scope; :func:`fuse_scopes` — one target from several.
"""

from .divergence import DIVERGENCES
from .penalty import wsa_penalty
from .regularizer import WeightScopeRegularizer
from .scope import FUSION_RULES, fuse_scopes, linear_and_conv_weights, scope_of, scoped_parameters

__all__ = [
    "DIVERGENCES",
    "FUSION_RULES",
    "WeightScopeRegularizer",
    "fuse_scopes",
    "linear_and_conv_weights",
    "scope_of",
    "scoped_parameters",
    "wsa_penalty",
]
