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
    b0 = as_tensor(base, "base")
    b, es = prepare_inputs(b0, experts)
    dtype = compute_dtype(b, es)
    thr = as_tensor(thresholds, "thresholds").detach()
    if thr.shape != (len(es),) or not thr.dtype.is_floating_point:
        raise ValueError(
            f"thresholds must be a floating tensor of shape ({len(es)},), got "
            f"{thr.dtype} {tuple(thr.shape)}"
        )
    thr = thr.to(device=b.device, dtype=dtype).contiguous()
    if out is None:
        out = torch.empty(b0.shape, dtype=b0.dtype, device=b.device)
    elif (
        not isinstance(out, torch.Tensor)
        or out.dtype not in KERNEL_DTYPE_CODES
        or out.shape != b0.shape
        or out.device != b.device
        or not out.is_contiguous()
    ):
        raise ValueError(f"out must be a contiguous floating tensor of shape {tuple(b0.shape)}")
    name = backends.resolve_backend(backend, b.device)
    if b.numel() == 0:
        return out
    with torch.no_grad():
        _IMPLEMENTATIONS[name](b, es, thr, float(scale), out.view(-1))
    return out


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
