"""``magprune``: DELLA's MAGPRUNE, the rank-based random drop of one expert's delta.

Per row of τ = expert - base, the entry of ascending magnitude rank r (0-based, among the
row's C entries) is kept with probability ``p_r = density - ε + 2ε r / (C - 1)`` (C = 1:
``density - ε``), so that larger deltas survive more often; one pass writes the kept τ (0
elsewhere) and returns the L1 norms ``[Σ|τ|, Σ kept |τ|]`` that the rescale needs.

Rows are mergekit's: a 1-D tensor (or a scalar) is one row; a 2-D tensor's rows are its
dim-0 slices; for a tensor of more dimensions the entries ranked together are those along
dim 1 with every other index fixed (mergekit ranks with ``argsort(dim=1)`` of the tensor
itself). Ties in ``|τ|`` are ranked by their position in the row (a stable sort; mergekit's
argsort order is unspecified there, so the two agree in distribution); a NaN ranks above
+inf; -0 and +0 are equal.

Random keep (the same bits on every backend and thread count): entry e (``offset`` plus its
flat index in `base`) is kept iff ``(h >> 11) < below + r · step`` with
``h = mix64(key + (e + 1) · G mod 2**64)`` and ``key`` expert `expert_index`'s key of
`seed`, exactly as :func:`fastmerge.ops.gta_combine`'s random keep draws it (its module
docstring has the hash). ``below = ceil((density - ε) · 2**53)`` and
``step = round(2ε · 2**53 / (C - 1))`` (0 for C = 1) are integers, so every backend
compares integers: p_r is the formula above within ``C · 2**-54``.

Arithmetic: τ in float32 (float64 when an input is float64), the inputs converted exactly;
the kept τ is rounded to the output dtype; the norms are float64 sums of the compute-dtype
``|τ|`` (on the CPU: per row in order, then the rows in order, so they do not depend on the
thread count; other backends agree to float64 rounding).

Backends: ``reference``, ``cpu`` (per row an LSD radix sort of the float bits of ``|τ|``,
fused with the hash, the mask and the sums; parallel over rows), ``triton`` (one program
per row, ``tl.sort`` of the packed (key, position) pairs; rows wider than 16,384 entries
take the reference). CUDA tensors use the triton backend, or the reference where Triton is
missing; there is no ``cuda`` backend.
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch

from .. import backends
from .._dtypes import KERNEL_DTYPE_CODES, dtype_names
from .._tensors import TensorLike, as_tensor
from ..reference import magprune as reference
from ..reference.gta_combine import as_int64, expert_keys
from ..reference.magnitude_threshold import compute_dtype
from ._library import define, resolve, tracing
from ._outputs import check_out, new_output, overlaps

#: The backends this op has (no CUDA kernel: CUDA tensors take triton, then reference).
IMPLEMENTED = ("reference", "cpu", "triton")
#: Bits of the uniform of the random keep (as in gta_combine).
UNIFORM_BITS = 53


def magprune(
    base: TensorLike,
    expert: TensorLike,
    density: float,
    epsilon: float,
    *,
    seed: int = 0,
    expert_index: int = 0,
    offset: int = 0,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DELLA's MAGPRUNE of ``τ = expert - base``: per row, keep the entry of ascending
    magnitude rank r of C with probability ``density - ε + 2ε r / (C - 1)``, in one pass.

    Args:
        base: tensor of any shape, float16, bfloat16, float32 or float64.
        expert: base's shape and device, any of those dtypes.
        density: the mean keep probability.
        epsilon: the spread ε >= 0 of the keep probabilities;
            ``0 <= density - ε`` and ``density + ε <= 1``.
        seed: seed of the random keep, any Python int (its low 64 bits are used).
        expert_index: which expert's stream of `seed` is drawn (``key_t`` of
            :func:`gta_combine` with t = expert_index), so that the experts of one tensor
            get independent masks from one seed.
        offset: flat index of base's first entry in the whole tensor, for a block of
            whole rows merged on its own (it then gets the whole tensor's mask).
        out: optional contiguous tensor of base's shape on its device (any supported
            dtype) for the kept τ; it may be `base` or `expert` itself (same dtype, same
            memory), but must not overlap an input otherwise. Default: a new tensor of
            the compute dtype (float32, float64 when an input is float64).
        backend: ``"reference"``, ``"cpu"`` or ``"triton"``; default: the fastest usable
            one (see :mod:`fastmerge.backends`).

    Returns:
        ``(kept, norms)``: `out` holding the kept τ (0 where dropped), and a float64 (2,)
        tensor on base's device, ``[Σ|τ|, Σ kept |τ|]`` (the L1 rescale is their ratio).

    Raises:
        TypeError: an input or `out` of an unsupported type or dtype, or a non-integer
            seed, expert_index or offset.
        ValueError: shapes or devices that differ, density or epsilon out of range, or a
            bad `out` (the message names the argument).

    Example:
        >>> import torch, fastmerge
        >>> base = torch.zeros(2, 4)
        >>> expert = torch.tensor([[4.0, -1.0, 3.0, 2.0], [0.5, 0.25, -2.0, 1.0]])
        >>> kept, norms = fastmerge.ops.magprune(base, expert, 0.5, 0.0, seed=1)
        >>> kept.shape, kept.dtype, norms.tolist()[0]
        (torch.Size([2, 4]), torch.float32, 13.75)
        >>> kept, norms = fastmerge.ops.magprune(base, expert, 1.0, 0.0)  # p = 1: all kept
        >>> torch.equal(kept, expert), norms.tolist()
        (True, [13.75, 13.75])
    """
    b = _check_input(base, "base")
    e = _check_input(expert, "expert")
    if e.shape != b.shape:
        raise ValueError(f"expert has shape {tuple(e.shape)} but base has {tuple(b.shape)}")
    if e.device != b.device:
        raise ValueError(f"expert is on {e.device} but base is on {b.device}")
    density, epsilon = _probabilities(density, epsilon)
    seed = _integer(seed, "seed")
    expert_index = _integer(expert_index, "expert_index")
    if expert_index < 0:
        raise ValueError(f"expert_index must be >= 0, got {expert_index}")
    offset = _integer(offset, "offset")
    n = b.numel()
    if offset < 0 or offset + n > (1 << 63) - 1:
        raise ValueError(f"offset must be in [0, 2**63 - 1 - base.numel()], got {offset}")
    b, e = b.detach(), e.detach()
    shape, device = b.shape, b.device
    if out is None:
        out = new_output(shape, compute_dtype(b, [e]), device)
    else:
        check_out(out, None, shape, device, "base and expert")
    x, y = (v if v.is_contiguous() else v.contiguous() for v in (b, e))
    if out.numel() and not tracing(x, y, out):
        for label, tensor in (("base", x), ("expert", y)):
            if overlaps(tensor, out):
                raise ValueError(f"out overlaps {label}; it may only be {label} itself")
    width, inner = row_layout(shape)
    key = as_int64(expert_keys(seed, expert_index + 1)[expert_index])
    below, step = keep_bounds(density, epsilon, width)
    norms = _OP(x, y, key, below, step, offset, width, inner, out, backend)
    return out, norms


