"""``gta_combine``: generalized task arithmetic of one tensor in one pass.

The per-entry core of mergekit's generalized task arithmetic family (task arithmetic,
TIES, DARE, DARE-TIES, breadcrumbs): given per-expert magnitude bands, keep
probabilities, rescale factors and weights, one pass over base and experts writes
``base + lam * mixed``. τ is recomputed on the fly; nothing but the output is written.

Per entry e and expert t (C: float32, float64 when any input is float64):

1. τ_t = expert_t - base;
2. kept_t = ``lower[t] <= |τ_t| <= upper[t]`` and, with `keep_probability`,
   ``u_t(e) < keep_probability[t]`` (the random keep, below);
3. wd_t = weights[t] · (kept_t ? τ_t · scales[t] : 0);
4. total = Σ_t wd_t. With `consensus` the majority sign is +1 where total > 0 and -1
   where total < 0; where total == 0 it is +1 with ``zero_sum="positive"`` (mergekit's
   rule, ``(total >= 0) * 2 - 1``; a NaN total elects -1 there) and there is none with
   ``zero_sum="drop"`` (the paper's rule: nothing is kept; a NaN total neither). An expert
   counts where ``sign(wd_t)`` is the majority sign (zeros never count); mixed = Σ counted
   wd_t, divisor = Σ counted weights[t], 1 where it is 0. Without consensus mixed = total
   and divisor = Σ_t weights[t] (one number), 1 where ``|divisor| < 1e-8``;
5. result = base + lam · (normalize ? mixed / divisor : mixed), in the output dtype.

Random keep: u_t(e) = (h >> 11) · 2**-53 with the counter-based hash
``h = mix64(key_t + (e + 1) · G mod 2**64)``, ``key_t = mix64(seed64 + (t + 1) · G mod
2**64)``, G = 0x9E3779B97F4A7C15, seed64 the low 64 bits of `seed` (two's complement
for a negative one) and mix64 splitmix64's finalizer (``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31``, logical shifts, products mod
2**64): u_t(e) is the e-th output of a splitmix64 generator seeded with key_t. e is the
flat index in the whole tensor, ``offset`` plus the index in `base`, so a block of rows
merged on its own (offset = its first row times the row length) gets the whole tensor's
mask. The mask is the same for every dtype, backend, thread count and block size; p >= 1
keeps every entry, p <= 0 none (kernels compare ``h >> 11 < ceil(p · 2**53)``).

Arithmetic (identical on every backend, and bit for bit the reference's): every step in
C, each operation rounded on its own (no fused multiply-add): ``τ · scales[t]``, then
``weights[t] · that``; the sums run over t = 0..T-1 in order, starting from +0 (an
expert that is not kept or does not count adds nothing); the division is correctly
rounded; ``lam · mixed`` is rounded before the addition to base; the result is rounded
to the output dtype. weights, lower, upper, scales and lam are rounded to C first.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

from .. import backends
from .._dtypes import KERNEL_DTYPE_CODES
from .._tensors import TensorLike, as_tensor
from ..reference import gta_combine as reference
from ..reference.magnitude_threshold import compute_dtype
from ._library import define, resolve, tracing
from .magnitude_threshold import prepare_inputs

#: Bits of the uniform of the random keep; kernels keep entries with ``h >> 11 < below``.
KEEP_ALL = 1 << reference.UNIFORM_BITS
ZERO_SUM_RULES = ("positive", "drop")

PerExpert = Union[TensorLike, Sequence[float], None]


def gta_combine(
    base: TensorLike,
    experts: Sequence[TensorLike],
    weights: Union[TensorLike, Sequence[float]],
    *,
    lower: PerExpert = None,
    upper: PerExpert = None,
    scales: PerExpert = None,
    keep_probability: PerExpert = None,
    seed: int = 0,
    offset: int = 0,
    consensus: bool = False,
    zero_sum: str = "positive",
    normalize: bool = False,
    lam: float = 1.0,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Generalized task arithmetic of one tensor: bands, random keep, rescale, weights,
    optional sign election and normalization, ``base + lam * mixed``.

    Per entry (module docstring for the exact arithmetic), with τ_t = experts[t] - base
    and wd_t = weights[t] · [lower[t] <= |τ_t| <= upper[t] and u_t < keep_probability[t]]
    · scales[t] · τ_t::

        mixed  = Σ_t wd_t                 or, with consensus, Σ of the wd_t whose sign
                                          is the sign of Σ_t wd_t
        result = base + lam · mixed / divisor   (divisor: Σ of the weights taken; 1
                                                 without normalize)

    Args:
        base: tensor of any shape, float16, bfloat16, float32 or float64.
        experts: T >= 1 tensors of base's shape on base's device (any supported dtype).
        weights: (T,) finite weights.
        lower: (T,) lower bounds of ``|τ_t|`` (default 0: no bound), e.g. TIES's trim
            threshold from :func:`magnitude_threshold`.
        upper: (T,) upper bounds of ``|τ_t|`` (default +inf), e.g. breadcrumbs' band.
        scales: (T,) finite factors of the kept τ_t (default 1), e.g. DARE's ``1/p``.
        keep_probability: (T,) probabilities of the random keep (default: none); p >= 1
            keeps all, p <= 0 none.
        seed: seed of the random keep, any Python int (its low 64 bits are used).
        offset: flat index of base's first entry in the whole tensor, for the random
            keep of a block of rows (row r of an (R, C) tensor: ``r * C``).
        consensus: elect a sign per entry and keep only the deltas of that sign.
        zero_sum: where the weighted sum is exactly 0 with consensus: ``"positive"``
            (mergekit: the positive deltas count) or ``"drop"`` (the paper: none).
        normalize: divide by the sum of the weights taken (all, or the counted ones).
        lam: finite factor λ of the merged delta.
        out: optional contiguous tensor of base's shape (any supported dtype) to write
            into; by default a new tensor of base's dtype.
        backend: as for :func:`magnitude_threshold`.

    Returns:
        `out`, the merged tensor.

    Example:
        >>> import torch, fastmerge
        >>> base = torch.zeros(4)
        >>> experts = [torch.tensor([2.0, -1.0, 0.5, 1.0]), torch.tensor([4.0, 3.0, 0.25, -1.0])]
        >>> fastmerge.ops.gta_combine(base, experts, [1.0, 0.5]).tolist()
        [4.0, 0.5, 0.625, 0.5]
        >>> fastmerge.ops.gta_combine(base, experts, [1.0, 1.0], lower=[0.4, 0.4],
        ...                           consensus=True, normalize=True).tolist()
        [3.0, 3.0, 0.5, 1.0]
        >>> fastmerge.ops.gta_combine(base, experts, [1.0, 1.0], consensus=True,
        ...                           zero_sum="drop").tolist()
        [6.0, 3.0, 0.75, 0.0]
    """
    b0 = as_tensor(base, "base")
    b, es = prepare_inputs(b0, experts)
    dtype = compute_dtype(b, es)
    num = len(es)
    n = b.numel()
    w = _per_expert(weights, "weights", num, None, finite=True)
    lo = _per_expert(lower, "lower", num, 0.0)
    hi = _per_expert(upper, "upper", num, math.inf)
    sc = _per_expert(scales, "scales", num, 1.0, finite=True)
    keep = None
    if keep_probability is not None:
        keep_t = _per_expert(keep_probability, "keep_probability", num, None)
        keep = (
            [float(v) for v in keep_probability]
            if isinstance(keep_probability, (list, tuple))
            else keep_t.tolist()
        )
    seed = _integer(seed, "seed")
    offset = _integer(offset, "offset")
    if offset < 0 or offset + n > (1 << 63) - 1:
        raise ValueError(f"offset must be in [0, 2**63 - 1 - base.numel()], got {offset}")
    if zero_sum not in ZERO_SUM_RULES:
        raise ValueError(f"zero_sum must be 'positive' or 'drop', got {zero_sum!r}")
    lam = _finite(lam, "lam")
    if out is None:
        out = torch.empty(b0.shape, dtype=b0.dtype, device=b.device)
    elif (
        not isinstance(out, torch.Tensor)
        or out.dtype not in KERNEL_DTYPE_CODES
        or out.shape != b0.shape
        or out.device != b.device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous floating tensor of shape {tuple(b0.shape)} on {b.device}"
        )
    params = torch.stack([w, lo, hi, sc]).to(dtype).to(b.device).contiguous()
    random = None
    if keep is not None:
        keys = [reference.as_int64(k) for k in reference.expert_keys(seed, num)]
        table = [keys, [_keep_below(p) for p in keep]]
        random = torch.tensor(table, dtype=torch.int64).to(b.device).contiguous()
    seed64 = reference.as_int64(seed & reference.MASK64)  # what the keys use of the seed
    _OP(b, es, params, random, keep, seed64, offset, bool(consensus), zero_sum,
        bool(normalize), lam, out, backend)  # fmt: skip
    return out


