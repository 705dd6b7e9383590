"""Reference generalized task arithmetic combine: bands, hashed random keep, rescale,
weights, optional sign election, optional normalization (see fastmerge.ops.gta_combine).

Also the counter-based hash of the random keep: pure Python integers for the per-expert
keys, torch int64 operations (wrapping multiplies, logical shifts emulated with an
arithmetic shift and a mask) for the per-entry hash.
"""

from __future__ import annotations

from typing import Optional

import torch

from .magnitude_threshold import compute_dtype

MASK64 = (1 << 64) - 1
#: splitmix64's increment (the golden ratio in 64-bit fixed point) and finalizer constants.
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
#: Bits of the uniform u = (h >> 11) * 2**-53.
UNIFORM_BITS = 53


def mix64(z: int) -> int:
    """splitmix64's finalizer of a 64-bit integer (Python int in [0, 2**64))."""
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def expert_keys(seed: int, num_experts: int) -> list[int]:
    """Per-expert keys ``key_t = mix64(seed64 + (t + 1) * GOLDEN mod 2**64)``, seed64 the
    low 64 bits of `seed` (two's complement for a negative one), as Python ints in
    [0, 2**64)."""
    s = int(seed) & MASK64
    return [mix64((s + (t + 1) * GOLDEN) & MASK64) for t in range(num_experts)]


def as_int64(value: int) -> int:
    """A 64-bit pattern in [0, 2**64) as the signed int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _signed(c: int) -> int:
    return as_int64(c & MASK64)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of the 64-bit patterns in an int64 tensor."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def hash_bits(key: int, index: torch.Tensor) -> torch.Tensor:
    """``mix64(key + (index + 1) * GOLDEN)`` for an int64 tensor of flat entry indices,
    as int64 bit patterns (torch's int64 arithmetic wraps modulo 2**64)."""
    z = (index + 1) * _signed(GOLDEN) + as_int64(key)
    z = (z ^ _shr(z, 30)) * _signed(MIX1)
    z = (z ^ _shr(z, 27)) * _signed(MIX2)
    return z ^ _shr(z, 31)


def uniforms(key: int, offset: int, n: int, device=None) -> torch.Tensor:
    """float64 u(e) = (hash >> 11) * 2**-53 in [0, 1) for entries e = offset..offset+n-1."""
    index = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    return _shr(hash_bits(key, index), 64 - UNIFORM_BITS).to(torch.float64) * 2.0**-UNIFORM_BITS


def random_keep(
    seed: int, t: int, probability: float, offset: int, n: int, device=None
) -> torch.Tensor:
    """Bool mask of expert t's entries offset..offset+n-1: ``u_t(e) < probability``."""
    key = expert_keys(seed, t + 1)[t]
    return uniforms(key, offset, n, device) < float(probability)


def gta_combine(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    weights: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    scales: torch.Tensor,
    keep_probability: Optional[list[float]],
    seed: int,
    offset: int,
    consensus: bool,
    zero_sum: str,
    normalize: bool,
    lam: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write the generalized task arithmetic merge of flat base and experts into `out`.

    weights, lower, upper, scales: (T,) in the compute dtype (float32, float64 when any
    input is float64); keep_probability: T floats or None; offset: the flat index of
    base[0] in the whole tensor (for the random keep). Each step is one torch operation
    in the compute dtype, sums over t in order from 0 (see fastmerge.ops.gta_combine)."""
    dtype = compute_dtype(base, experts)
    b = base.to(dtype)
    zero = torch.zeros_like(b)
    weighted = []
    for t, e in enumerate(experts):
        tau = e.to(dtype) - b
        kept = (tau.abs() >= lower[t]) & (tau.abs() <= upper[t])
        if keep_probability is not None:
            kept &= random_keep(seed, t, keep_probability[t], offset, b.numel(), b.device)
        delta = torch.where(kept, tau * scales[t], zero)
        weighted.append(weights[t] * delta)
    total = zero
    for wd in weighted:
        total = total + wd
    if consensus:
        if zero_sum == "positive":  # mergekit: majority +1 where total >= 0
            up, down = total >= 0, ~(total >= 0)
        else:  # the paper: sign(total); nothing counts where it is 0
            up, down = total > 0, total < 0
        mixed, divisor = zero, zero
        for t, wd in enumerate(weighted):
            counted = (up & (wd > 0)) | (down & (wd < 0))
            mixed = mixed + torch.where(counted, wd, zero)
            divisor = divisor + torch.where(counted, weights[t], zero)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = total
        divisor = torch.zeros((), dtype=dtype, device=b.device)
        for w in weights:
            divisor = divisor + w
        if divisor.abs() < torch.tensor(1e-8, dtype=dtype):
            divisor = torch.ones_like(divisor)
    if normalize:
        mixed = mixed / divisor
    lam_t = torch.tensor(lam, dtype=dtype, device=b.device)
    out.copy_((b + lam_t * mixed).to(out.dtype))
    return out
