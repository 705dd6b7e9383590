"""``lowrank_mixture``: a linear layer plus a per-sample, gated mixture of low-rank experts.

Twin-Merging serves one shared weight ``W`` and, per task t, truncated SVD factors of the
task's exclusive knowledge ``Delta_t ~ U_t S_t V_t^T``. For a sample with router gates
``g`` (one row per sample, shared by all of the sample's tokens) every covered linear
layer computes::

    y = x W^T + b + sum_t g_t (x V_t^T) (U_t S_t)^T

which equals ``x (W + sum_t g_t U_t S_t V_t^T)^T + b`` without ever materializing a
merged weight, so samples routed to different tasks share one batch.

Backends:

* ``reference``: einsum, the test oracle.
* ``cpu``: torch's BLAS for the products and ``fastmerge._C`` for the gating. Dense gates:
  three GEMMs, ``y = x W^T + b``, ``z = x V_all^T`` over the stacked factors, the gates
  scale ``z`` in place (C++), ``y += z U_all^T``. Sparse (top-k) gates: per task, only
  the samples whose gate is non-zero: their rows are gathered (C++) into one block, two
  GEMMs, and the block is added back into ``y`` (C++), MoE-style. The path is picked by
  the fraction of non-zero gates (:data:`SPARSE_MAX_DENSITY`).
* ``cuda`` and ``triton``: ``x W^T + b`` by torch (cuBLAS), then two tiled kernels for the
  gated low-rank part: ``z[m, t r + k] = g[n(m), t] (x[m] . vs[t, k])`` for the (row, task)
  pairs whose gate is non-zero, then ``y[m] += z[m] U_all^T`` skipping zero gates.

The ``cpu`` backend keeps the (T r, d_out) transposed copy of `us` that the dense path
multiplies by (for a batch of 64 vectors, copying `us` on every call would cost as much
as the product), keyed on the `us` tensor object and its version counter, for `us`
that does not require grad: an in-place change through torch ops is seen, a change
through ``us.data`` is not (call :func:`clear_lowrank_cache` then). A `us` that requires
grad is copied on every call.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, NamedTuple, Optional

import torch

from .. import backends
from .._dtypes import KERNEL_DTYPE_CODES, dtype_names
from .._tensors import TensorLike, as_tensor
from ..reference import lowrank_mixture as reference
from ._library import define, resolve

#: The cpu backend multiplies only the selected tasks' factors when at most this
#: fraction of the gates is non-zero. In `fastmerge bench lowrank_mixture` the routed path was
#: the faster one at 2 of 8 gates non-zero (25%) in every shape and the dense path at 100%
#: with 128 tokens per sample; the crossover in between is not measured, 0.5 splits it.
SPARSE_MAX_DENSITY = 0.5


class _Problem(NamedTuple):
    """Validated inputs, with x viewed as (N, L, d_in): N samples of L tokens."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    us: torch.Tensor
    vs: torch.Tensor
    gates: torch.Tensor