def _kernel(b, es, params, random, keep, seed, offset, consensus, zero_sum, normalize, lam,
            out, backend) -> None:  # fmt: skip
    """Write the merge of flat contiguous inputs into `out` (contiguous, base's shape)."""
    name = resolve(backend, b.device)  # an unusable backend raises, even for no entries
    if b.numel() == 0:
        return
    call = _Call(b, es, params, keep, random, seed, offset, consensus, zero_sum, normalize,
                 lam, out.view(-1))  # fmt: skip
    with torch.no_grad():
        _IMPLEMENTATIONS[name](call)


def _fake(b, es, params, random, keep, seed, offset, consensus, zero_sum, normalize, lam,
          out, backend) -> None:  # fmt: skip
    return None  # writes `out` only


class _Call:
    """The validated arguments of one call, as every backend takes them."""

    def __init__(self, b, es, params, keep, random, seed, offset, consensus, zero_sum,
                 normalize, lam, out):  # fmt: skip
        self.b, self.es, self.params, self.keep, self.random = b, es, params, keep, random
        self.seed, self.offset, self.consensus, self.zero_sum = seed, offset, consensus, zero_sum
        self.normalize, self.lam, self.out = normalize, lam, out


def _per_expert(
    value: PerExpert, name: str, count: int, default: Optional[float], *, finite: bool = False
) -> torch.Tensor:
    """(count,) float64 CPU tensor of a per-expert argument, validated; `default` where
    the value is None (None: the argument is required)."""
    if value is None:
        if default is None:
            raise ValueError(f"{name} is required: one value per expert ({count})")
        return torch.full((count,), float(default), dtype=torch.float64)
    if isinstance(value, (torch.Tensor, np.ndarray)) or hasattr(value, "__dlpack__"):
        t = as_tensor(value, name).detach()
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
        t = t.to(device="cpu", dtype=torch.float64)
    elif isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a sequence of {count} numbers (one per expert)")
    else:
        try:
            floats = [float(v) for v in value]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a sequence of {count} numbers: {exc}") from None
        # Checked as Python numbers: no tensor reads, so torch.compile traces it whole.
        if len(floats) == count:
            _check_values(floats, name, finite)
            return torch.tensor(floats, dtype=torch.float64)
        t = torch.tensor(floats, dtype=torch.float64)
    if t.shape != (count,):
        raise ValueError(
            f"{name} must have shape ({count},), one value per expert, got {tuple(t.shape)}"
        )
    if tracing(t):  # a traced graph cannot branch on the values: assert them instead
        ok = torch.isfinite(t).all() if finite else ~torch.isnan(t).any()
        torch._assert_async(ok, f"gta_combine: {name} must be {'finite' if finite else 'not NaN'}")
        return t
    _check_values(t.tolist(), name, finite)
    return t


