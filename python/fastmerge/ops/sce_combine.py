"""``sce_combine``: SCE's select, calculate and erase of one tensor in fused passes.

With τ_t = expert_t - base (t = 0..T-1), per entry, in C (float32; float64 when any
input is float64):

* :func:`sce_variance`: ``mean = (Σ_t τ_t) / T``, ``var = (Σ_t (τ_t - mean)²) / T`` (the
  population variance across the models, the mean first, as torch.var);
* **select**: with a `threshold`, kept_t = τ_t where ``var >= threshold`` (recomputed
  with the same arithmetic, so the entries tied with a threshold taken from
  :func:`sce_variance` are kept), +0 elsewhere; without one, kept_t = τ_t;
* **calculate** (no `weights` given): one pass sums ``E_t = Σ kept_t²`` in float64, then
  ``w_t = (E_t / n) / Σ_s (E_s / n)`` (n = max(numel, 1); ``1 / T`` each when that sum is
  below 1e-6);
* **erase**: the sign of ``Σ_t kept_t`` is elected (a sum >= 0 elects +; a NaN sum -);
  m_t: kept_t is non-zero and of that sign; ``result = (Σ_t w_t m_t kept_t) / max(Σ_t w_t
  m_t, 1e-6) + base`` in the output dtype. The election is on the unweighted deltas
  (:func:`gta_combine` elects on weighted ones).

Each pass reads the base and the experts once (τ is recomputed, never stored) and writes
only its result. Arithmetic, identical on every backend and bit for bit the reference's:
every operation in C rounded on its own (no fused multiply-add), sums over t in order
from +0, the divisions correctly rounded, ``w_t · kept_t`` rounded before the sum; w and
the threshold are rounded to C first. The energies are float64 sums whose order differs
per backend (the CPU's does not depend on the thread count): they agree to float64
rounding.

Backends: ``reference``, ``cpu`` (blocks of 512 entries, parallel over blocks),
``triton`` (one program per 1024 entries). CUDA tensors use the triton backend, or the
reference where Triton is missing; there is no ``cuda`` backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

from .. import backends
from .._dtypes import KERNEL_DTYPE_CODES
from .._tensors import TensorLike, as_tensor
from ..reference import sce_combine as reference
from ..reference.magnitude_threshold import compute_dtype
from ._library import define, resolve, tracing
from ._outputs import check_out, new_output, overlaps
from .gta_combine import _per_expert
from .magnitude_threshold import prepare_inputs

#: The backends this op has (no CUDA kernel: CUDA tensors take triton, then reference).
IMPLEMENTED = ("reference", "cpu", "triton")
#: The floor of the divisor of the weighted mean, and of the sum of the energies.
FLOOR = 1e-6


def sce_variance(
    base: TensorLike,
    experts: Sequence[TensorLike],
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The population variance across the models of ``τ_t = experts[t] - base``, per
    entry, in one pass (the mean first; module docstring for the arithmetic).

    Args:
        base: tensor of any shape, float16, bfloat16, float32 or float64.
        experts: T >= 1 tensors of base's shape on base's device (any supported dtype).
        backend: ``"reference"``, ``"cpu"`` or ``"triton"``; default: the fastest usable
            one (see :mod:`fastmerge.backends`).

    Returns:
        A new tensor of base's shape in the compute dtype (float32, float64 when an input
        is float64): the variances that :func:`sce_combine`'s `threshold` is compared with.

    Example:
        >>> import torch, fastmerge
        >>> base = torch.zeros(3)
        >>> experts = [torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 2.0, -4.0])]
        >>> fastmerge.ops.sce_variance(base, experts).tolist()
        [1.0, 0.0, 4.0]
    """
    b0 = as_tensor(base, "base")
    b, es = prepare_inputs(b0, experts)
    var = new_output(b0.shape, compute_dtype(b, es), b.device)
    _VARIANCE_OP(b, es, var, backend)
    return var


