"""``gram``: the pairwise dot products of k same-shaped tensors, in one pass, in float64.

For k tensors t_0 .. t_{k-1} (and optionally a `base`, giving the task vectors
x_i = t_i - base) the op returns ``G[i, j] = Σ_e x_i[e] · x_j[e]``: over the whole tensor,
over each row (the last dimension) or over each column (the first dimension). This is what
merging methods need for cosine similarities, norms and interference of task vectors, and
for least-squares weights; each input is read once, in its own dtype (a float32 and a
bfloat16 checkpoint mix without a conversion pass), and no input-sized temporary is made.

Arithmetic (every backend): x_i is t_i converted exactly to float32 (float64 when any input
or the base is float64), or ``t_i - base`` subtracted and rounded in that dtype (as
``t_i.float() - base.float()`` does); each x value is then widened to float64, where every
product and every sum is formed. Backends differ only in the order of the float64 sums, so
they agree with the reference to about 1e-12 relative to ``Σ_e |x_i[e]| |x_j[e]|``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Optional

import torch

from .. import backends
from .._dtypes import KERNEL_DTYPE_CODES, dtype_names
from .._tensors import TensorLike, as_tensor, as_tensor_list
from ..reference import gram as reference
from ..reference.gram import compute_dtype
from ._library import define, resolve

#: The most tensors one call takes (k(k+1)/2 = 2080 pairs); kGramMaxTensors in
#: csrc/include/fastmerge/gram.h.
MAX_TENSORS = 64
#: Mode codes of the native kernels (fastmerge::GramMode in csrc/include/fastmerge/gram.h).
_MODE_CODES = {"whole": 0, "rows": 1, "columns": 2}


def gram(
    tensors: Sequence[TensorLike],
    *,
    base: Optional[TensorLike] = None,
    axis: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Float64 Gram matrices ``G[..., i, j] = Σ_e x_i[e] · x_j[e]`` of k same-shaped tensors,
    with ``x_i = tensors[i]`` or ``x_i = tensors[i] - base``.

    Args:
        tensors: k >= 1 (at most 64) tensors of one shape on one device, each float16,
            bfloat16, float32 or float64 (dtypes may differ). Non-contiguous inputs are
            copied first.
        base: optional floating tensor of the same shape and device; then
            ``x_i = tensors[i] - base``, subtracted and rounded in float32 (float64 when any
            input or the base is float64).
        axis: ``None``: the whole tensor is one vector, the result is (k, k). ``-1`` (or
            ``ndim - 1``): one matrix per row over the last dimension, the tensor viewed as
            (R, C) with C = ``shape[-1]``; the result is (R, k, k). ``0``: one matrix per
            column, the tensor viewed as (N, M) with N = ``shape[0]``, M = numel / N,
            ``G[m, i, j] = Σ_r x_i[r, m] · x_j[r, m]``; the result is (M, k, k). A 1-D tensor
            gives one matrix (R = M = 1) for both; a 0-d tensor counts as shape (1,).
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; default: the
            fastest usable one (see :mod:`fastmerge.backends`).

    Returns:
        float64 (k, k), (R, k, k) or (M, k, k) on the inputs' device, symmetric (both
        halves filled); zeros where the vectors are empty. Each x value is rounded to the
        compute dtype as above and widened to float64, and products and sums are float64:
        backends agree with the reference to about 1e-12 relative, whatever their order.

    Raises:
        TypeError: `tensors` is not a list, an input or the base is not floating, or `axis`
            is not an integer.
        ValueError: no tensors or more than 64, shapes or devices that differ, a `base` of
            another shape or device, an `axis` other than None, 0, -1 and ``ndim - 1``, or
            an unknown `backend`.
        fastmerge.BackendUnavailableError: the requested backend cannot run here.

    Example:
        >>> import torch, fastmerge
        >>> a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> b = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.bfloat16)
        >>> fastmerge.ops.gram([a, b]).tolist()
        [[30.0, 5.0], [5.0, 2.0]]
        >>> fastmerge.ops.gram([a, b], axis=-1).tolist()
        [[[5.0, 2.0], [2.0, 1.0]], [[25.0, 3.0], [3.0, 1.0]]]
        >>> fastmerge.ops.gram([a, b], axis=0).tolist()
        [[[10.0, 3.0], [3.0, 1.0]], [[20.0, 2.0], [2.0, 1.0]]]
        >>> fastmerge.ops.gram([a, b], base=torch.ones(2, 2)).tolist()
        [[14.0, -3.0], [-3.0, 2.0]]
    """
    ts = as_tensor_list(tensors, "tensors")
    if not ts:
        raise ValueError("tensors is empty; gram needs at least one tensor")
    if len(ts) > MAX_TENSORS:
        raise ValueError(f"gram takes at most {MAX_TENSORS} tensors, got {len(ts)}")
    shape, device = ts[0].shape, ts[0].device
    for i, t in enumerate(ts[1:], start=1):
        if t.shape != shape:
            raise ValueError(
                f"tensors[{i}] has shape {tuple(t.shape)} but tensors[0] has {tuple(shape)}"
            )
    b = None if base is None else _check_base(base, shape, device)
    mode, rows, cols = _layout(tuple(shape), axis)
    k = len(ts)
    batch = _batch(mode, rows, cols)
    out_shape = (k, k) if axis is None else (batch, k, k)
    if batch == 1:
        mode = "whole"  # one vector: the chunked whole-tensor kernels use every thread
    flat = [_dense(t.detach(), rows, cols) for t in ts]
    b = None if b is None else _dense(b.detach(), rows, cols)
    return _OP(flat, b, mode, backend).reshape(out_shape)


