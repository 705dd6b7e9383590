"""Weight Scope Alignment (WSA): align each layer's weight mean/std to a target scope.

* :func:`wsa_penalty` — the differentiable penalty (fused forward and backward).
* :class:`WeightScopeRegularizer` — the penalty as an ``nn.Module`` for a training loop.
* :func:`scope_of` — a model's scope; :func:`fuse_scopes` — one target from several.
* :func:`interpolate`, :func:`interpolation_curve`, :class:`Curve` — mode connectivity:
  the straight path between two models and its barrier (optionally after
  :func:`permutation_align`).
* :mod:`fastmerge.wsa.fl` — a federated-learning simulation (FedAvg, FedProx, FedAvg + WSA);
  :mod:`fastmerge.wsa.flower` — the same for Flower users (strategy ``FedWSA``).
"""

from . import fl
from .connectivity import Curve, interpolate, interpolation_curve, permutation_align, plot_curves
from .divergence import DIVERGENCES
from .penalty import wsa_penalty
from .regularizer import WeightScopeRegularizer
from .scope import FUSION_RULES, fuse_scopes, linear_and_conv_weights, scope_of, scoped_parameters

__all__ = [
    "Curve",
    "DIVERGENCES",
    "FUSION_RULES",
    "WeightScopeRegularizer",
    "fl",
    "fuse_scopes",
    "interpolate",
    "interpolation_curve",
    "linear_and_conv_weights",
    "permutation_align",
    "plot_curves",
    "scope_of",
    "scoped_parameters",
    "wsa_penalty",
]