def lowrank_mixture(
    x: TensorLike,
    weight: TensorLike,
    bias: Optional[TensorLike],
    us: TensorLike,
    vs: TensorLike,
    gates: TensorLike,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``x W^T + b + sum_t gates[n, t] (x V_t^T) U_t^T`` per sample n, without merged weights.

    Args:
        x: (N, ..., d_in): N samples with any number of token dims (e.g. (N, L, d_in)).
        weight: (d_out, d_in) shared weight.
        bias: (d_out,) or None.
        us: (T, d_out, r): each task's ``U_t diag(S_t)`` (singular values folded in).
        vs: (T, r, d_in): each task's ``V_t^T``.
        gates: (N, T): one row of gates per sample, applied to all of its tokens. Zeros
            are skipped, so top-k routing (a dense row with zeros) costs only the selected
            tasks' factors.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; default: the
            fastest usable one for the inputs' device.

    Returns:
        (N, ..., d_out) in x's dtype. float16/bfloat16 are computed in float32.
        Differentiable with respect to every tensor argument (the backward uses torch
        ops; it is registered with ``torch.ops.fastmerge.lowrank_mixture``).

    Raises:
        TypeError: a non-tensor, an unsupported dtype, or inputs of different dtypes.
        ValueError: shapes that do not fit together (naming the argument and the size it
            must have) or inputs on different devices.

    Example:
        >>> import torch, fastmerge
        >>> x = torch.tensor([[1.0, 2.0], [1.0, 2.0]])        # two samples, d_in = 2
        >>> weight = torch.eye(2)
        >>> us = torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]])  # T = 2 tasks, r = 1
        >>> vs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
        >>> gates = torch.tensor([[1.0, 0.0], [0.0, 0.5]])     # sample 0 -> task 0, ...
        >>> fastmerge.lowrank_mixture(x, weight, None, us, vs, gates).tolist()
        [[2.0, 2.0], [1.0, 3.0]]
    """
    problem, out_shape = _validate(x, weight, bias, us, vs, gates)
    return _OP(*problem, backend).reshape(out_shape)


def merge_lowrank(
    weight: TensorLike, us: TensorLike, vs: TensorLike, gate_row: TensorLike
) -> torch.Tensor:
    """The merged weight ``weight + sum_t gate_row[t] us[t] @ vs[t]`` of one sample.

    What :func:`lowrank_mixture` avoids building: a model merged for one gate row (the
    per-batch mode of Twin-Merging, or the per-sample baseline). Computed in float32 for
    half inputs, returned in weight's dtype.

    Args:
        weight: (d_out, d_in); us: (T, d_out, r); vs: (T, r, d_in); gate_row: (T,).

    Example:
        >>> import torch, fastmerge
        >>> us = torch.ones(2, 2, 1)
        >>> vs = torch.ones(2, 1, 2)
        >>> fastmerge.ops.merge_lowrank(torch.zeros(2, 2), us, vs, torch.tensor([0.5, 1.5]))
        tensor([[2., 2.],
                [2., 2.]])
    """
    w = as_tensor(weight, "weight")
    if w.dtype not in KERNEL_DTYPE_CODES:
        raise TypeError(f"weight has dtype {w.dtype}; supported dtypes are {dtype_names()}")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (d_out, d_in), got shape {tuple(w.shape)}")
    row = as_tensor(gate_row, "gate_row")
    if row.dim() != 1:
        raise ValueError(f"gate_row must be 1-D (T,), got shape {tuple(row.shape)}")
    problem, _ = _validate(w.new_zeros((1, w.shape[1])), w, None, us, vs, row[None])
    return _MERGE_OP(problem.weight, problem.us, problem.vs, problem.gates[0])


def clear_lowrank_cache() -> None:
    """Forget the cpu backend's prepared (transposed) copies of `us`.

    Needed only after changing a `us` tensor behind autograd's back (through ``.data``).

    Example:
        >>> fastmerge.ops.clear_lowrank_cache()
    """
    _TRANSPOSED_US.clear()


# ---- validation --------------------------------------------------------------------------


def _validate(x, weight, bias, us, vs, gates) -> tuple[_Problem, tuple[int, ...]]:
    """Check shapes, dtypes and devices; return the problem with x as (N, L, d_in) and the
    output shape."""
    x_t = as_tensor(x, "x")
    if x_t.dtype not in KERNEL_DTYPE_CODES:
        raise TypeError(f"x has dtype {x_t.dtype}; supported dtypes are {dtype_names()}")
    if x_t.dim() < 2:
        raise ValueError(f"x must be (N, ..., d_in) with at least 2 dims, got {tuple(x_t.shape)}")
    named = {"weight": weight, "us": us, "vs": vs, "gates": gates}
    if bias is not None:
        named["bias"] = bias
    tensors = {name: as_tensor(value, name) for name, value in named.items()}
    for name, t in tensors.items():
        if t.dtype != x_t.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but x has {x_t.dtype}; all inputs must share one "
                f"dtype (one of {dtype_names()})"
            )
        if t.device != x_t.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x_t.device}")
    n, d_in = x_t.shape[0], x_t.shape[-1]
    w, u, v, g = (tensors[k] for k in ("weight", "us", "vs", "gates"))
    if w.dim() != 2 or w.shape[1] != d_in:
        raise ValueError(f"weight must be (d_out, d_in={d_in}), got {tuple(w.shape)}")
    d_out = w.shape[0]
    b = tensors.get("bias")
    if b is not None and tuple(b.shape) != (d_out,):
        raise ValueError(f"bias must be None or (d_out,) = ({d_out},), got {tuple(b.shape)}")
    if u.dim() != 3 or u.shape[1] != d_out:
        raise ValueError(f"us must be (T, d_out={d_out}, r), got {tuple(u.shape)}")
    t_count, rank = u.shape[0], u.shape[2]
    if tuple(v.shape) != (t_count, rank, d_in):
        raise ValueError(
            f"vs must be (T, r, d_in) = ({t_count}, {rank}, {d_in}) to match us "
            f"{tuple(u.shape)} and x, got {tuple(v.shape)}"
        )
    if g.dim() != 2 or g.shape[1] != t_count:
        raise ValueError(
            f"gates must be (N, T) with T = {t_count} tasks (the first dim of us and vs), got "
            f"{tuple(g.shape)}"
        )
    if g.shape[0] != n:
        raise ValueError(f"gates must have one row per sample of x (N = {n}), got {g.shape[0]}")
    tokens = math.prod(x_t.shape[1:-1])
    problem = _Problem(x_t.reshape(n, tokens, d_in), w, b, u, v, g)
    return problem, (*x_t.shape[:-1], d_out)


# ---- registration: kernels, fake implementations, autograd -----------------------------


def _kernel(x, weight, bias, us, vs, gates, backend: Optional[str]) -> torch.Tensor:
    """(N, L, d_out) of validated inputs, x as (N, L, d_in)."""
    name = resolve(backend, x.device)
    with torch.no_grad():
        return _IMPLEMENTATIONS[name](_Problem(x, weight, bias, us, vs, gates))


def _fake(x, weight, bias, us, vs, gates, backend: Optional[str]) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, us, vs, gates, _ = inputs
    ctx.save_for_backward(x, weight, us, vs, gates)
    ctx.has_bias = bias is not None


def _mixture_backward(ctx, grad_y):
    """Backward by dense torch products (every backend's forward alike)."""
    x, weight, us, vs, gates = ctx.saved_tensors
    names = ("x", "weight", "bias", "us", "vs", "gates")
    need = dict(zip(names, ctx.needs_input_grad[:6]))
    return (*_backward(x, weight, us, vs, gates, grad_y, need, ctx.has_bias), None)


def _merge_kernel(weight, us, vs, gate_row) -> torch.Tensor:
    with torch.no_grad():
        return reference.merge_lowrank(weight, us, vs, gate_row)


def _merge_fake(weight, us, vs, gate_row) -> torch.Tensor:
    return weight.new_empty(weight.shape)


def _merge_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _merge_backward(ctx, grad):
    """W' = W + sum_t g_t U_t V_t: dW = G, dU_t = g_t G V_t^T, dV_t = g_t U_t^T G,
    dg_t = <G, U_t V_t>, in the forward's compute dtype."""
    weight, us, vs, gate_row = ctx.saved_tensors
    compute = _compute_dtype(weight.dtype)
    g, u, v, row = (t.to(compute) for t in (grad, us, vs, gate_row))
    need = ctx.needs_input_grad
    d_us = torch.einsum("t,od,trd->tor", row, g, v).to(us.dtype) if need[1] else None
    d_vs = torch.einsum("t,tor,od->trd", row, u, g).to(vs.dtype) if need[2] else None
    d_row = torch.einsum("od,tor,trd->t", g, u, v).to(gate_row.dtype) if need[3] else None
    return (grad if need[0] else None), d_us, d_vs, d_row


def _backward(x, weight, us, vs, gates, grad_y, need, has_bias):
    """Gradients of y = x W^T + b + sum_t g_t (x V_t^T) U_t^T, for the inputs in `need`."""
    n, tokens, d_in = x.shape
    t_count, d_out, rank = us.shape
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.reshape(n * tokens, d_in).to(compute)
    dy = grad_y.reshape(n * tokens, d_out).to(compute)
    w, u, v, g = (t.to(compute) for t in (weight, us, vs, gates))
    u_all = u.permute(1, 0, 2).reshape(d_out, t_count * rank)  # [o, t r + k] = us[t, o, k]
    v_all = v.reshape(t_count * rank, d_in)
    row_gates = g[:, None, :, None]  # broadcasts over (N, L, T, r)
    d_gated = (dy @ u_all).view(n, tokens, t_count, rank)  # dL/d(g z)
    d_down = (d_gated * row_gates).reshape(n * tokens, t_count * rank)  # dL/dz
    down = None
    if need["us"] or need["gates"]:
        down = (xs @ v_all.T).view(n, tokens, t_count, rank)
    grads = dict.fromkeys(need)
    if need["x"]:
        grads["x"] = (dy @ w + d_down @ v_all).view(n, tokens, d_in)
    if need["weight"]:
        grads["weight"] = dy.T @ xs
    if need["bias"] and has_bias:
        grads["bias"] = dy.sum(0)
    if need["us"]:
        gated = (down * row_gates).reshape(n * tokens, t_count * rank)
        grads["us"] = (dy.T @ gated).view(d_out, t_count, rank).permute(1, 0, 2)
    if need["vs"]:
        grads["vs"] = (d_down.T @ xs).view(t_count, rank, d_in)
    if need["gates"]:
        grads["gates"] = (d_gated * down).sum(dim=(1, 3))
    dtypes = {"x": x, "weight": weight, "bias": weight, "us": us, "vs": vs, "gates": gates}
    return tuple(
        None if grads[k] is None else grads[k].to(dtypes[k].dtype)
        for k in ("x", "weight", "bias", "us", "vs", "gates")
    )


# ---- backends --------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are multiplied in float32; float32 and float64 as they are."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _as_compute(problem: _Problem) -> _Problem:
    compute = _compute_dtype(problem.x.dtype)
    return _Problem(*(None if t is None else t.to(compute) for t in problem))


def _base(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x W^T + b as one BLAS call (bias enters through the GEMM's beta)."""
    if bias is None:
        return x2 @ weight.T
    return torch.addmm(bias, x2, weight.T)


def _run_reference(problem: _Problem) -> torch.Tensor:
    return reference.lowrank_mixture(*problem)


def _run_cpu(problem: _Problem) -> torch.Tensor:
    out_dtype = problem.x.dtype
    p = _as_compute(problem)
    n, tokens, d_in = p.x.shape
    x2 = p.x.reshape(n * tokens, d_in)
    y = _base(x2, p.weight, p.bias)
    nonzero = int(torch.count_nonzero(p.gates))
    if nonzero and p.us.shape[2] and y.numel():
        if nonzero <= SPARSE_MAX_DENSITY * p.gates.numel():
            _add_routed_cpu(y, x2, p.us, p.vs, p.gates, tokens)
        else:
            _add_dense_cpu(y, x2, p.us, p.vs, p.gates, tokens)
    return y.view(n, tokens, y.shape[1]).to(out_dtype)


def _add_dense_cpu(y, x2, us, vs, gates, tokens) -> None:
    """y += (gates * (x V_all^T)) U_all^T over all tasks: two GEMMs and one gating pass."""
    t_count, _, rank = us.shape
    down = x2 @ vs.reshape(t_count * rank, -1).T  # (rows, T r), contiguous
    _scale_by_gates_cpu(down, gates, tokens, rank)
    y.addmm_(down, _transposed_us(us))


def _add_routed_cpu(y, x2, us, vs, gates, tokens) -> None:
    """y += g_t (x V_t^T) U_t^T for each task t over the samples routed to t only.

    The rows of a task's samples are gathered into one block (fastmerge._C), multiplied by
    two GEMMs and added back: two large GEMMs per task rather than a small pair per sample,
    which keeps BLAS efficient and the number of parallel regions low.
    """
    t_count, rank = gates.shape[1], us.shape[2]
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    pairs = torch.nonzero(gates.T)  # (task, sample), sorted by task
    counts = torch.bincount(pairs[:, 0], minlength=t_count).tolist()
    samples = pairs[:, 1].contiguous()
    most = max(counts) * tokens
    x_block = torch.empty((most, x2.shape[1]), dtype=y.dtype)
    down = torch.empty((most, rank), dtype=y.dtype)
    part = torch.empty((most, y.shape[1]), dtype=y.dtype)
    start = 0
    for task, count in enumerate(counts):
        if count == 0:
            continue
        index = samples[start : start + count]
        start += count
        rows = count * tokens
        _move_rows_cpu(x_block, x2, index, tokens, scatter_add=False)
        torch.mm(x_block[:rows], vs[task].T, out=down[:rows])
        _scale_by_gates_cpu(down[:rows], gates[index, task][:, None], tokens, rank)
        torch.mm(down[:rows], us[task].T, out=part[:rows])
        _move_rows_cpu(y, part[:rows], index, tokens, scatter_add=True)


def _move_rows_cpu(
    dst: torch.Tensor, src: torch.Tensor, index: torch.Tensor, tokens: int, *, scatter_add: bool
) -> None:
    """By blocks of `tokens` rows: dst[b] = src[index[b]] (gather) or dst[index[b]] += src[b]
    (scatter-add; the indices are distinct), in fastmerge._C."""
    backends.cpu_extension().lowrank_rows(
        scatter_add,
        dst.data_ptr(),
        dst.stride(0),
        src.data_ptr(),
        src.stride(0),
        index.data_ptr(),
        index.numel(),
        tokens,
        src.shape[1],
        KERNEL_DTYPE_CODES[src.dtype],
    )


def _scale_by_gates_cpu(down: torch.Tensor, gates: torch.Tensor, tokens: int, rank: int) -> None:
    """down[m, t r + k] *= gates[m // tokens, t], in place (fastmerge._C)."""
    rows, cols = down.shape
    gates = gates.contiguous()
    backends.cpu_extension().lowrank_gate_scale(
        down.data_ptr(),
        KERNEL_DTYPE_CODES[down.dtype],
        rows,
        cols // rank if rank else 0,
        rank,
        down.stride(0),
        gates.data_ptr(),
        gates.stride(0),
        tokens,
    )


_TRANSPOSED_US: dict[int, tuple[weakref.ref, int, torch.dtype, torch.Tensor]] = {}


def _transposed_us(us: torch.Tensor) -> torch.Tensor:
    """us as the (T r, d_out) matrix U_all^T, contiguous; cached per tensor and version for
    factors that are not being trained (a tensor that requires grad is copied each call,
    because gradcheck and optimizers may change it without bumping its version)."""
    t_count, d_out, rank = us.shape
    if us.requires_grad:
        return us.detach().transpose(1, 2).reshape(t_count * rank, d_out).contiguous()
    key = id(us)
    entry = _TRANSPOSED_US.get(key)
    if entry is not None:
        ref, version, dtype, cached = entry
        if ref() is us and version == us._version and dtype == us.dtype:
            return cached
    prepared = us.transpose(1, 2).reshape(t_count * rank, d_out).contiguous()
    try:
        ref = weakref.ref(us, lambda _, key=key: _TRANSPOSED_US.pop(key, None))
    except TypeError:  # not weak-referenceable: do not cache
        return prepared
    _TRANSPOSED_US[key] = (ref, us._version, us.dtype, prepared)
    return prepared


def _run_cuda(problem: _Problem) -> torch.Tensor:
    return _run_kernels(problem, _lowrank_cuda)


def _run_triton(problem: _Problem) -> torch.Tensor:
    return _run_kernels(problem, backends.triton_kernels().lowrank_mixture.add_lowrank)


def _run_kernels(problem: _Problem, add_lowrank: Callable) -> torch.Tensor:
    """x W^T + b by torch, then the gated low-rank part by the two kernels of a backend."""
    x, weight, bias, us, vs, gates = problem
    n, tokens, d_in = x.shape
    compute = _compute_dtype(x.dtype)
    x2 = x.reshape(n * tokens, d_in)
    y = _base(x2.to(compute), weight.to(compute), None if bias is None else bias.to(compute))
    if y.numel() and us.shape[0] and us.shape[2] and d_in:
        add_lowrank(
            y, x2.contiguous(), us.contiguous(), vs.contiguous(), gates.contiguous(), tokens
        )
    return y.view(n, tokens, y.shape[1]).to(x.dtype)


def _lowrank_cuda(y, x2, us, vs, gates, tokens) -> None:
    """The CUDA kernels: down-projection into float scratch, then y += it U_all^T."""
    rows, d_in = x2.shape
    t_count, d_out, rank = us.shape
    scratch_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    down = torch.empty((rows, t_count * rank), dtype=scratch_dtype, device=y.device)
    with torch.cuda.device(y.device):
        backends.cuda_extension().lowrank_mixture(
            x2.data_ptr(),
            KERNEL_DTYPE_CODES[x2.dtype],
            rows,
            d_in,
            d_out,
            t_count,
            rank,
            tokens,
            us.data_ptr(),
            vs.data_ptr(),
            gates.data_ptr(),
            down.data_ptr(),
            y.data_ptr(),  # float32 (float64 for float64 inputs), like `down`: no dtype code
            torch.cuda.current_stream(y.device).cuda_stream,
        )


_IMPLEMENTATIONS: dict[str, Callable[[_Problem], torch.Tensor]] = {
    "reference": _run_reference,
    "cpu": _run_cpu,
    "cuda": _run_cuda,
    "triton": _run_triton,
}

_OP = define(
    "lowrank_mixture",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor us, Tensor vs, Tensor gates, str? backend)"
    " -> Tensor",
    _kernel,
    _fake,
    backward=_mixture_backward,
    setup_context=_setup_context,
)
_MERGE_OP = define(
    "merge_lowrank",
    "(Tensor weight, Tensor us, Tensor vs, Tensor gate_row) -> Tensor",
    _merge_kernel,
    _merge_fake,
    backward=_merge_backward,
    setup_context=_merge_setup_context,
)