def _batch(mode: str, rows: int, cols: int) -> int:
    return {"whole": 1, "rows": rows, "columns": cols}[mode]


def _kernel(
    ts: list[torch.Tensor], base: Optional[torch.Tensor], mode: str, backend: Optional[str]
) -> torch.Tensor:
    """(batch, k, k) Gram matrices of dense (rows, cols) inputs."""
    name = resolve(backend, ts[0].device)  # an unusable backend raises, even for no entries
    rows, cols = ts[0].shape
    if rows * cols == 0:
        k = len(ts)
        return torch.zeros(
            (_batch(mode, rows, cols), k, k), dtype=torch.float64, device=ts[0].device
        )
    with torch.no_grad():
        return _IMPLEMENTATIONS[name](ts, base, mode, compute_dtype(ts, base))


def _fake(
    ts: list[torch.Tensor], base: Optional[torch.Tensor], mode: str, backend: Optional[str]
) -> torch.Tensor:
    rows, cols = ts[0].shape
    k = len(ts)
    return ts[0].new_empty((_batch(mode, rows, cols), k, k), dtype=torch.float64)


def _check_base(base: TensorLike, shape: torch.Size, device: torch.device) -> torch.Tensor:
    b = as_tensor(base, "base")
    if b.dtype not in KERNEL_DTYPE_CODES:
        raise TypeError(f"base has dtype {b.dtype}; supported dtypes are {dtype_names()}")
    if b.shape != shape:
        raise ValueError(f"base has shape {tuple(b.shape)} but the tensors have {tuple(shape)}")
    if b.device != device:
        raise ValueError(f"base is on {b.device} but the tensors are on {device}")
    return b


def _layout(shape: tuple[int, ...], axis: Optional[int]) -> tuple[str, int, int]:
    """(mode, rows, cols): the tensor as a (rows, cols) row-major matrix and which of its
    entries make one vector."""
    if not shape:
        shape = (1,)
    ndim, numel = len(shape), math.prod(shape)
    if axis is None:
        return "whole", 1, numel
    if isinstance(axis, bool):
        raise TypeError("axis must be None or an int, got a bool")
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be None or an int, got {type(axis).__name__}") from None
    if axis in (-1, ndim - 1):
        return "rows", math.prod(shape[:-1]), shape[-1]
    if axis == 0:
        return "columns", shape[0], math.prod(shape[1:])
    raise ValueError(
        f"axis is {axis}; gram takes axis=None (the whole tensor), 0 (per column) or -1 "
        f"(per row, also {ndim - 1} for this {ndim}-D shape)"
    )


