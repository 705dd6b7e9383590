"""``nearswap``: the per-entry step of the nearswap merge, in one pass.

Per entry, ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)`` and the result is
``w · b + (1 - w) · a``: entries of `b` within `t` of `a` are taken whole, distant ones
stay near `a`. This is mergekit's ``nearswap`` formula
(``(t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)``, then ``w * b + (1 - w) * a``), with
``t / d`` a true division (torch evaluates mergekit's ``t / tensor`` as
``tensor.reciprocal() * t``, which can differ in the last bit). Each input is read once,
in its own dtype, and the output is written once, in `out_dtype`; no temporary is made.

Arithmetic (identical on every backend, and bit for bit the reference's,
:func:`fastmerge.reference.nearswap.nearswap`): float32 (float64 when a or b is float64);
t and 1e-6 are rounded to that dtype, the inputs converted exactly; every step is rounded
separately (no fused multiply-add): ``d = |a - b|``, ``d = max(d, 1e-6)``, ``w = t / d``,
``w = min(max(w, 0), 1)``, ``(w * b) + ((1 - w) * a)``; the result is rounded to the
output dtype once (the half types through float32, as torch does). NaN: whatever the
formula gives, on every backend alike: the clamps pass a NaN through, so a NaN in a or b
gives a NaN; an infinite a or b gives ``d = inf``, ``w = 0`` and ``0 * b + 1 * a`` (NaN
when b is infinite). A negative zero w (t < 0 with an underflowing quotient) stays
negative zero, as in torch.clamp.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import backends
from .._dtypes import KERNEL_DTYPE_CODES, dtype_names
from .._tensors import TensorLike, as_tensor
from ..reference import nearswap as reference
from ..reference.nearswap import compute_dtype
from ._library import define, resolve, tracing
from ._outputs import check_out, new_output, overlaps


def nearswap(
    a: TensorLike,
    b: TensorLike,
    t: float,
    *,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``w * b + (1 - w) * a`` with ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)`` per entry,
    in float32 (float64 when a or b is float64), reading each input once and writing the
    output once.

    Args:
        a: the base tensor: float16, bfloat16, float32 or float64.
        b: the other tensor: a's shape and device, any of those dtypes (it may differ
            from a's). Non-contiguous inputs are copied first.
        t: the distance scale, a finite number (t <= 0 gives w = 0 everywhere: a).
        out_dtype: dtype of the result (default: ``out.dtype`` when `out` is given, else
            a's dtype).
        out: optional contiguous tensor of the inputs' shape on their device to write
            into; it may be `a` or `b` itself (same dtype, same memory), but must not
            overlap an input otherwise.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; default: the
            fastest usable one (see :mod:`fastmerge.backends`).

    Returns:
        `out`, or a new tensor of the inputs' shape in `out_dtype` (on the CPU, a large one
        is allocated with :func:`fastmerge.io.empty_tensor`).

    Raises:
        TypeError: a, b, `out_dtype` or `out` of an unsupported type or dtype, or a `t`
            that is not a number.
        ValueError: shapes or devices that differ, a non-finite `t`, or a bad `out` (the
            message names the argument).

    Example:
        >>> import torch, fastmerge
        >>> a = torch.tensor([0.0, 1.0, 2.0])
        >>> b = torch.tensor([0.5, 1.0, 0.0], dtype=torch.bfloat16)
        >>> fastmerge.ops.nearswap(a, b, 0.25).tolist()  # w = 0.5, 1 (a == b), 0.125
        [0.25, 1.0, 1.75]
        >>> fastmerge.ops.nearswap(a, b, 10.0, out_dtype=torch.bfloat16).tolist()  # w = 1
        [0.5, 1.0, 0.0]
    """
    a, b = _check_input(a, "a"), _check_input(b, "b")
    if b.shape != a.shape:
        raise ValueError(f"b has shape {tuple(b.shape)} but a has {tuple(a.shape)}")
    if b.device != a.device:
        raise ValueError(f"b is on {b.device} but a is on {a.device}; both must be on one device")
    value = _check_t(t)
    a, b = a.detach(), b.detach()
    if out_dtype is not None and out_dtype not in KERNEL_DTYPE_CODES:
        raise TypeError(f"out_dtype is {out_dtype}; supported dtypes are {dtype_names()}")
    shape, device = a.shape, a.device
    if out is None:
        out = new_output(shape, out_dtype or a.dtype, device)
    else:
        check_out(out, out_dtype, shape, device, "a and b")
    x, y = (v if v.is_contiguous() else v.contiguous() for v in (a, b))
    if out.numel() and not tracing(x, y, out):
        for label, tensor in (("a", x), ("b", y)):
            if overlaps(tensor, out):
                raise ValueError(f"out overlaps {label}; it may only be {label} itself")
    _OP(x, y, value, out, backend)
    return out


def _kernel(a: torch.Tensor, b: torch.Tensor, t: float, out: torch.Tensor, backend) -> None:
    """Write the step into `out`; a, b and out contiguous, of one shape."""
    name = resolve(backend, a.device)  # an unusable backend raises, even for no entries
    if out.numel() == 0:
        return
    with torch.no_grad():
        _IMPLEMENTATIONS[name](a.reshape(-1), b.reshape(-1), t, compute_dtype(a, b), out.view(-1))


def _fake(a: torch.Tensor, b: torch.Tensor, t: float, out: torch.Tensor, backend) -> None:
    return None  # writes `out` only


def _check_input(value: TensorLike, name: str) -> torch.Tensor:
    tensor = value if type(value) is torch.Tensor else as_tensor(value, name)
    if tensor.dtype not in KERNEL_DTYPE_CODES:
        raise TypeError(f"{name} has dtype {tensor.dtype}; supported dtypes are {dtype_names()}")
    return tensor


def _check_t(t: float) -> float:
    if isinstance(t, bool):
        raise TypeError("t is a bool, not a number")
    if isinstance(t, (str, bytes)):
        raise TypeError(f"t is not a number: {t!r}")
    try:
        value = float(t)
    except (TypeError, ValueError):
        raise TypeError(f"t is not a number: {t!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"t is {value}; t must be finite")
    return value


def _run_reference(a, b, t, dtype, out) -> None:
    reference.nearswap(a, b, t, out, dtype)


def _native_args(a, b, t, dtype, out) -> tuple:
    """The arguments both native modules' ``nearswap`` take (the CUDA one adds a stream)."""
    codes = KERNEL_DTYPE_CODES
    return (a.data_ptr(), codes[a.dtype], b.data_ptr(), codes[b.dtype], t, out.numel(),
            dtype == torch.float64, out.data_ptr(), codes[out.dtype])  # fmt: skip


def _run_cpu(a, b, t, dtype, out) -> None:
    backends.cpu_extension().nearswap(*_native_args(a, b, t, dtype, out))


def _run_cuda(a, b, t, dtype, out) -> None:
    device = out.device
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        backends.cuda_extension().nearswap(*_native_args(a, b, t, dtype, out), stream)


def _run_triton(a, b, t, dtype, out) -> None:
    backends.triton_kernels().nearswap.nearswap(a, b, t, dtype, out)


_IMPLEMENTATIONS = {
    "reference": _run_reference,
    "cpu": _run_cpu,
    "cuda": _run_cuda,
    "triton": _run_triton,
}

_OP = define(
    "nearswap",
    "(Tensor a, Tensor b, float t, Tensor(a!) out, str? backend) -> ()",
    _kernel,
    _fake,
)