def _check_values(values: list[float], name: str, finite: bool) -> None:
    if finite and not all(map(math.isfinite, values)):
        raise ValueError(f"{name} must be finite, got {values}")
    if any(map(math.isnan, values)):
        raise ValueError(f"{name} must not be NaN, got {values}")


def _integer(value: int, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def _finite(value: float, name: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def _keep_below(p: float) -> int:
    """The integer bound of the kernels' random test: ``u < p <=> h >> 11 < below``."""
    if p >= 1.0:
        return KEEP_ALL
    if p <= 0.0:
        return 0
    return math.ceil(p * KEEP_ALL)  # p * 2**53 is exact


def _run_reference(c: _Call) -> None:
    weights, lower, upper, scales = c.params
    reference.gta_combine(
        c.b, c.es, weights, lower, upper, scales, c.keep, c.seed, c.offset, c.consensus,
        c.zero_sum, c.normalize, c.lam, c.out,
    )  # fmt: skip


def _run_cpu(c: _Call) -> None:
    backends.cpu_extension().gta_combine(
        c.b.data_ptr(),
        [e.data_ptr() for e in c.es],
        c.b.numel(),
        KERNEL_DTYPE_CODES[c.b.dtype],
        c.params.data_ptr(),
        0 if c.random is None else c.random.data_ptr(),
        c.offset,
        c.consensus,
        c.zero_sum == "drop",
        c.normalize,
        c.lam,
        c.out.data_ptr(),
        KERNEL_DTYPE_CODES[c.out.dtype],
    )


def _run_cuda(c: _Call) -> None:
    device = c.b.device
    pointers = torch.tensor([e.data_ptr() for e in c.es], dtype=torch.int64).to(device)
    with torch.cuda.device(device):
        backends.cuda_extension().gta_combine(
            c.b.data_ptr(),
            pointers.data_ptr(),
            len(c.es),
            c.b.numel(),
            KERNEL_DTYPE_CODES[c.b.dtype],
            c.params.data_ptr(),
            0 if c.random is None else c.random.data_ptr(),
            c.offset,
            c.consensus,
            c.zero_sum == "drop",
            c.normalize,
            c.lam,
            c.out.data_ptr(),
            KERNEL_DTYPE_CODES[c.out.dtype],
            torch.cuda.current_stream(device).cuda_stream,
        )


def _run_triton(c: _Call) -> None:
    backends.triton_kernels().gta_combine.gta_combine(
        c.b, c.es, c.params, c.random, c.offset, c.consensus, c.zero_sum == "drop",
        c.normalize, c.lam, c.out,
    )  # fmt: skip


_IMPLEMENTATIONS = {
    "reference": _run_reference,
    "cpu": _run_cpu,
    "cuda": _run_cuda,
    "triton": _run_triton,
}

_OP = define(
    "gta_combine",
    "(Tensor base, Tensor[] experts, Tensor params, Tensor? random, float[]? keep, int seed, "
    "int offset, bool consensus, str zero_sum, bool normalize, float lam, Tensor(a!) out, "
    "str? backend) -> ()",
    _kernel,
    _fake,
)