def row_layout(shape: torch.Size) -> tuple[int, int]:
    """``(width, inner)`` of the rows of a tensor of `shape`: its entries ranked together
    are `width` entries at stride `inner` (1-D and scalars: one row; 2-D: the rows; more
    dimensions: along dim 1).

    Example:
        >>> [row_layout(torch.Size(s)) for s in ([5], [3, 4], [2, 3, 4, 5])]
        [(5, 1), (4, 1), (3, 20)]
    """
    if len(shape) < 2:
        return max(1, math.prod(shape)), 1
    return int(shape[1]), math.prod(shape[2:])


def keep_bounds(density: float, epsilon: float, width: int) -> tuple[int, int]:
    """The integer keep test's ``(below, step)``: rank r is kept iff
    ``(h >> 11) < below + r * step``.

    Example:
        >>> keep_bounds(0.5, 0.25, 3) == (2**51, 2**51)
        True
    """
    scale = float(1 << UNIFORM_BITS)
    below = math.ceil((density - epsilon) * scale)  # exact: a power-of-two scale
    step = round(2.0 * epsilon * scale / (width - 1)) if width > 1 else 0
    return below, step


def _kernel(b, e, key, below, step, offset, width, inner, out, backend) -> torch.Tensor:
    """Write the kept τ into `out` and return the norms; b, e and out contiguous."""
    name = resolve(backend, b.device, IMPLEMENTED)  # an unusable one raises, even for no entries
    if out.numel() == 0:
        return torch.zeros(2, dtype=torch.float64, device=b.device)
    with torch.no_grad():
        return _IMPLEMENTATIONS[name](b, e, key, below, step, offset, width, inner, out)