def sce_combine(
    base: TensorLike,
    experts: Sequence[TensorLike],
    *,
    threshold: Union[TensorLike, float, None] = None,
    weights: Union[TensorLike, Sequence[float], None] = None,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """SCE-merge one tensor: keep the entries of variance >= `threshold`, weight the
    experts by their energies, elect the sign of the unweighted sum, and write
    ``base + Σ w_t m_t τ_t / max(Σ w_t m_t, 1e-6)``.

    Args:
        base: tensor of any shape, float16, bfloat16, float32 or float64.
        experts: T >= 1 tensors of base's shape on base's device (any supported dtype).
        threshold: the variance threshold of the selection (a number or a one-element
            tensor, e.g. from :func:`magnitude_threshold` of :func:`sce_variance`); None:
            every entry is kept.
        weights: (T,) finite weights; None: the energy weights of the kept deltas
            (``mean(kept_t²)`` normalized to sum 1), from one more pass.
        out: optional contiguous tensor of base's shape on its device (any supported
            dtype); it may be `base` or an expert itself (same dtype, same memory), but
            must not overlap an input otherwise. Default: a new tensor of base's dtype.
        backend: as for :func:`sce_variance`.

    Returns:
        `out`, the merged tensor.

    Raises:
        TypeError: an input or `out` of an unsupported type or dtype.
        ValueError: shapes or devices that differ, no experts, a threshold that is not one
            number, weights of the wrong length or not finite, or a bad `out`.

    Example:
        >>> import torch, fastmerge
        >>> base = torch.zeros(3)
        >>> experts = [torch.tensor([1.0, 2.0, -3.0]), torch.tensor([3.0, -4.0, 1.0])]
        >>> fastmerge.ops.sce_combine(base, experts, weights=[0.5, 0.5]).tolist()
        [2.0, -4.0, -3.0]
        >>> fastmerge.ops.sce_combine(base, experts, threshold=2.0, weights=[0.5, 0.5]).tolist()
        [0.0, -4.0, -3.0]
    """
    b0 = as_tensor(base, "base")
    b, es = prepare_inputs(b0, experts)
    dtype = compute_dtype(b, es)
    thr = None
    if threshold is not None:
        if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
            thr = torch.tensor([float(threshold)], dtype=torch.float64)
        else:
            thr = as_tensor(threshold, "threshold")
        if thr.numel() != 1 or not thr.dtype.is_floating_point:
            raise ValueError(
                f"threshold must be one number, got a {thr.dtype} tensor of shape "
                f"{tuple(thr.shape)}"
            )
        thr = thr.detach().reshape(1).to(device=b.device, dtype=dtype).contiguous()
    if out is None:
        out = torch.empty(b0.shape, dtype=b0.dtype, device=b.device)
    else:
        check_out(out, None, b0.shape, b.device, "base and experts")
        if out.numel() and not tracing(b, out, *es):
            for label, tensor in (("base", b), *((f"experts[{t}]", e) for t, e in enumerate(es))):
                if overlaps(tensor, out):
                    raise ValueError(f"out overlaps {label}; it may only be {label} itself")
    if weights is None:
        sums = _ENERGIES_OP(b, es, thr, backend)
        energy = sums / max(b.numel(), 1)
        total = energy.sum()
        uniform = torch.full_like(energy, 1.0 / len(es))
        w = torch.where(total.abs() >= FLOOR, energy / total, uniform)
    else:
        w = _per_expert(weights, "weights", len(es), None, finite=True)
    w = w.to(device=b.device, dtype=dtype).contiguous()
    _OP(b, es, thr, w, out, backend)
    return out


def _variance_kernel(b, es, var, backend) -> None:
    name = resolve(backend, b.device, IMPLEMENTED)  # an unusable one raises, even for no entries
    if b.numel():
        with torch.no_grad():
            _VARIANCES[name](b, es, var.view(-1))


def _energies_kernel(b, es, thr, backend) -> torch.Tensor:
    name = resolve(backend, b.device, IMPLEMENTED)
    if b.numel() == 0:
        return torch.zeros(len(es), dtype=torch.float64, device=b.device)
    with torch.no_grad():
        return _ENERGIES[name](b, es, thr)


def _combine_kernel(b, es, thr, w, out, backend) -> None:
    name = resolve(backend, b.device, IMPLEMENTED)
    if b.numel():
        with torch.no_grad():
            _COMBINES[name](b, es, thr, w, out.view(-1))


def _no_output(*args) -> None:
    return None  # writes `out` (or `var`) only


def _energies_fake(b, es, thr, backend) -> torch.Tensor:
    return torch.empty(len(es), dtype=torch.float64, device=b.device)


def _pointers(es):
    return [e.data_ptr() for e in es]


def _run_cpu_variance(b, es, var) -> None:
    backends.cpu_extension().sce_variance(
        b.data_ptr(), _pointers(es), b.numel(), KERNEL_DTYPE_CODES[b.dtype], var.data_ptr()
    )


def _run_cpu_energies(b, es, thr) -> torch.Tensor:
    sums = torch.empty(len(es), dtype=torch.float64)
    backends.cpu_extension().sce_energies(
        b.data_ptr(), _pointers(es), b.numel(), KERNEL_DTYPE_CODES[b.dtype], thr is not None,
        0 if thr is None else thr.data_ptr(), sums.data_ptr(),
    )  # fmt: skip
    return sums


def _run_cpu_combine(b, es, thr, w, out) -> None:
    backends.cpu_extension().sce_combine(
        b.data_ptr(), _pointers(es), b.numel(), KERNEL_DTYPE_CODES[b.dtype], thr is not None,
        0 if thr is None else thr.data_ptr(), w.data_ptr(), out.data_ptr(),
        KERNEL_DTYPE_CODES[out.dtype],
    )  # fmt: skip


def _run_triton_variance(b, es, var) -> None:
    backends.triton_kernels().sce_combine.sce_variance(b, es, var)


def _run_triton_energies(b, es, thr) -> torch.Tensor:
    return backends.triton_kernels().sce_combine.sce_energies(b, es, thr)


def _run_triton_combine(b, es, thr, w, out) -> None:
    backends.triton_kernels().sce_combine.sce_combine(b, es, thr, w, out)


def _run_reference_variance(b, es, var) -> None:
    var.copy_(reference.sce_variance(b, es))


_VARIANCES = {
    "reference": _run_reference_variance,
    "cpu": _run_cpu_variance,
    "triton": _run_triton_variance,
}
_ENERGIES = {
    "reference": reference.sce_energies,
    "cpu": _run_cpu_energies,
    "triton": _run_triton_energies,
}
_COMBINES = {
    "reference": reference.sce_combine,
    "cpu": _run_cpu_combine,
    "triton": _run_triton_combine,
}

_VARIANCE_OP = define(
    "sce_variance",
    "(Tensor base, Tensor[] experts, Tensor(a!) var, str? backend) -> ()",
    _variance_kernel,
    _no_output,
)
_ENERGIES_OP = define(
    "sce_energies",
    "(Tensor base, Tensor[] experts, Tensor? threshold, str? backend) -> Tensor",
    _energies_kernel,
    _energies_fake,
)
_OP = define(
    "sce_combine",
    "(Tensor base, Tensor[] experts, Tensor? threshold, Tensor weights, Tensor(a!) out, "
    "str? backend) -> ()",
    _combine_kernel,
    _no_output,
)
