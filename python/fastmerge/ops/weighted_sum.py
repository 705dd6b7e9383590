"""``weighted_sum``: ``Σ_i w_i · t_i`` of same-shaped tensors in one pass.

Linear merging, task arithmetic (``base · (1 - λ Σ 1) + λ Σ θ_t`` written as weights) and
a scaled pass-through are all this op. Each input is read once, in its own dtype (a
float32 and a bfloat16 checkpoint mix without a conversion pass), and the output is
written once, in `out_dtype`; no temporary is made.

Arithmetic (identical on every backend, and bit for bit the reference's): float32
(float64 when any input is float64); every weight is rounded to that dtype; the sum
starts from the first product ``w_0 · t_0`` and adds ``w_i · t_i`` for i = 1, 2, ... in
order; every product and every sum is rounded separately (no fused multiply-add); the
result is rounded to the output dtype once (the half types through float32, as torch
does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch

from .. import backends
from .._dtypes import KERNEL_DTYPE_CODES, dtype_names
from .._tensors import TensorLike, as_tensor_list
from ..reference import weighted_sum as reference
from ..reference.weighted_sum import accumulate_dtype
from ._library import define, resolve, tracing
from ._outputs import check_out, new_output, overlaps


def weighted_sum(
    tensors: Sequence[TensorLike],
    weights: Sequence[float],
    *,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    accumulate_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``Σ_i weights[i] * tensors[i]``, accumulated in float32 (float64 when any input is
    float64), reading every input once and writing the output once.

    Args:
        tensors: one or more tensors of one shape on one device, each float16, bfloat16,
            float32 or float64 (dtypes may differ). Non-contiguous inputs are copied first.
        weights: one finite number per tensor.
        out_dtype: dtype of the result (default: ``out.dtype`` when `out` is given, else
            the first tensor's dtype).
        out: optional contiguous tensor of the inputs' shape on their device to write
            into; it may be one of the inputs itself (same dtype, same memory), but must not
            overlap an input otherwise.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; default: the
            fastest usable one (see :mod:`fastmerge.backends`).
        accumulate_dtype: ``torch.float64`` accumulates in float64 whatever the inputs
            (for sums whose terms cancel, e.g. task arithmetic written as
            ``(1 - λT)·base + λ Σ θ_t``: the result is then the exact sum rounded almost
            once); None or ``torch.float32``: the default rule above.

    Returns:
        `out`, or a new tensor of the inputs' shape in `out_dtype` (on the CPU, a large one
        is allocated with :func:`fastmerge.io.empty_tensor`).

    Raises:
        TypeError: `tensors` is not a list, an input or `out_dtype` is not floating, or a
            weight is not a number.
        ValueError: no tensors, shapes or devices that differ, a weight count that does not
            match, a non-finite weight, or a bad `out` (the message names the argument).

    Example:
        >>> import torch, fastmerge
        >>> a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0], dtype=torch.bfloat16)
        >>> fastmerge.ops.weighted_sum([a, b], [0.5, 0.25]).tolist()
        [1.25, 2.25]
        >>> fastmerge.ops.weighted_sum([a, b], [1.0, -1.0], out_dtype=torch.float64).dtype
        torch.float64
    """
    ts = as_tensor_list(tensors, "tensors")
    if not ts:
        raise ValueError("tensors is empty; weighted_sum needs at least one tensor")
    ws = _check_weights(weights, len(ts))
    shape, device = ts[0].shape, ts[0].device
    for i, t in enumerate(ts[1:], start=1):
        if t.shape != shape:
            raise ValueError(
                f"tensors[{i}] has shape {tuple(t.shape)} but tensors[0] has {tuple(shape)}"
            )
    ts = [t.detach() for t in ts]
    dtype = _accumulate_dtype(ts, accumulate_dtype)
    if out_dtype is not None and out_dtype not in KERNEL_DTYPE_CODES:
        raise TypeError(f"out_dtype is {out_dtype}; supported dtypes are {dtype_names()}")
    if out is None:
        out = new_output(shape, out_dtype or ts[0].dtype, device)
    else:
        check_out(out, out_dtype, shape, device, "the tensors")
    flat = [t if t.is_contiguous() else t.contiguous() for t in ts]
    if out.numel() and not tracing(out, *flat):
        for i, t in enumerate(flat):
            if overlaps(t, out):
                raise ValueError(
                    f"out overlaps tensors[{i}]; it may only be one of the inputs itself"
                )
    _OP(flat, ws, dtype, out, backend)
    return out


