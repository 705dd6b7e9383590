"""``magnitude_threshold``: the TIES trim threshold of one tensor for all experts at once.

For a base tensor and T expert tensors of the same shape, the k-th largest magnitude
``|expert_t - base|`` per expert: an exact selection of one existing value, found by a
histogram (radix) selection on the float bits of ``|τ|`` computed on the fly, so that τ
is never materialized and nothing is sorted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from .. import backends
from .._dtypes import KERNEL_DTYPE_CODES
from .._tensors import TensorLike, as_tensor, as_tensor_list
from ..reference import magnitude_threshold as reference
from ..reference.magnitude_threshold import compute_dtype
from ._library import define, resolve

#: Bins of one radix digit (11 bits) of the CUDA kernel's histograms.
CUDA_BINS = 2048


def magnitude_threshold(
    base: TensorLike,
    experts: Sequence[TensorLike],
    k: int,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The k-th largest ``|experts[t] - base|`` over all entries, for every expert t.

    τ_t = experts[t] - base is formed in float32 (float64 when any input is float64), as
    TIES does; the result is one of those values, exactly, for every backend.

    Args:
        base: tensor of any shape, float16, bfloat16, float32 or float64.
        experts: T >= 1 tensors of base's shape on base's device (any supported dtype).
        k: rank from the top, ``1 <= k <= base.numel()`` (0 for an empty tensor).
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; default: the
            fastest usable one (see :mod:`fastmerge.backends`).

    Returns:
        (T,) thresholds in the compute dtype (zeros for an empty tensor).

    Example:
        >>> import torch, fastmerge
        >>> base = torch.zeros(4)
        >>> experts = [torch.tensor([1.0, -4.0, 2.0, 3.0]), torch.tensor([0.5, 0.1, -0.2, 0.0])]
        >>> fastmerge.ops.magnitude_threshold(base, experts, 2).tolist()
        [3.0, 0.20000000298023224]
    """
    b, es = prepare_inputs(base, experts)
    k = _check_rank(k, b.numel())
    return _OP(b, es, k, backend)


def _kernel(b: torch.Tensor, es: list[torch.Tensor], k: int, backend: Optional[str]):
    """(T,) thresholds of flat contiguous inputs of one dtype."""
    name = resolve(backend, b.device)  # an unusable backend raises, even for no entries
    dtype = compute_dtype(b, es)
    if b.numel() == 0:
        return torch.zeros(len(es), dtype=dtype, device=b.device)
    with torch.no_grad():
        return _IMPLEMENTATIONS[name](b, es, k, dtype)


def _fake(b: torch.Tensor, es: list[torch.Tensor], k: int, backend: Optional[str]):
    return b.new_empty((len(es),), dtype=compute_dtype(b, es))


def prepare_inputs(
    base: TensorLike, experts: Sequence[TensorLike]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Validate base and experts and return them flattened and contiguous.

    The kernels read one element type: when the inputs' dtypes differ, all of them are
    converted (exactly) to the compute dtype first.
    """
    b = as_tensor(base, "base").detach()
    if b.dtype not in KERNEL_DTYPE_CODES:
        raise TypeError(f"base has dtype {b.dtype}; TIES needs a floating tensor")
    es = [e.detach() for e in as_tensor_list(experts, "experts")]
    if not es:
        raise ValueError("experts is empty; TIES needs at least one expert")
    for t, e in enumerate(es):
        if e.shape != b.shape:
            raise ValueError(
                f"experts[{t}] has shape {tuple(e.shape)} but base has {tuple(b.shape)}"
            )
        if e.device != b.device:
            raise ValueError(f"experts[{t}] is on {e.device} but base is on {b.device}")
    if any(e.dtype != b.dtype for e in es):
        dtype = compute_dtype(b, es)
        b, es = b.to(dtype), [e.to(dtype) for e in es]
    return b.reshape(-1).contiguous(), [e.reshape(-1).contiguous() for e in es]


def _check_rank(k: int, n: int) -> int:
    if isinstance(k, bool) or int(k) != k:
        raise TypeError(f"k must be an integer, got {k!r}")
    k = int(k)
    low = 1 if n > 0 else 0
    if not low <= k <= n:
        raise ValueError(f"k must be in [{low}, {n}] for a tensor of {n} entries, got {k}")
    return k


def _run_reference(b: torch.Tensor, es: list[torch.Tensor], k: int, dtype) -> torch.Tensor:
    return reference.magnitude_threshold(b, es, k)


def _run_cpu(b: torch.Tensor, es: list[torch.Tensor], k: int, dtype) -> torch.Tensor:
    out = torch.empty(len(es), dtype=dtype)
    backends.cpu_extension().magnitude_threshold(
        b.data_ptr(),
        [e.data_ptr() for e in es],
        b.numel(),
        KERNEL_DTYPE_CODES[b.dtype],
        k,
        out.data_ptr(),
    )
    return out


def _run_cuda(b: torch.Tensor, es: list[torch.Tensor], k: int, dtype) -> torch.Tensor:
    device = b.device
    out = torch.empty(len(es), dtype=dtype, device=device)
    addresses = torch.tensor([e.data_ptr() for e in es], dtype=torch.int64).to(device)
    hist = torch.empty((len(es), CUDA_BINS), dtype=torch.int32, device=device)
    prefix = torch.empty(len(es), dtype=torch.int64, device=device)
    rank = torch.empty(len(es), dtype=torch.int64, device=device)
    with torch.cuda.device(device):
        backends.cuda_extension().magnitude_threshold(
            b.data_ptr(),
            addresses.data_ptr(),
            len(es),
            b.numel(),
            KERNEL_DTYPE_CODES[b.dtype],
            k,
            out.data_ptr(),
            hist.data_ptr(),
            prefix.data_ptr(),
            rank.data_ptr(),
            torch.cuda.current_stream(device).cuda_stream,
        )
    return out


def _run_triton(b: torch.Tensor, es: list[torch.Tensor], k: int, dtype) -> torch.Tensor:
    return backends.triton_kernels().magnitude_threshold.magnitude_threshold(b, es, k, dtype)


_IMPLEMENTATIONS = {
    "reference": _run_reference,
    "cpu": _run_cpu,
    "cuda": _run_cuda,
    "triton": _run_triton,
}

_OP = define(
    "magnitude_threshold",
    "(Tensor base, Tensor[] experts, int k, str? backend) -> Tensor",
    _kernel,
    _fake,
)
