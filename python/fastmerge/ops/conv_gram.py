"""``conv_gram``: Gram and cross matrices of a convolution's im2col patches, fused.

For a 2-D convolution (groups = 1, zero padding) with input x (N, C_in, H, W) and an
output-shaped target y (N, C_out, H', W'), every output pixel is one sample: its input is
the patch of x that the kernel sees, flattened in ``F.unfold``'s (and the conv weight's)
order (channel, kernel row, kernel column), plus a constant 1 when ``bias=True``; its
target is y's C_out values at that pixel. With P the (N H' W', K) patch matrix
(K = C_in kh kw, + 1 with the bias) and Y the (N H' W', C_out) targets, the op returns
``gram = P^T P`` (K, K) and ``cross = P^T Y`` (K, C_out), both float64: the sufficient
statistics of the least-squares problem ``min_W ||P W^T - Y||``, whose solution reshaped
to (C_out, C_in, kh, kw) is a conv weight (:class:`fastmerge.LeastSquares`).

The cpu, cuda and triton backends gather the patches on the fly (implicit im2col) and never
materialize P; the reference unfolds it (``F.unfold``) and multiplies in float64.
Products are summed in float64 on cpu and cuda; triton sums float32 products of float32
input in float32 for 1,024 samples at a time and then in float64 (float64 input: float64).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import backends
from .._tensors import TensorLike, as_tensor
from ..reference import conv_gram as reference
from ._library import define, resolve

IntPair = Union[int, tuple[int, int]]


def conv_gram(
    x: TensorLike,
    y: TensorLike,
    kernel_size: IntPair,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    bias: bool = True,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``(P^T P, P^T Y)`` of a conv's im2col patches P and output pixels Y.

    Args:
        x: (N, C_in, H, W) floating input of the convolution.
        y: (N, C_out, H', W') floating targets, H' and W' the conv's output size.
        kernel_size, stride, padding, dilation: as for ``nn.Conv2d`` (an int or a pair;
            padding is zero padding, given as numbers).
        bias: append a constant-1 feature (the last row and column of the Gram).
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; default: the
            fastest usable one for the inputs' device.

    Returns:
        ``(gram, cross)``: float64 (K, K) and (K, C_out), K = C_in kh kw (+ 1 with bias), on
        the inputs' device. float16/bfloat16 input is computed as float32.

    Example:
        >>> import torch, fastmerge
        >>> x = torch.arange(9.0).reshape(1, 1, 3, 3)
        >>> y = torch.ones(1, 2, 2, 2)
        >>> gram, cross = fastmerge.ops.conv_gram(x, y, 2, bias=False)
        >>> gram.shape, cross.shape, gram[0, 0].item()  # 0^2 + 1^2 + 3^2 + 4^2
        (torch.Size([4, 4]), torch.Size([4, 2]), 26.0)
    """
    xt, yt = _floating(x, "x"), _floating(y, "y")
    if xt.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C_in, H, W), got shape {tuple(xt.shape)}")
    if yt.dim() != 4:
        raise ValueError(f"y must be 4-D (N, C_out, H', W'), got shape {tuple(yt.shape)}")
    if yt.device != xt.device:
        raise ValueError(f"y is on {yt.device} but x is on {xt.device}")
    ks = _pair(kernel_size, "kernel_size", minimum=1)
    st = _pair(stride, "stride", minimum=1)
    pd = _pair(padding, "padding", minimum=0)
    dl = _pair(dilation, "dilation", minimum=1)
    n, c_in, h, w = xt.shape
    h_out, w_out = output_size((h, w), ks, st, pd, dl)
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"kernel_size {ks} with dilation {dl} does not fit x's padded size "
            f"{(h + 2 * pd[0], w + 2 * pd[1])}"
        )
    if yt.shape[0] != n or tuple(yt.shape[2:]) != (h_out, w_out):
        raise ValueError(
            f"y must have shape ({n}, C_out, {h_out}, {w_out}) for x of shape "
            f"{tuple(xt.shape)}, got {tuple(yt.shape)}"
        )
    gram, cross = _OP(xt.detach(), yt.detach(), ks, st, pd, dl, bool(bias), backend)
    return gram, cross


def _kernel(x, y, ks, st, pd, dl, bias: bool, backend: Optional[str]):
    """(gram, cross) of validated x and y (any floating dtype, contiguous or not)."""
    name = resolve(backend, x.device)
    ks, st, pd, dl = (tuple(v) for v in (ks, st, pd, dl))
    if name == "reference":
        with torch.no_grad():
            return reference.conv_gram(x, y, ks, st, pd, dl, bias)
    n, c_in, h, w = x.shape
    h_out, w_out = y.shape[2:]
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    xc = x.to(dtype).contiguous()
    yc = y.to(dtype).contiguous()
    geometry = [n, c_in, h, w, y.shape[1], h_out, w_out, *ks, *st, *pd, *dl, int(bias)]
    with torch.no_grad():
        z = _IMPLEMENTATIONS[name](xc, yc, [int(v) for v in geometry])
        k = z.shape[0]
        upper = z[:, :k]
        gram = upper.triu() + upper.triu(1).mT
        return gram, z[:, k:].clone()


def _fake(x, y, ks, st, pd, dl, bias: bool, backend: Optional[str]):
    k = x.shape[1] * ks[0] * ks[1] + int(bias)
    return (
        x.new_empty((k, k), dtype=torch.float64),
        x.new_empty((k, y.shape[1]), dtype=torch.float64),
    )


def output_size(
    size: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """(H', W') of a convolution, as ``nn.Conv2d`` computes it.

    Example:
        >>> from fastmerge.ops.conv_gram import output_size
        >>> output_size((32, 32), (3, 3), (2, 2), (1, 1), (1, 1))
        (16, 16)
    """
    return tuple(
        (size[i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    )


def _floating(value: TensorLike, name: str) -> torch.Tensor:
    t = as_tensor(value, name)
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    return t


def _pair(value: IntPair, name: str, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def _run_cpu(x: torch.Tensor, y: torch.Tensor, geometry: list[int]) -> torch.Tensor:
    rows = geometry[1] * geometry[7] * geometry[8] + geometry[15]
    out = torch.empty((rows, rows + geometry[4]), dtype=torch.float64)
    code = 3 if x.dtype == torch.float64 else 2
    backends.cpu_extension().conv_gram(x.data_ptr(), y.data_ptr(), code, geometry, out.data_ptr())
    return out


def _run_cuda(x: torch.Tensor, y: torch.Tensor, geometry: list[int]) -> torch.Tensor:
    device = x.device
    rows = geometry[1] * geometry[7] * geometry[8] + geometry[15]
    out = torch.empty((rows, rows + geometry[4]), dtype=torch.float64, device=device)
    host = torch.tensor(geometry, dtype=torch.int64)
    code = 3 if x.dtype == torch.float64 else 2
    with torch.cuda.device(device):
        backends.cuda_extension().conv_gram(
            x.data_ptr(),
            y.data_ptr(),
            code,
            host.data_ptr(),
            out.data_ptr(),
            torch.cuda.current_stream(device).cuda_stream,
        )
    return out


def _run_triton(x: torch.Tensor, y: torch.Tensor, geometry: list[int]) -> torch.Tensor:
    return backends.triton_kernels().conv_gram.conv_gram(x, y, geometry)


_IMPLEMENTATIONS = {"cpu": _run_cpu, "cuda": _run_cuda, "triton": _run_triton}

_OP = define(
    "conv_gram",
    "(Tensor x, Tensor y, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
    "bool bias, str? backend) -> (Tensor, Tensor)",
    _kernel,
    _fake,
)
