"""``feature_cost``: feature-matching cost matrices from shifted moments, in one fused pass.

The input is what :class:`fastmerge.FeatureStats` accumulates over n samples of
paired activations, with per-unit shifts s (model a) and t (model b) close to the means:
``cross[i, j] = sum (x_i - s_i)(y_j - t_j)``, ``sum_a[i] = sum (x_i - s_i)``,
``sumsq_a[i] = sum (x_i - s_i)^2`` and the same for b. Every kind is a per-sample mean:

* ``"covariance"``: ``E[(x_i - mu_i)(y_j - nu_j)]`` (population covariance);
* ``"correlation"``: covariance / (sigma_i sigma_j), in [-1, 1]; 0 where a unit is
  constant (sigma = 0), never NaN;
* ``"inner_product"``: ``E[x_i y_j]``;
* ``"neg_sq_distance"``: ``-E[(x_i - y_j)^2]`` (the PLeaS default), at most 0.

Every kind is computed directly from the shifted moments, so nothing cancels when
|mean| >> std (e.g. ``E[(x - y)^2] = var_x + var_y - 2 cov + (mu_x - mu_y)^2``).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import backends
from .._tensors import TensorLike, as_tensor
from ..reference import feature_cost as reference
from ._library import define, resolve

#: Kind names and their codes in the kernels (csrc/include/fastmerge/feature_cost.h).
KINDS = {"covariance": 0, "correlation": 1, "inner_product": 2, "neg_sq_distance": 3}


def feature_cost(
    cross: TensorLike,
    sum_a: TensorLike,
    sum_b: TensorLike,
    sumsq_a: TensorLike,
    sumsq_b: TensorLike,
    shift_a: TensorLike,
    shift_b: TensorLike,
    count: Union[int, float, torch.Tensor],
    kind: str = "correlation",
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """A (rows, cols) float64 cost matrix of `kind` from shifted moments, in one fused pass.

    Args:
        cross: (rows, cols) shifted cross-products ``sum (x_i - s_i)(y_j - t_j)``.
        sum_a, sumsq_a, shift_a: (rows,) shifted sums, shifted sums of squares and the
            shifts ``s`` of model a's units.
        sum_b, sumsq_b, shift_b: the same for model b's units, (cols,).
        count: number of samples n (> 0).
        kind: ``"covariance"``, ``"correlation"``, ``"inner_product"`` or
            ``"neg_sq_distance"``; each is a per-sample mean (see the module docs).
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; default: the
            fastest usable one for the inputs' device.

    Floating inputs are used as float64; all must be on one device, and the result is
    on that device.

    Example:
        >>> import torch, fastmerge
        >>> x = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
        >>> y = -2 * x
        >>> s, t = x.mean(0), y.mean(0)
        >>> moments = ((x - s).T @ (y - t), (x - s).sum(0), (y - t).sum(0),
        ...            ((x - s) ** 2).sum(0), ((y - t) ** 2).sum(0), s, t, 3)
        >>> fastmerge.ops.feature_cost(*moments, kind="correlation").round(decimals=9).tolist()
        [[-1.0]]
        >>> fastmerge.ops.feature_cost(*moments, kind="neg_sq_distance").tolist()
        [[-42.0]]
    """
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    cross_t = _float64(cross, "cross")
    if cross_t.dim() != 2:
        raise ValueError(f"cross must be 2-D (rows, cols), got shape {tuple(cross_t.shape)}")
    rows, cols = cross_t.shape
    device = cross_t.device
    vectors = []
    for value, name, length in (
        (sum_a, "sum_a", rows),
        (sum_b, "sum_b", cols),
        (sumsq_a, "sumsq_a", rows),
        (sumsq_b, "sumsq_b", cols),
        (shift_a, "shift_a", rows),
        (shift_b, "shift_b", cols),
    ):
        t = _float64(value, name)
        if t.shape != (length,):
            raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but cross is on {device}")
        vectors.append(t.contiguous())
    n = _count(count)
    return _OP(cross_t.contiguous(), *vectors, n, kind, backend)


def _kernel(cross, sum_a, sum_b, sumsq_a, sumsq_b, shift_a, shift_b, count, kind, backend):
    """The (rows, cols) float64 cost of validated float64 contiguous moments."""
    name = resolve(backend, cross.device)
    with torch.no_grad():
        vectors = (sum_a, sum_b, sumsq_a, sumsq_b, shift_a, shift_b)
        return _IMPLEMENTATIONS[name](cross, *vectors, count, kind)


def _fake(cross, sum_a, sum_b, sumsq_a, sumsq_b, shift_a, shift_b, count, kind, backend):
    return torch.empty_like(cross, memory_format=torch.contiguous_format)


def _float64(value: TensorLike, name: str) -> torch.Tensor:
    t = as_tensor(value, name)
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    return t.detach().to(torch.float64)


def _count(count: Union[int, float, torch.Tensor]) -> float:
    try:
        n = float(count)
    except (TypeError, ValueError):
        raise TypeError(f"count must be a number, got {type(count).__name__}") from None
    if not n > 0:
        raise ValueError(f"count must be > 0 (the number of samples), got {count}")
    return n


def _run_reference(cross: torch.Tensor, *rest) -> torch.Tensor:
    return reference.feature_cost(cross, *rest)


def _native_args(cross: torch.Tensor, *rest) -> list:
    """The shared leading arguments of the CPU and CUDA kernels (pointers, sizes, kind)."""
    *vectors, count, kind = rest
    return [
        cross.data_ptr(),
        cross.shape[0],
        cross.shape[1],
        *(v.data_ptr() for v in vectors),
        count,
        KINDS[kind],
    ]


def _run_cpu(cross: torch.Tensor, *rest) -> torch.Tensor:
    out = torch.empty(cross.shape, dtype=torch.float64)
    backends.cpu_extension().feature_cost(*_native_args(cross, *rest), out.data_ptr())
    return out


def _run_cuda(cross: torch.Tensor, *rest) -> torch.Tensor:
    device = cross.device
    out = torch.empty(cross.shape, dtype=torch.float64, device=device)
    with torch.cuda.device(device):
        backends.cuda_extension().feature_cost(
            *_native_args(cross, *rest),
            out.data_ptr(),
            torch.cuda.current_stream(device).cuda_stream,
        )
    return out


def _run_triton(cross: torch.Tensor, *rest) -> torch.Tensor:
    *vectors, count, kind = rest
    return backends.triton_kernels().feature_cost.feature_cost(cross, *vectors, count, KINDS[kind])


_IMPLEMENTATIONS = {
    "reference": _run_reference,
    "cpu": _run_cpu,
    "cuda": _run_cuda,
    "triton": _run_triton,
}

_OP = define(
    "feature_cost",
    "(Tensor cross, Tensor sum_a, Tensor sum_b, Tensor sumsq_a, Tensor sumsq_b, Tensor shift_a, "
    "Tensor shift_b, float count, str kind, str? backend) -> Tensor",
    _kernel,
    _fake,
)