def _kernel(
    ts: list[torch.Tensor], ws: list[float], dtype: torch.dtype, out: torch.Tensor, backend
) -> None:
    """Write the sum into `out`; inputs and out contiguous, of one shape."""
    name = resolve(backend, out.device)  # an unusable backend raises, even for no entries
    if out.numel() == 0:
        return
    with torch.no_grad():
        _IMPLEMENTATIONS[name]([t.reshape(-1) for t in ts], ws, dtype, out.view(-1))


def _fake(ts, ws, dtype, out, backend) -> None:
    return None  # writes `out` only


def _accumulate_dtype(ts: list[torch.Tensor], requested: Optional[torch.dtype]) -> torch.dtype:
    dtype = accumulate_dtype(ts)
    if requested is None or requested == dtype:
        return dtype
    if requested == torch.float64:
        return requested
    if requested == torch.float32:
        raise ValueError("accumulate_dtype is float32 but an input is float64")
    raise TypeError(f"accumulate_dtype must be torch.float32 or torch.float64, got {requested}")


def _check_weights(weights: Sequence[float], count: int) -> list[float]:
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"weights must be a sequence of numbers, got {type(weights).__name__}")
    if len(weights) != count:
        raise ValueError(f"weights has {len(weights)} entries for {count} tensors")
    values = []
    for i, w in enumerate(weights):
        if isinstance(w, bool):
            raise TypeError(f"weights[{i}] is a bool, not a number")
        try:
            value = float(w)
        except (TypeError, ValueError):
            raise TypeError(f"weights[{i}] is not a number: {w!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"weights[{i}] is {value}; weights must be finite")
        values.append(value)
    return values


def _run_reference(ts, ws, dtype, out) -> None:
    reference.weighted_sum(ts, ws, out, dtype)


def _codes(ts) -> list[int]:
    return [KERNEL_DTYPE_CODES[t.dtype] for t in ts]


def _run_cpu(ts, ws, dtype, out) -> None:
    backends.cpu_extension().weighted_sum(
        [t.data_ptr() for t in ts],
        _codes(ts),
        ws,
        out.numel(),
        dtype == torch.float64,
        out.data_ptr(),
        KERNEL_DTYPE_CODES[out.dtype],
    )


def _run_cuda(ts, ws, dtype, out) -> None:
    device = out.device
    # one host-to-device copy: addresses, dtype codes and weights (as the int64 bits of
    # float64 values), read by the kernel as one int64 table
    weights64 = torch.tensor(ws, dtype=torch.float64).view(torch.int64).tolist()
    table = torch.tensor([t.data_ptr() for t in ts] + _codes(ts) + weights64, dtype=torch.int64).to(
        device
    )
    with torch.cuda.device(device):
        backends.cuda_extension().weighted_sum(
            table.data_ptr(),
            len(ts),
            out.numel(),
            dtype == torch.float64,
            out.data_ptr(),
            KERNEL_DTYPE_CODES[out.dtype],
            torch.cuda.current_stream(device).cuda_stream,
        )


def _run_triton(ts, ws, dtype, out) -> None:
    backends.triton_kernels().weighted_sum.weighted_sum(ts, ws, dtype, out)


_IMPLEMENTATIONS = {
    "reference": _run_reference,
    "cpu": _run_cpu,
    "cuda": _run_cuda,
    "triton": _run_triton,
}

_OP = define(
    "weighted_sum",
    "(Tensor[] tensors, float[] weights, ScalarType accumulate, Tensor(a!) out, str? backend)"
    " -> ()",
    _kernel,
    _fake,
)
