"""Triton kernel for the fused Gram/cross matrices of a convolution's im2col patches.

Implicit im2col (``csrc/include/fastmerge/conv_gram.h``): column t of B = [patches | y]
for sample m (one output pixel) is gathered straight from x and y, never materialized.
One program per (BLOCK x BLOCK) tile of the upper triangle of Z = B^T B and per slice of
the samples; a tile wholly below the diagonal does no work (the op mirrors the upper
triangle). Float32 input: ``tl.dot`` in IEEE float32 over FLUSH steps of BLOCK_M samples,
then added to a float64 accumulator; float64 input: float64 dot. Slices are summed with
float64 atomic adds into a zeroed output.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._aot import aot_entry
from ._launch import launch

BLOCK = 32
BLOCK_M = 32
#: float32 steps summed before each move into the float64 accumulator (1,024 samples).
FLUSH = 32
#: Samples per program along the sample axis, at least (one flush group).
MIN_SLICE = BLOCK_M * FLUSH


class _Shape(NamedTuple):
    """The sizes of one convolution, in the order the kernels take them (after the
    samples): input channels and height and width, output channels and height and width,
    then the kernel's height and width, strides, paddings and dilations."""

    c_in: int
    h: int
    w: int
    c_out: int
    h_out: int
    w_out: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int


@triton.jit
def _columns(
    x_ptr,
    y_ptr,
    m,
    t,
    m_mask,
    t_mask,
    shape,
    HAS_BIAS: tl.constexpr,
):
    """(len(m), len(t)) values of columns t of samples m (0 where masked); `shape` is the
    tuple of the sizes that :class:`_Shape` names."""
    c_in, h, w, c_out, h_out, w_out, kh, kw, sh, sw, ph, pw, dh, dw = shape
    pixels = h_out * w_out
    n = m // pixels
    p = m - n * pixels
    oh = p // w_out
    ow = p - oh * w_out
    k = c_in * kh * kw
    features = k + HAS_BIAS
    c = t // (kh * kw)
    r = t - c * (kh * kw)
    i = r // kw
    j = r - i * kw
    ih = oh[:, None] * sh - ph + i[None, :] * dh
    iw = ow[:, None] * sw - pw + j[None, :] * dw
    base = m_mask[:, None] & t_mask[None, :]
    is_patch = t[None, :] < k
    inside = (ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)
    x_off = ((n[:, None].to(tl.int64) * c_in + c[None, :]) * h + ih) * w + iw
    xv = tl.load(x_ptr + x_off, mask=base & is_patch & inside, other=0.0)
    is_y = t[None, :] >= features
    y_off = (n[:, None].to(tl.int64) * c_out + (t[None, :] - features)) * pixels + p[:, None]
    yv = tl.load(y_ptr + y_off, mask=base & is_y, other=0.0)
    out = tl.where(is_patch, xv, yv)
    if HAS_BIAS:
        out = tl.where(base & (t[None, :] == k), 1.0, out)
    return out


@triton.jit
def conv_gram_kernel(
    x_ptr,  # (n, c_in, h, w) contiguous, float32 or float64
    y_ptr,  # (n, c_out, h_out, w_out) contiguous, same dtype
    out_ptr,  # float64 (features, columns), zeroed
    samples,
    samples_per_slice,  # a multiple of BLOCK_M * FLUSH
    c_in,
    h,
    w,
    c_out,
    h_out,
    w_out,
    kh,
    kw,
    sh,
    sw,
    ph,
    pw,
    dh,
    dw,
    HAS_BIAS: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FLUSH: tl.constexpr,
):
    shape = (c_in, h, w, c_out, h_out, w_out, kh, kw, sh, sw, ph, pw, dh, dw)
    rows = c_in * kh * kw + HAS_BIAS
    cols = rows + c_out
    r = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r_mask = r < rows
    t_mask = t < cols
    m_begin = tl.program_id(2).to(tl.int64) * samples_per_slice
    m_end = tl.minimum(m_begin + samples_per_slice, samples)
    # A tile wholly below the diagonal does no work.
    m_end = tl.where(tl.program_id(0) * BLOCK + BLOCK <= tl.program_id(1) * BLOCK, m_begin, m_end)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float64)
    for g0 in range(m_begin, m_end, BLOCK_M * FLUSH):
        if F64:
            part = tl.zeros((BLOCK, BLOCK), dtype=tl.float64)
        else:
            part = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for s in range(0, FLUSH):
            m = g0 + s * BLOCK_M + tl.arange(0, BLOCK_M)
            m_mask = m < m_end
            a = _columns(x_ptr, y_ptr, m, r, m_mask, r_mask, shape, HAS_BIAS)
            b = _columns(x_ptr, y_ptr, m, t, m_mask, t_mask, shape, HAS_BIAS)
            if F64:
                part += tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[:, None, :], 0)
            else:
                part = tl.dot(
                    tl.trans(a.to(tl.float32)), b.to(tl.float32), part, input_precision="ieee"
                )
        acc += part.to(tl.float64)
    offsets = r[:, None].to(tl.int64) * cols + t[None, :]
    tl.atomic_add(out_ptr + offsets, acc, mask=r_mask[:, None] & t_mask[None, :])


def conv_gram(x: torch.Tensor, y: torch.Tensor, geometry: list[int]) -> torch.Tensor:
    """Float64 (features, columns) upper triangle of B^T B (see the module docs) from
    contiguous x, y of one dtype (float32 or float64) on one device."""
    n, *sizes, bias = geometry
    shape = _Shape(*sizes)
    rows = shape.c_in * shape.kh * shape.kw + bias
    cols = rows + shape.c_out
    out = torch.zeros((rows, cols), dtype=torch.float64, device=x.device)
    samples = n * shape.h_out * shape.w_out
    if rows == 0 or samples == 0:
        return out
    tiles = triton.cdiv(rows, BLOCK) * triton.cdiv(cols, BLOCK)
    slices = max(1, min(triton.cdiv(4 * 132, tiles), triton.cdiv(samples, MIN_SLICE)))
    per_slice = triton.cdiv(triton.cdiv(samples, slices), MIN_SLICE) * MIN_SLICE
    slices = triton.cdiv(samples, per_slice)
    grid = (triton.cdiv(cols, BLOCK), triton.cdiv(rows, BLOCK), slices)
    launch(
        conv_gram_kernel, grid, x.device,
        x, y, out, samples, per_slice, *shape,
        axes=("column tiles", "row tiles (features / 32)", "sample slices"),
        HAS_BIAS=int(bias), F64=x.dtype == torch.float64, BLOCK=BLOCK, BLOCK_M=BLOCK_M,
        FLUSH=FLUSH,
    )  # fmt: skip
    return out


AOT_SIGNATURES = {
    f"conv_gram_kernel[{dtype},bias={bias}]": aot_entry(
        conv_gram_kernel,
        {
            "x_ptr": f"*{dtype}",
            "y_ptr": f"*{dtype}",
            "out_ptr": "*fp64",
            **dict.fromkeys(("samples", "samples_per_slice", *_Shape._fields), "i32"),
        },
        {
            "HAS_BIAS": bias,
            "F64": dtype == "fp64",
            "BLOCK": BLOCK,
            "BLOCK_M": BLOCK_M,
            "FLUSH": FLUSH,
        },
    )
    for dtype in ("fp32", "fp64")
    for bias in (0, 1)
}