def _fake(b, e, key, below, step, offset, width, inner, out, backend) -> torch.Tensor:
    return torch.empty(2, dtype=torch.float64, device=b.device)


def _check_input(value: TensorLike, name: str) -> torch.Tensor:
    tensor = value if type(value) is torch.Tensor else as_tensor(value, name)
    if tensor.dtype not in KERNEL_DTYPE_CODES:
        raise TypeError(f"{name} has dtype {tensor.dtype}; supported dtypes are {dtype_names()}")
    return tensor


def _probabilities(density: float, epsilon: float) -> tuple[float, float]:
    values = []
    for name, value in (("density", density), ("epsilon", epsilon)):
        if isinstance(value, (bool, str, bytes)):
            raise TypeError(f"{name} must be a number, got {value!r}")
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(x):
            raise ValueError(f"{name} must be finite, got {x}")
        values.append(x)
    d, eps = values
    if eps < 0.0:
        raise ValueError(f"epsilon must be >= 0, got {eps:g}")
    if d - eps < 0.0 or d + eps > 1.0:
        raise ValueError(
            f"density {d:g} and epsilon {eps:g} make a keep probability leave [0, 1] "
            "(density - epsilon must be >= 0 and density + epsilon <= 1)"
        )
    return d, eps


def _integer(value: int, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def _run_reference(b, e, key, below, step, offset, width, inner, out) -> torch.Tensor:
    return reference.magprune(b, e, key, below, step, offset, width, inner, out)


def _run_cpu(b, e, key, below, step, offset, width, inner, out) -> torch.Tensor:
    norms = torch.empty(2, dtype=torch.float64)
    codes = KERNEL_DTYPE_CODES
    backends.cpu_extension().magprune(
        b.data_ptr(), codes[b.dtype], e.data_ptr(), codes[e.dtype], b.numel(), width, inner,
        compute_dtype(b, [e]) == torch.float64, key, below, step, offset, out.data_ptr(),
        codes[out.dtype], norms.data_ptr(),
    )  # fmt: skip
    return norms


def _run_triton(b, e, key, below, step, offset, width, inner, out) -> torch.Tensor:
    kernels = backends.triton_kernels().magprune
    if width > kernels.MAX_BLOCK:  # one program sorts one row: too wide for it
        return _run_reference(b, e, key, below, step, offset, width, inner, out)
    return kernels.magprune(
        b.reshape(-1), e.reshape(-1), key, below, step, offset, width, inner,
        compute_dtype(b, [e]), out.view(-1),
    )  # fmt: skip


_IMPLEMENTATIONS = {
    "reference": _run_reference,
    "cpu": _run_cpu,
    "triton": _run_triton,
}

_OP = define(
    "magprune",
    "(Tensor base, Tensor expert, int key, int below, int step, int offset, int width, "
    "int inner, Tensor(a!) out, str? backend) -> Tensor",
    _kernel,
    _fake,
)
