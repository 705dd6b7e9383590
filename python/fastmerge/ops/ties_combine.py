"""``ties_combine``: the TIES merge of one tensor in one pass, given the trim thresholds.

Per entry: τ_t = expert_t - base, kept where ``|τ_t| >= thresholds[t]`` (else 0); the
elected sign is the sign of Σ_t kept τ_t; the result is ``base + scale * mean`` of the
kept τ_t of that sign (the disjoint mean; 0 where the sum is 0). τ is recomputed on the
fly; nothing but the output is written.

Arithmetic (identical on every backend, and bit for bit the reference's): float32
(float64 when any input is float64); the sums run over t = 0..T-1 in order, starting
from 0; ``mean = sum / count``; the product ``scale * mean`` and the final addition are
rounded separately (no fused multiply-add); the result is rounded to the output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from .. import backends
from .._dtypes import KERNEL_DTYPE_CODES
from .._tensors import TensorLike, as_tensor
from ..reference import ties_combine as reference
from ..reference.magnitude_threshold import compute_dtype
from ._library import define, resolve
from .magnitude_threshold import prepare_inputs


def ties_combine(
    base: TensorLike,
    experts: Sequence[TensorLike],
    thresholds: TensorLike,
    *,
    scale: float = 1.0,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """TIES-merge one tensor: trim, elect signs, disjoint mean, ``base + scale * mean``.

    Args:
        base: tensor of any shape, float16, bfloat16, float32 or float64.
        experts: T >= 1 tensors of base's shape on base's device.
        thresholds: (T,) trim thresholds, e.g. from :func:`magnitude_threshold`.
        scale: factor of the merged task vector.
        out: optional contiguous tensor of base's shape (any supported dtype) to write
            into; by default a new tensor of base's dtype.
        backend: as for :func:`magnitude_threshold`.

    Returns:
        `out`, the merged tensor.

    Example:
        >>> import torch, fastmerge
        >>> base = torch.zeros(3)
        >>> experts = [torch.tensor([2.0, -1.0, 0.1]), torch.tensor([4.0, 3.0, -0.1])]
        >>> fastmerge.ops.ties_combine(base, experts, torch.tensor([1.0, 1.0])).tolist()
        [3.0, 3.0, 0.0]
    """
    b0 = base if type(base) in _PLAIN else as_tensor(base, "base")
    b, es, dtype = _inputs(b0, experts)
    thr = thresholds if type(thresholds) in _PLAIN else as_tensor(thresholds, "thresholds")
    if thr.shape != (len(es),) or not thr.dtype.is_floating_point:
        raise ValueError(
            f"thresholds must be a floating tensor of shape ({len(es)},), got "
            f"{thr.dtype} {tuple(thr.shape)}"
        )
    if thr.dtype != dtype or thr.device != b.device or not thr.is_contiguous():
        thr = thr.to(device=b.device, dtype=dtype).contiguous()
    if thr.requires_grad:
        thr = thr.detach()
    if out is None:
        out = torch.empty_like(b0, memory_format=torch.contiguous_format)
    elif (
        not isinstance(out, torch.Tensor)
        or out.dtype not in KERNEL_DTYPE_CODES
        or out.shape != b0.shape
        or out.device != b.device
        or not out.is_contiguous()
    ):
        raise ValueError(f"out must be a contiguous floating tensor of shape {tuple(b0.shape)}")
    _OP(b, es, thr, float(scale), out, backend)
    return out


_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def _inputs(base: torch.Tensor, experts: Sequence[TensorLike]):
    """(base, experts, compute dtype): :func:`prepare_inputs` without its copies for the
    common case (contiguous plain tensors of one dtype and shape on one device), where the
    kernels need only data pointers and element counts."""
    dtype = base.dtype
    if (
        dtype in KERNEL_DTYPE_CODES
        and type(experts) in (list, tuple)
        and experts
        and _PLAIN.issuperset(map(type, experts))
        and base.is_contiguous()
    ):
        shape, device = base.shape, base.device
        for e in experts:
            if e.dtype != dtype or e.shape != shape or e.device != device:
                break
            if not e.is_contiguous() or e.requires_grad:
                break
        else:
            compute = torch.float64 if dtype == torch.float64 else torch.float32
            return (base.detach() if base.requires_grad else base), list(experts), compute
    b, es = prepare_inputs(base, experts)
    return b, es, compute_dtype(b, es)


def _kernel(b, es, thr, scale: float, out: torch.Tensor, backend: Optional[str]) -> None:
    """Write the merge of base `b` and experts `es` (contiguous, one dtype) into `out`."""
    name = resolve(backend, b.device)  # an unusable backend raises, even for no entries
    if b.numel() == 0:
        return
    if name == "cpu":
        _run_cpu(b, es, thr, scale, out)
        return
    with torch.no_grad():
        flat = [e.reshape(-1) for e in es]
        _IMPLEMENTATIONS[name](b.reshape(-1), flat, thr, scale, out.view(-1))


def _fake(b, es, thr, scale: float, out: torch.Tensor, backend: Optional[str]) -> None:
    return None  # writes `out` only


def _run_reference(b, es, thr, scale, out) -> None:
    reference.ties_combine(b, es, thr, scale, out)


def _run_cpu(b, es, thr, scale, out) -> None:
    backends.cpu_extension().ties_combine(
        b.data_ptr(),
        [e.data_ptr() for e in es],
        b.numel(),
        KERNEL_DTYPE_CODES[b.dtype],
        thr.data_ptr(),
        scale,
        out.data_ptr(),
        KERNEL_DTYPE_CODES[out.dtype],
    )


def _run_cuda(b, es, thr, scale, out) -> None:
    device = b.device
    pointers = torch.tensor([e.data_ptr() for e in es], dtype=torch.int64).to(device)
    with torch.cuda.device(device):
        backends.cuda_extension().ties_combine(
            b.data_ptr(),
            pointers.data_ptr(),
            len(es),
            b.numel(),
            KERNEL_DTYPE_CODES[b.dtype],
            thr.data_ptr(),
            scale,
            out.data_ptr(),
            KERNEL_DTYPE_CODES[out.dtype],
            torch.cuda.current_stream(device).cuda_stream,
        )


def _run_triton(b, es, thr, scale, out) -> None:
    backends.triton_kernels().ties_combine.ties_combine(b, es, thr, scale, out)


_IMPLEMENTATIONS = {
    "reference": _run_reference,
    "cpu": _run_cpu,
    "cuda": _run_cuda,
    "triton": _run_triton,
}

_OP = define(
    "ties_combine",
    "(Tensor base, Tensor[] experts, Tensor thresholds, float scale, Tensor(a!) out, "
    "str? backend) -> ()",
    _kernel,
    _fake,
)
