"""Layer-wise least squares (the "LeaS" of PLeaS): a mergeable accumulator of the Gram
matrix ``X^T X`` and the cross matrix ``X^T Y`` over batches, and a batched, masked ridge
solve over many layers at once.

For a Linear layer every row of x (N, d_in) is a sample; for a Conv2d every output pixel
is one, whose input is the im2col patch the kernel sees (:func:`fastmerge.ops.conv_gram`).
The solve minimizes ``||X W^T + b - Y||^2 + lam ||[W | b]||^2`` per output block over the
inputs that block may use, with ``lam = ridge * trace(G) / d`` (G the layer's whole Gram
matrix including the bias feature, d its size): the closed form that replaces PLeaS'
reference 400 Adam steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from . import dist
from ._tensors import TensorLike, as_tensor
from .ops.conv_gram import _pair, conv_gram, output_size

#: Elements of x and y per GEMM block when a batch must be converted to the GEMM dtype
#: (or unfolded), by device type: the workspace stays O(block), not O(N d).
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
#: float32 GEMM sums are moved into the float64 accumulators at least this often (rows).
FLUSH_ROWS = 1 << 15
#: ``X^T X`` is computed as its upper block triangle, in row segments of this many inputs
#: (10 of 16 blocks at d_in = 1024 on the CPU); the lower triangle is its transpose.
SEGMENT_UNITS = {"cpu": 256, "cuda": 2048}
#: The kind code that fastmerge.dist compares across the ranks before a reduction.
_REDUCTION_KIND = dist.kind_code("LeastSquares")


Blocks = Union[None, TensorLike, Sequence[tuple[Any, Any]]]


class LeastSquares:
    """Streaming sufficient statistics of a least-squares layer fit, and its ridge solve.

    Feed (input, target) batches with :meth:`update` (Linear: x (..., d_in), y (..., d_out))
    or :meth:`update_conv` (Conv2d: x (N, C_in, H, W), y (N, C_out, H', W'), each output
    pixel one sample, d_in = C_in kh kw). With ``bias=True`` a constant-1 input feature is
    appended (last row/column of :attr:`gram`), so that :meth:`solve` also yields a bias.

    Accumulation: float64 ``X^T X`` (its upper block triangle, in segments of 256 inputs on
    the CPU), ``X^T Y`` and, with a bias, the column sums of X and Y.
    Float16/bfloat16/float32 batches are multiplied in float32 GEMMs (torch's BLAS or
    cuBLAS) on blocks of rows and moved into the float64 accumulators at least every
    32,768 rows; a batch with a float64 tensor is multiplied in float64. Convs on the CPU
    unfold blocks of images (``F.unfold``, at most 2**22 elements at a time) and use the
    same GEMMs, which beat the fused patch kernel there; on other devices, or with
    ``backend=`` given, they go through the fused :func:`fastmerge.ops.conv_gram` (float64
    sums), which never materializes the patches. On CUDA the float32 GEMM follows torch's
    matmul precision: leave TF32 off for float32 accuracy.

    Partial accumulators :meth:`merge` exactly (threads, shards, ranks).

    Args:
        d_in: input features (for a conv: C_in * kh * kw).
        d_out: outputs (for a conv: C_out).
        bias: append a constant-1 input so the solve yields a bias.
        device: device of the accumulators; batches elsewhere are moved there. Default:
            the first batch's device.
        backend: backend of :func:`fastmerge.ops.conv_gram` for :meth:`update_conv`;
            default: unfold + GEMM on the CPU, the fastest usable fused kernel elsewhere.

    Example:
        >>> import torch, fastmerge
        >>> x = torch.randn(500, 3, dtype=torch.float64)
        >>> y = x @ torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64).T + 3.0
        >>> ls = fastmerge.LeastSquares(3, 1)
        >>> for first in range(0, 500, 200):  # uneven batches stream in
        ...     _ = ls.update(x[first:first + 200], y[first:first + 200])
        >>> weight, bias = ls.solve(ridge=0.0)
        >>> weight.round(decimals=6).tolist(), bias.round(decimals=6).tolist()
        ([[1.0, -2.0, 0.5]], [3.0])
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        bias: bool = True,
        device: Optional[Union[str, torch.device]] = None,
        backend: Optional[str] = None,
    ) -> None:
        for name, value in (("d_in", d_in), ("d_out", d_out)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.d_in = d_in
        self.d_out = d_out
        self.bias = bool(bias)
        self.backend = backend
        self.count = 0
        self._device = torch.device(device) if device is not None else None
        self._xx: Optional[torch.Tensor] = None  # float64 (d_in, d_in)
        self._xy: Optional[torch.Tensor] = None  # float64 (d_in, d_out)
        self._sx: Optional[torch.Tensor] = None  # float64 (d_in,)
        self._sy: Optional[torch.Tensor] = None  # float64 (d_out,)
        self._pending_xx: Optional[torch.Tensor] = None  # float32 sums not yet in _xx
        self._pending_xy: Optional[torch.Tensor] = None
        self._pending_rows = 0

    @property
    def device(self) -> Optional[torch.device]:
        """Device of the accumulators (None before the first batch unless given).

        Example:
            >>> fastmerge.LeastSquares(2, 1).update(torch.ones(3, 2), torch.ones(3, 1)).device
            device(type='cpu')
        """
        return self._device

    @property
    def d(self) -> int:
        """Size of the Gram matrix: d_in, plus 1 with the bias feature.

        Example:
            >>> fastmerge.LeastSquares(4, 2).d, fastmerge.LeastSquares(4, 2, bias=False).d
            (5, 4)
        """
        return self.d_in + int(self.bias)

    @property
    def gram(self) -> torch.Tensor:
        """Float64 (d, d) ``X^T X`` over all samples (bias feature last), symmetric.

        Example:
            >>> ls = fastmerge.LeastSquares(1, 1).update(torch.tensor([[2.0]]), torch.ones(1, 1))
            >>> ls.gram.tolist()
            [[4.0, 2.0], [2.0, 1.0]]
        """
        self._require_samples()
        self._flush()
        xx = self._xx.triu() + self._xx.triu(1).T  # only the upper triangle is summed
        if not self.bias:
            return xx
        n = torch.full((1, 1), float(self.count), dtype=torch.float64, device=xx.device)
        top = torch.cat([xx, self._sx[:, None]], dim=1)
        return torch.cat([top, torch.cat([self._sx[None, :], n], dim=1)], dim=0)

    @property
    def cross(self) -> torch.Tensor:
        """Float64 (d, d_out) ``X^T Y`` over all samples (bias feature last).

        Example:
            >>> x, y = torch.tensor([[2.0]]), torch.tensor([[3.0, 1.0]])
            >>> fastmerge.LeastSquares(1, 2).update(x, y).cross.tolist()
            [[6.0, 2.0], [3.0, 1.0]]
        """
        self._require_samples()
        self._flush()
        if not self.bias:
            return self._xy.clone()
        return torch.cat([self._xy, self._sy[None, :]], dim=0)

    def __repr__(self) -> str:
        return (
            f"LeastSquares(d_in={self.d_in}, d_out={self.d_out}, bias={self.bias}, "
            f"count={self.count}, device={self.device})"
        )

    # ---- accumulation -----------------------------------------------------------------

    def update(self, x: TensorLike, y: TensorLike) -> LeastSquares:
        """Add samples: x (..., d_in) inputs and y (..., d_out) targets with the same leading
        dimensions (flattened into samples); returns ``self``.

        Raises:
            TypeError: a non-floating x or y.
            ValueError: a last dimension other than d_in / d_out, different leading
                dimensions, or x and y on different devices.

        Example:
            >>> ls = fastmerge.LeastSquares(4, 2)
            >>> ls.update(torch.randn(8, 5, 4), torch.randn(8, 5, 2)).count
            40
        """
        xt, yt = self._batch(x, "x"), self._batch(y, "y")
        if xt.dim() < 1 or xt.shape[-1] != self.d_in:
            raise ValueError(f"x must have shape (..., d_in={self.d_in}), got {tuple(xt.shape)}")
        if yt.dim() < 1 or yt.shape[-1] != self.d_out:
            raise ValueError(f"y must have shape (..., d_out={self.d_out}), got {tuple(yt.shape)}")
        if xt.shape[:-1] != yt.shape[:-1]:
            raise ValueError(
                f"x and y must have the same leading dimensions (samples), got "
                f"{tuple(xt.shape)} and {tuple(yt.shape)}"
            )
        self._add_rows(xt.reshape(-1, self.d_in), yt.reshape(-1, self.d_out))
        return self

    def update_conv(
        self,
        x: TensorLike,
        y: TensorLike,
        conv: Optional[torch.nn.Conv2d] = None,
        *,
        kernel_size: Any = None,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
    ) -> LeastSquares:
        """Add a conv layer's samples: every output pixel is one sample; returns ``self``.

        Args:
            x: (N, C_in, H, W) input of the convolution.
            y: (N, C_out, H', W') targets at the conv's output pixels.
            conv: an ``nn.Conv2d`` (groups=1, zero padding) whose kernel_size, stride,
                padding and dilation are used; or give `kernel_size` (and the others).
            kernel_size, stride, padding, dilation: as for ``nn.Conv2d`` when `conv` is None
                (padding an int, a pair, ``"valid"``, or ``"same"`` when it is symmetric).

        The solution's weight reshaped to (C_out, C_in, kh, kw) is the conv's weight.

        Example:
            >>> conv = torch.nn.Conv2d(2, 3, 3, padding=1)
            >>> x = torch.randn(4, 2, 6, 6)
            >>> ls = fastmerge.LeastSquares(2 * 3 * 3, 3)
            >>> ls.update_conv(x, conv(x).detach(), conv).count  # 4 images of 6 x 6 pixels
            144
            >>> weight, bias = ls.solve(ridge=0.0)
            >>> torch.allclose(weight.reshape(conv.weight.shape).float(), conv.weight, atol=1e-4)
            True
        """
        if conv is not None:
            if not isinstance(conv, torch.nn.Conv2d):
                raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
            if conv.groups != 1:
                raise ValueError(f"conv must have groups=1, got groups={conv.groups}")
            if conv.padding_mode != "zeros":
                raise ValueError(f"conv must use zero padding, got {conv.padding_mode!r}")
            kernel_size, stride = conv.kernel_size, conv.stride
            padding, dilation = conv.padding, conv.dilation
        elif kernel_size is None:
            raise ValueError("give either conv (an nn.Conv2d) or kernel_size")
        ks = _pair(kernel_size, "kernel_size", minimum=1)
        st = _pair(stride, "stride", minimum=1)
        dl = _pair(dilation, "dilation", minimum=1)
        pd = _conv_padding(padding, ks, dl)
        xt, yt = self._batch(x, "x"), self._batch(y, "y")
        if xt.dim() != 4:
            raise ValueError(f"x must be 4-D (N, C_in, H, W), got shape {tuple(xt.shape)}")
        if xt.shape[1] * ks[0] * ks[1] != self.d_in:
            raise ValueError(
                f"x has C_in={xt.shape[1]}, so the patches have C_in*kh*kw="
                f"{xt.shape[1] * ks[0] * ks[1]} features, but d_in={self.d_in}"
            )
        if yt.dim() != 4 or yt.shape[1] != self.d_out:
            raise ValueError(
                f"y must have shape (N, d_out={self.d_out}, H', W'), got {tuple(yt.shape)}"
            )
        n = xt.shape[0]
        h_out, w_out = output_size(tuple(xt.shape[2:]), ks, st, pd, dl)
        if yt.shape[0] != n or tuple(yt.shape[2:]) != (h_out, w_out):
            raise ValueError(
                f"y must have shape ({n}, {self.d_out}, {h_out}, {w_out}) for x of shape "
                f"{tuple(xt.shape)}, got {tuple(yt.shape)}"
            )
        if self.backend is None and xt.device.type == "cpu":
            self._add_conv_unfold(xt, yt, ks, st, pd, dl)
            return self
        gram, cross = conv_gram(
            xt, yt, ks, stride=st, padding=pd, dilation=dl, bias=self.bias, backend=self.backend
        )
        self._allocate(xt.device)
        k = self.d_in
        self._xx += gram[:k, :k]
        self._xy += cross[:k]
        if self.bias:
            self._sx += gram[k, :k]
            self._sy += cross[k]
        self.count += n * h_out * w_out
        return self

    def merge(self, other: LeastSquares) -> LeastSquares:
        """Add the statistics of `other` (more samples of the same layer); returns ``self``.

        Example:
            >>> x, y = torch.randn(90, 3, dtype=torch.float64), torch.randn(90, 2)
            >>> left = fastmerge.LeastSquares(3, 2).update(x[:40], y[:40])
            >>> right = fastmerge.LeastSquares(3, 2).update(x[40:], y[40:])
            >>> whole = fastmerge.LeastSquares(3, 2).update(x, y)
            >>> torch.allclose(left.merge(right).gram, whole.gram)
            True
        """
        if not isinstance(other, LeastSquares):
            raise TypeError(f"other must be a LeastSquares, got {type(other).__name__}")
        if other is self:
            raise ValueError("cannot merge a LeastSquares with itself")
        mine = (self.d_in, self.d_out, self.bias)
        theirs = (other.d_in, other.d_out, other.bias)
        if mine != theirs:
            raise ValueError(
                f"cannot merge LeastSquares of (d_in, d_out, bias) = {mine} with {theirs}"
            )
        if other._xx is None:
            return self
        other._flush()
        self._allocate(self._device or other._device)
        self._flush()
        device = self._device
        self._xx += other._xx.to(device)
        self._xy += other._xy.to(device)
        self._sx += other._sx.to(device)
        self._sy += other._sy.to(device)
        self.count += other.count
        return self

    def all_reduce(self, group: Any = None) -> LeastSquares:
        """Sum these statistics over the ranks of a torch.distributed process group, in
        place, so that every rank holds ``X^T X`` and ``X^T Y`` of all ranks' samples;
        returns ``self``. A collective: every rank calls it (see
        :func:`fastmerge.dist.all_reduce_`).

        Example:
            >>> import os, tempfile
            >>> import torch.distributed as tdist
            >>> rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
            >>> tdist.init_process_group("gloo", init_method=f"file://{rendezvous}",
            ...                          rank=0, world_size=1)
            >>> ls = fastmerge.LeastSquares(2, 1).update(torch.ones(3, 2), torch.ones(3, 1))
            >>> ls.all_reduce().count
            3
            >>> tdist.destroy_process_group()
        """
        return dist.all_reduce_(self, group)

    def _all_reduce(self, group: Any) -> LeastSquares:
        """fastmerge.dist.Reducible: flush the float32 partial sums, then sum X^T X, X^T Y
        and the column sums over the ranks."""
        allocated = self._xx is not None
        rows = dist.describe_ranks(
            _REDUCTION_KIND,
            [self.d_in, self.d_out, float(self.bias), self.count, float(allocated)],
            group,
        )
        shapes = [tuple(int(v) for v in row[1:4]) for row in rows]
        if len(set(shapes)) > 1:
            raise ValueError(
                "cannot all-reduce LeastSquares of different (d_in, d_out, bias) on the ranks: "
                + ", ".join(f"rank {r}: {shape}" for r, shape in enumerate(shapes))
            )
        if not any(row[5] for row in rows):
            return self  # no rank has samples
        if not allocated:
            self._allocate(self._device or dist.home_device(group))
        self._flush()
        parts = [self._xx, self._xy, self._sx, self._sy]
        for part, total in zip(parts, dist.sum_tensors(parts, group)):
            part.copy_(total)
        self.count = int(sum(row[4] for row in rows))
        return self

    # ---- solve ----------------------------------------------------------------------------

    def solve(
        self, ridge: float = 1e-4, blocks: Blocks = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The ridge least-squares layer: ``(weight (d_out, d_in), bias (d_out,) or None)``,
        float64 on the accumulators' device.

        Args:
            ridge: ``ridge * trace(gram) / d`` is added to the Gram's diagonal (>= 0).
            blocks: which inputs each output may use, as for :func:`ridge_solve` but over
                the d_in inputs (the bias is always allowed): a (d_out, d_in) boolean mask,
                or a list of (outputs, allowed inputs) pairs. Masked weights are exactly 0.

        Example:
            >>> x = torch.randn(200, 2, dtype=torch.float64)
            >>> ls = fastmerge.LeastSquares(2, 2, bias=False).update(x, x)
            >>> mask = torch.tensor([[True, False], [True, True]])
            >>> weight, _ = ls.solve(ridge=0.0, blocks=mask)
            >>> (weight.round(decimals=9) + 0.0).tolist()  # + 0.0 turns -0.0 into 0.0
            [[1.0, 0.0], [0.0, 1.0]]
        """
        self._require_samples()
        gram, cross = self.gram, self.cross
        spec = blocks
        if blocks is not None and self.bias:
            spec = [
                (outputs, torch.cat([allowed, allowed.new_tensor([self.d_in])]))
                for outputs, allowed in _block_list(blocks, self.d_out, self.d_in, gram.device)
            ]
        solution = ridge_solve(gram, cross, ridge=ridge, blocks=spec)
        weight = solution[: self.d_in].T.contiguous()
        return weight, (solution[self.d_in].clone() if self.bias else None)

    # ---- internals ------------------------------------------------------------------------

    def _batch(self, value: TensorLike, name: str) -> torch.Tensor:
        t = as_tensor(value, name)
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
        t = t.detach()
        if self._device is not None and t.device != self._device:
            t = t.to(self._device)
        return t

    def _require_samples(self) -> None:
        if self.count == 0:
            raise ValueError("no samples yet: call update() or update_conv() before solving")

    def _allocate(self, device: Optional[torch.device]) -> None:
        if self._xx is not None:
            return
        device = torch.device("cpu") if device is None else torch.device(device)
        self._device = device
        f64 = dict(dtype=torch.float64, device=device)
        self._xx = torch.zeros(self.d_in, self.d_in, **f64)
        self._xy = torch.zeros(self.d_in, self.d_out, **f64)
        self._sx = torch.zeros(self.d_in, **f64)
        self._sy = torch.zeros(self.d_out, **f64)

    def _add_rows(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Accumulate x (n, d_in), y (n, d_out) on the accumulators' device."""
        if x.device != y.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
        n = int(x.shape[0])
        if n == 0:
            return
        self._allocate(self._device or x.device)
        float64 = torch.float64 in (x.dtype, y.dtype)
        dtype = torch.float64 if float64 else torch.float32
        if x.dtype == dtype and y.dtype == dtype:
            step = FLUSH_ROWS  # no conversion: no workspace to bound
        else:
            chunk = CHUNK_ELEMENTS.get(x.device.type, CHUNK_ELEMENTS["cuda"])
            step = max(1, chunk // (self.d_in + self.d_out))
        width = SEGMENT_UNITS.get(x.device.type, SEGMENT_UNITS["cuda"])
        segments = [(lo, min(self.d_in, lo + width)) for lo in range(0, self.d_in, width)]
        with torch.no_grad():
            for first in range(0, n, step):
                xb = x[first : first + step].to(dtype)
                yb = y[first : first + step].to(dtype)
                if not float64 and self._pending_xx is None:
                    self._pending_xx = torch.zeros_like(self._xx, dtype=torch.float32)
                    self._pending_xy = torch.zeros_like(self._xy, dtype=torch.float32)
                xx, xy = (self._xx, self._xy) if float64 else (self._pending_xx, self._pending_xy)
                for lo, hi in segments:  # upper block triangle of X^T X
                    xx[lo:hi, lo:].addmm_(xb[:, lo:hi].T, xb[:, lo:])
                xy.addmm_(xb.T, yb)
                if not float64:
                    self._pending_rows += xb.shape[0]
                    if self._pending_rows >= FLUSH_ROWS:
                        self._flush()
                if self.bias:
                    self._sx += xb.sum(0, dtype=torch.float64)
                    self._sy += yb.sum(0, dtype=torch.float64)
        self.count += n

    def _add_conv_unfold(self, x, y, ks, st, pd, dl) -> None:
        """CPU conv path: unfold blocks of images and accumulate their patch rows."""
        n, c_out = x.shape[0], y.shape[1]
        pixels = y.shape[2] * y.shape[3]
        per_image = pixels * (self.d_in + c_out)
        images = max(1, CHUNK_ELEMENTS["cpu"] // max(1, per_image))
        dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
        with torch.no_grad():
            for first in range(0, n, images):
                xb = x[first : first + images].to(dtype)
                patches = F.unfold(xb, ks, dilation=dl, padding=pd, stride=st)
                rows = patches.transpose(1, 2).reshape(-1, self.d_in)
                targets = y[first : first + images].to(dtype).flatten(2).transpose(1, 2)
                self._add_rows(rows, targets.reshape(-1, c_out))

    def _flush(self) -> None:
        if self._pending_xx is not None and self._pending_rows:
            self._xx += self._pending_xx
            self._xy += self._pending_xy
            self._pending_xx.zero_()
            self._pending_xy.zero_()
        self._pending_rows = 0


def _conv_padding(padding: Any, ks: tuple[int, int], dl: tuple[int, int]) -> tuple[int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            total = [dl[i] * (ks[i] - 1) for i in range(2)]
            if any(t % 2 for t in total):
                raise ValueError(
                    "padding='same' with an even effective kernel size pads asymmetrically; "
                    "pad x yourself and use padding=0"
                )
            return (total[0] // 2, total[1] // 2)
        raise ValueError(f"padding must be 'valid', 'same', an int or a pair, got {padding!r}")
    return _pair(padding, "padding", minimum=0)


# ---- ridge solve ------------------------------------------------------------------------


def ridge_solve(
    gram: TensorLike,
    cross: TensorLike,
    *,
    ridge: float = 1e-4,
    blocks: Blocks = None,
) -> torch.Tensor:
    """Solve ``(G + lam I) B = C`` for many layers at once, optionally per output block over
    the inputs that block may use. Returns B in float64, shaped like `cross`.

    ``lam = ridge * trace(G) / d`` per layer (G the layer's whole Gram matrix). Each block
    is solved by a batched Cholesky factorization (``torch.linalg.cholesky_ex``) over all
    layers at once; a block whose matrix is not positive definite even with the ridge is
    solved by an eigendecomposition with a pseudo-inverse (eigenvalues at most
    ``d * eps * max``  count as 0; the minimum-norm solution), with a warning naming the
    layer and block.

    Args:
        gram: (L, d, d) or (d, d) symmetric Gram matrices ``X^T X``.
        cross: (L, d, k) or (d, k) cross matrices ``X^T Y``.
        ridge: relative ridge (>= 0); 0 solves the plain normal equations.
        blocks: None (every output uses every input); a boolean mask (k, d) or (L, k, d),
            ``mask[j, i]`` True when output j may use input i; or a list of
            ``(outputs, allowed)`` pairs, `outputs` a slice, index list/tensor or (k,) bool
            mask, `allowed` an index list/tensor or (d,) bool mask (outputs in no pair use
            every input). Entries of B for disallowed inputs are exactly 0.

    Raises:
        TypeError: non-floating gram or cross.
        ValueError: mismatched shapes, ridge < 0, or malformed blocks.

    Example:
        >>> x = torch.randn(100, 3, dtype=torch.float64)
        >>> y = x @ torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
        >>> b = fastmerge.ridge_solve(x.T @ x, x.T @ y, ridge=0.0)
        >>> b.squeeze(1).round(decimals=9).tolist()
        [1.0, 2.0, 3.0]
        >>> masked = fastmerge.ridge_solve(x.T @ x, x.T @ y, ridge=0.0, blocks=[(0, [0, 1])])
        >>> masked[2, 0].item()  # input 2 is not allowed
        0.0
    """
    g = _float64(gram, "gram")
    c = _float64(cross, "cross")
    if g.dim() not in (2, 3):
        raise ValueError(f"gram must be (d, d) or (L, d, d), got shape {tuple(g.shape)}")
    if c.dim() != g.dim():
        raise ValueError(
            f"cross must have gram's batch layout ({'(L, d, k)' if g.dim() == 3 else '(d, k)'}), "
            f"got shape {tuple(c.shape)}"
        )
    if g.shape[-1] != g.shape[-2]:
        raise ValueError(f"gram must be square, got shape {tuple(g.shape)}")
    if c.shape[:-1] != g.shape[:-1]:
        raise ValueError(
            f"cross must have shape {(*g.shape[:-1], 'k')}, got {tuple(c.shape)} for gram "
            f"{tuple(g.shape)}"
        )
    if c.device != g.device:
        raise ValueError(f"cross is on {c.device} but gram is on {g.device}")
    try:
        ridge = float(ridge)
    except (TypeError, ValueError):
        raise TypeError(f"ridge must be a number, got {type(ridge).__name__}") from None
    if not (ridge >= 0 and math.isfinite(ridge)):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    batched = g.dim() == 3
    if not batched:
        g, c = g.unsqueeze(0), c.unsqueeze(0)
    layers, d, k = g.shape[0], g.shape[-1], c.shape[-1]
    out = torch.zeros_like(c)
    if d == 0 or k == 0 or layers == 0:
        return out if batched else out[0]
    lam = ridge * g.diagonal(dim1=-2, dim2=-1).sum(-1) / d  # (L,)
    per_layer_mask = (
        isinstance(blocks, (torch.Tensor,)) or hasattr(blocks, "shape")
    ) and as_tensor(blocks, "blocks").dim() == 3
    if per_layer_mask:
        mask = as_tensor(blocks, "blocks")
        if tuple(mask.shape) != (layers, k, d):
            raise ValueError(
                f"blocks must have shape ({layers}, {k}, {d}), got {tuple(mask.shape)}"
            )
        for layer in range(layers):
            spec = _block_list(mask[layer], k, d, g.device)
            _solve_blocks(g[layer : layer + 1], c[layer : layer + 1], lam[layer : layer + 1],
                          spec, out[layer : layer + 1], first_layer=layer)  # fmt: skip
    else:
        spec = _block_list(blocks, k, d, g.device)
        _solve_blocks(g, c, lam, spec, out, first_layer=0)
    return out if batched else out[0]


def _float64(value: TensorLike, name: str) -> torch.Tensor:
    t = as_tensor(value, name)
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    return t.detach().to(torch.float64)


def _indices(value: Any, size: int, name: str, device: torch.device) -> torch.Tensor:
    """Sorted unique int64 indices in [0, size) from a slice, int, list, index or bool tensor."""
    if isinstance(value, slice):
        return torch.arange(size, device=device)[value]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    t = as_tensor(value, name) if not isinstance(value, (list, tuple)) else torch.tensor(value)
    t = t.to(device)
    if t.dtype == torch.bool:
        if tuple(t.shape) != (size,):
            raise ValueError(
                f"{name} as a boolean mask must have shape ({size},), got {tuple(t.shape)}"
            )
        return t.nonzero().flatten()
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    if t.dtype.is_floating_point or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D index list/tensor or a bool mask, got {value!r}")
    t = t.long()
    if int(t.min()) < 0 or int(t.max()) >= size:
        raise ValueError(f"{name} has indices outside [0, {size})")
    return torch.unique(t)


def _block_list(
    blocks: Blocks, k: int, d: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(outputs, allowed inputs) index pairs covering every output exactly once."""
    if blocks is None:
        return [(torch.arange(k, device=device), torch.arange(d, device=device))]
    if isinstance(blocks, torch.Tensor) or hasattr(blocks, "shape"):
        mask = as_tensor(blocks, "blocks").to(device)
        if mask.dtype != torch.bool:
            raise TypeError(f"blocks as a mask must be a bool tensor, got dtype {mask.dtype}")
        if tuple(mask.shape) != (k, d):
            raise ValueError(f"blocks must have shape ({k}, {d}), got {tuple(mask.shape)}")
        patterns, inverse = torch.unique(mask, dim=0, return_inverse=True)
        return [
            ((inverse == p).nonzero().flatten(), patterns[p].nonzero().flatten())
            for p in range(patterns.shape[0])
        ]
    if not isinstance(blocks, Sequence) or isinstance(blocks, str):
        raise TypeError(
            f"blocks must be None, a bool mask or a list of (outputs, allowed) pairs, got "
            f"{type(blocks).__name__}"
        )
    covered = torch.zeros(k, dtype=torch.bool, device=device)
    result = []
    for i, item in enumerate(blocks):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"blocks[{i}] must be an (outputs, allowed) pair, got {item!r}")
        outputs = _indices(item[0], k, f"blocks[{i}] outputs", device)
        allowed = _indices(item[1], d, f"blocks[{i}] allowed inputs", device)
        if covered[outputs].any():
            raise ValueError(f"blocks[{i}] lists outputs that an earlier block already has")
        covered[outputs] = True
        result.append((outputs, allowed))
    if not covered.all():
        result.append((torch.arange(k, device=device)[~covered], torch.arange(d, device=device)))
    return result


def _solve_blocks(g, c, lam, spec, out, first_layer: int) -> None:
    """out[:, allowed, outputs] = solution of each block, for all layers of g at once.

    When several blocks share leading inputs (PLeaS' partial layouts: outputs of the
    merged units use every input, only-A outputs the prefix [merged | only-A], only-B
    outputs [merged | only-B]), the whole ridge Gram matrix is factored once and every
    block reuses its leading part: the Cholesky factor of a leading principal block is
    the leading block of the whole factor, and the inputs after the prefix only need
    the factor of their Schur complement. That replaces one factorization per block.
    """
    prefixes = [_prefix_length(allowed) for _, allowed in spec]
    shared = len(spec) > 1 and max(prefixes) > 0
    factor = _shared_factor(g, lam) if shared else None
    for index, ((outputs, allowed), prefix) in enumerate(zip(spec, prefixes)):
        if outputs.numel() == 0 or allowed.numel() == 0:
            continue  # no allowed inputs: the block's weights are 0
        if factor is not None and prefix > 0:
            x = _solve_with_shared_factor(g, c, lam, factor, outputs, allowed, prefix)
            if x is not None:
                out[:, allowed[:, None], outputs[None, :]] = x
                continue
        _solve_block_alone(g, c, lam, outputs, allowed, out, first_layer, index)


def _prefix_length(allowed: torch.Tensor) -> int:
    """How many of the sorted indices `allowed` are 0, 1, 2, ... (a leading run)."""
    run = allowed == torch.arange(allowed.numel(), device=allowed.device)
    return int(run.numel() if bool(run.all()) else int(run.int().argmin()))


def _shared_factor(g: torch.Tensor, lam: torch.Tensor) -> Optional[torch.Tensor]:
    """Lower Cholesky factor of every layer's ``G + lam I``; None if one is not PD."""
    ridged = g.clone()
    ridged.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
    factor, info = torch.linalg.cholesky_ex(ridged)
    return factor if bool((info == 0).all()) else None


def _solve_with_shared_factor(g, c, lam, factor, outputs, allowed, prefix):
    """Solve the block [prefix | rest] from the shared factor's leading ``prefix`` block and
    a factor of the rest's Schur complement; None if that complement is not PD."""
    rhs = c[:, allowed][:, :, outputs]
    lead = factor[:, :prefix, :prefix]
    if prefix == allowed.numel():
        return torch.cholesky_solve(rhs, lead)
    rest = allowed[prefix:]
    coupling = factor[:, rest, :prefix]  # rows of the whole factor: G[rest, P] L_PP^-T
    schur = g[:, rest][:, :, rest] - coupling @ coupling.mT
    schur.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
    tail, info = torch.linalg.cholesky_ex(schur)
    if not bool((info == 0).all()):
        return None
    # Forward then backward substitution with [[lead, 0], [coupling, tail]].
    z_lead = torch.linalg.solve_triangular(lead, rhs[:, :prefix], upper=False)
    z_rest = torch.linalg.solve_triangular(tail, rhs[:, prefix:] - coupling @ z_lead, upper=False)
    x_rest = torch.linalg.solve_triangular(tail.mT, z_rest, upper=True)
    x_lead = torch.linalg.solve_triangular(lead.mT, z_lead - coupling.mT @ x_rest, upper=True)
    return torch.cat([x_lead, x_rest], dim=1)


def _solve_block_alone(g, c, lam, outputs, allowed, out, first_layer: int, index: int) -> None:
    """One block by its own Cholesky factorization (eigen fallback when not PD)."""
    m = allowed.numel()
    whole = m == g.shape[-1] and outputs.numel() == c.shape[-1]  # no gathers needed
    sub = g.clone() if whole else g[:, allowed][:, :, allowed]
    sub.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
    rhs = c if whole else c[:, allowed][:, :, outputs]
    factor, info = torch.linalg.cholesky_ex(sub)
    x = torch.cholesky_solve(rhs, factor)
    bad = (info != 0).nonzero().flatten().tolist()
    if bad:
        shown = outputs[:8].tolist()
        warnings.warn(
            f"ridge_solve: the Gram block of layer(s) {[first_layer + b for b in bad]}, "
            f"block {index} (outputs {shown}{'...' if outputs.numel() > 8 else ''}) is not "
            "positive definite even with the ridge; solving it with an eigendecomposition "
            "(pseudo-inverse) instead",
            RuntimeWarning,
            stacklevel=4,
        )
        for b in bad:
            evals, evecs = torch.linalg.eigh(sub[b])
            tol = max(float(evals.abs().max()), 0.0) * m * torch.finfo(g.dtype).eps
            inv = torch.where(evals > tol, 1.0 / evals, torch.zeros_like(evals))
            x[b] = evecs @ (inv[:, None] * (evecs.T @ rhs[b]))
    if whole:
        out.copy_(x)
    else:
        out[:, allowed[:, None], outputs[None, :]] = x
