"""Reference Gram and cross matrices of a convolution's patches: ``F.unfold`` and a float64
matrix product.

With P the (N * H' * W', C_in * kh * kw) im2col patches of x in ``F.unfold``'s feature order
(channel, kernel row, kernel column), a constant-1 column appended when `bias`, and Y the
(N * H' * W', C_out) output pixels of y: ``gram = P^T P`` and ``cross = P^T Y``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_gram(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    bias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gram, cross), float64, from the explicitly unfolded patches."""
    f64 = torch.float64
    patches = F.unfold(
        x.to(f64), kernel_size, dilation=dilation, padding=padding, stride=stride
    )  # (N, K, L)
    k = patches.shape[1]
    p = patches.transpose(1, 2).reshape(-1, k)
    if bias:
        p = torch.cat([p, torch.ones(p.shape[0], 1, dtype=f64, device=p.device)], dim=1)
    out = y.to(f64).flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    return p.T @ p, p.T @ out