def _dense(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`t` as a contiguous (rows, cols) matrix (copied only when it is not contiguous)."""
    t = t.reshape(rows, cols)
    return t if t.is_contiguous() else t.contiguous()


def _pairs(k: int) -> int:
    return k * (k + 1) // 2


def _run_reference(ts, base, mode, dtype) -> torch.Tensor:
    return reference.gram(ts, base, mode, dtype)


def _native_args(ts, base) -> tuple[list[int], list[int], int, int]:
    codes = [KERNEL_DTYPE_CODES[t.dtype] for t in ts]
    if base is None:
        return [t.data_ptr() for t in ts], codes, 0, 0
    return [t.data_ptr() for t in ts], codes, base.data_ptr(), KERNEL_DTYPE_CODES[base.dtype]


def _new_out(mode, rows, cols, k, device) -> torch.Tensor:
    batch = {"whole": 1, "rows": rows, "columns": cols}[mode]
    return torch.empty((batch, k, k), dtype=torch.float64, device=device)


def _run_cpu(ts, base, mode, dtype) -> torch.Tensor:
    rows, cols = ts[0].shape
    out = _new_out(mode, rows, cols, len(ts), ts[0].device)
    pointers, codes, base_pointer, base_code = _native_args(ts, base)
    backends.cpu_extension().gram(
        pointers,
        codes,
        base_pointer,
        base_code,
        rows,
        cols,
        _MODE_CODES[mode],
        dtype == torch.float64,
        out.data_ptr(),
    )
    return out


#: CUDA: the whole tensor is cut into this many entries per block at least, in at most
#: _CUDA_MAX_SPLITS blocks (their partial matrices are summed in block order); columns
#: split their rows into ranges of at least _CUDA_SPLIT_ROWS rows when the column tiles
#: alone give too few blocks.
_CUDA_SPLIT_ENTRIES = 4096
_CUDA_MAX_SPLITS = 1024
_CUDA_SPLIT_ROWS = 1024
_CUDA_TARGET_BLOCKS = 512


def cuda_splits(mode: str, rows: int, cols: int) -> int:
    """How many ranges the vectors' entries are cut into on the GPU (each range's partial
    matrices go to a float64 workspace and are summed in range order, on the device)."""
    if mode == "whole":
        return max(1, min(_CUDA_MAX_SPLITS, -(-rows * cols // _CUDA_SPLIT_ENTRIES)))
    if mode == "columns":
        by_rows = -(-rows // _CUDA_SPLIT_ROWS)
        by_blocks = max(1, _CUDA_TARGET_BLOCKS * 32 // cols)
        return max(1, min(_CUDA_MAX_SPLITS, by_rows, by_blocks))
    return 1


def _run_cuda(ts, base, mode, dtype) -> torch.Tensor:
    rows, cols = ts[0].shape
    device = ts[0].device
    k = len(ts)
    out = _new_out(mode, rows, cols, k, device)
    pointers, codes, base_pointer, base_code = _native_args(ts, base)
    # one host-to-device copy: the inputs' addresses and dtype codes, an int64 (2, k) table
    table = torch.tensor(pointers + codes, dtype=torch.int64).to(device)
    splits = cuda_splits(mode, rows, cols)
    size = splits * out.shape[0] * _pairs(k) if splits > 1 else 0
    workspace = torch.empty(size, dtype=torch.float64, device=device)
    with torch.cuda.device(device):
        backends.cuda_extension().gram(
            table.data_ptr(),
            k,
            base_pointer,
            base_code,
            rows,
            cols,
            _MODE_CODES[mode],
            splits,
            dtype == torch.float64,
            workspace.data_ptr() if size else 0,
            out.data_ptr(),
            torch.cuda.current_stream(device).cuda_stream,
        )
    return out


def _run_triton(ts, base, mode, dtype) -> torch.Tensor:
    return backends.triton_kernels().gram.gram(ts, base, mode, dtype)


_IMPLEMENTATIONS = {
    "reference": _run_reference,
    "cpu": _run_cpu,
    "cuda": _run_cuda,
    "triton": _run_triton,
}

_OP = define(
    "gram",
    "(Tensor[] tensors, Tensor? base, str mode, str? backend) -> Tensor",
    _kernel,
    _fake,
)
