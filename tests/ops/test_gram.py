"""gram: every backend against the reference (float64 sums: ~1e-12 relative), the
reference against a naive float64 computation, and the argument checks."""

from __future__ import annotations

import pytest
import torch

import fastmerge
from fastmerge.ops.gram import MAX_TENSORS, cuda_splits
from fastmerge.reference.gram import compute_dtype

from ..conftest import backend_params

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
MIXED = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
HALF_MIXED = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.float32]
# The CPU cuts the whole tensor into chunks of 2^14 entries (csrc/cpu/gram.cpp, kMinChunk)
# and gives rows and column tiles a second thread past that many entries.
CPU_SPLIT = 1 << 14
# Shapes per axis mode: odd sizes, around the CPU block (256) and column tile, and past
# the multi-thread split; the Triton interpreter is slow, so it gets small ones only.
CPU_SHAPES = {
    None: [(1,), (63,), (65,), (1025,), (CPU_SPLIT + 1,), (3, 5, 7)],
    -1: [(1, 63), (3, 65), (65, 1), (7, 1025), (2, CPU_SPLIT // 2 + 1), (2, 3, 5)],
    0: [(63, 1), (1, 65), (65, 3), (5, 1025), (65, 1025), (CPU_SPLIT + 1, 2), (3, 5, 2)],
}
TRITON_SHAPES = {
    None: [(1,), (97,), (1025,), (2, 3, 5)],
    -1: [(1, 63), (3, 97), (65, 1), (2, 3, 5)],
    0: [(63, 1), (5, 33), (3, 5, 2)],
}
AXES = [None, -1, 0]


def _shapes(backend: str, axis):
    return TRITON_SHAPES[axis] if backend == "triton" else CPU_SHAPES[axis]


def _inputs(shape, dtypes, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * (i + 1) + 0.5).to(d) for i, d in enumerate(dtypes)]


def _base(shape, dtype, seed: int = 99) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.5 + 0.5).to(dtype)


def _vectors(tensors, base):
    """x_i as float64, formed as the op documents (t_i - base rounded in the compute dtype)."""
    dtype = compute_dtype(tensors, base)
    if base is None:
        return [t.to(dtype).double() for t in tensors]
    return [(t.to(dtype) - base.to(dtype)).double() for t in tensors]


def _naive(xs: list[torch.Tensor], axis) -> torch.Tensor:
    """Gram matrices from float64 vectors, one dot product x_i @ x_j at a time."""
    shape = xs[0].shape if xs[0].dim() else (1,)
    xs = [x.reshape(shape) for x in xs]
    if axis is None:
        vectors = [[x.reshape(-1) for x in xs]]
    elif axis == -1:
        vectors = [
            [x.reshape(-1, shape[-1])[r] for x in xs] for r in range(xs[0].numel() // shape[-1])
        ]
    else:
        cols = xs[0].numel() // shape[0]
        vectors = [[x.reshape(shape[0], cols)[:, c] for x in xs] for c in range(cols)]
    k = len(xs)
    out = torch.zeros(len(vectors), k, k, dtype=torch.float64)
    for b, vs in enumerate(vectors):
        for i in range(k):
            for j in range(k):
                out[b, i, j] = vs[i] @ vs[j]
    return out[0] if axis is None else out


def _scale(tensors, base, axis) -> torch.Tensor:
    """Σ_e |x_i[e]| |x_j[e]|: the scale of the sum's rounding error."""
    xs = [x.abs() for x in _vectors(tensors, base)]
    return fastmerge.ops.gram(xs, axis=axis, backend="reference")


def _check(got, tensors, base=None, axis=None, rtol=1e-12):
    want = fastmerge.ops.gram(tensors, base=base, axis=axis, backend="reference")
    got = got.cpu()
    assert got.dtype == torch.float64
    assert got.shape == want.shape, (got.shape, want.shape)
    bound = rtol * _scale(tensors, base, axis) + 1e-300
    err = (got - want).abs()
    assert (err <= bound).all(), (err.max().item(), (err / bound).max().item())
    assert torch.equal(got, got.transpose(-1, -2)), "not symmetric"


def _on(tensors, device):
    return [t.to(device) for t in tensors]


# ---- the reference --------------------------------------------------------------------


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("with_base", [False, True])
def test_reference_matches_naive_float64(axis, with_base):
    for shape in [(7,), (3, 4, 5), (1, 6), (6, 1), ()]:
        for dtypes in (MIXED, HALF_MIXED[:3], [torch.float32] * 2):
            tensors = _inputs(shape, dtypes, seed=len(shape) + len(dtypes))
            base = _base(shape, torch.bfloat16) if with_base else None
            got = fastmerge.ops.gram(tensors, base=base, axis=axis, backend="reference")
            want = _naive(_vectors(tensors, base), axis)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-12)
            # and the vectors themselves: the subtraction rounded in float32 (no float64 input)
            if with_base and torch.float64 not in dtypes:
                x0 = (tensors[0].float() - base.float()).double()
                assert torch.equal(_vectors(tensors, base)[0], x0)


# ---- every backend ----------------------------------------------------------------------


def test_hand_computed_example():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.bfloat16)
    c = torch.tensor([[2.0, -1.0], [0.5, 0.0]], dtype=torch.float16)
    base = torch.ones(2, 2, dtype=torch.float64)
    for backend in fastmerge.backends.usable_backends(torch.device("cpu")):
        g = fastmerge.ops.gram([a, b, c], backend=backend)
        assert g.dtype == torch.float64 and g.shape == (3, 3)
        assert g.tolist() == [[30.0, 5.0, 1.5], [5.0, 2.0, -0.5], [1.5, -0.5, 5.25]], backend
        g = fastmerge.ops.gram([a, b], axis=-1, backend=backend)
        assert g.tolist() == [[[5.0, 2.0], [2.0, 1.0]], [[25.0, 3.0], [3.0, 1.0]]], backend
        g = fastmerge.ops.gram([a, b], axis=0, backend=backend)
        assert g.tolist() == [[[10.0, 3.0], [3.0, 1.0]], [[20.0, 2.0], [2.0, 1.0]]], backend
        # x = t - 1 (float64 base: subtracted in float64): a - 1 = [0, 1, 2, 3], b - 1 =
        # [-1, 0, 0, -1], c - 1 = [1, -2, -0.5, -1]
        g = fastmerge.ops.gram([a, b, c], base=base, backend=backend)
        assert g.tolist() == [[14.0, -3.0, -6.0], [-3.0, 2.0, 0.0], [-6.0, 0.0, 6.25]], backend
        # float32 inputs and base: the difference is rounded in float32 (1 - 2^-30 -> 1)
        one = torch.ones(3)
        tiny = torch.full((3,), 2.0**-30)
        g = fastmerge.ops.gram([one], base=tiny, backend=backend)
        assert g.tolist() == [[3.0]], backend
        # ... and in float64 once any input is float64
        g = fastmerge.ops.gram([one.double(), one], base=tiny, backend=backend)
        assert g[0, 0].item() == 3 * (1 - 2.0**-30) ** 2, backend
        assert g[1, 1].item() == 3 * (1 - 2.0**-30) ** 2, backend  # formed in float64 too


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_matches_reference(backend, device, axis, with_base, count):
    for n, shape in enumerate(_shapes(backend, axis)):
        dtypes = (MIXED if with_base else HALF_MIXED)[:count]
        tensors = _inputs(shape, dtypes, seed=n * 10 + count)
        base = _base(shape, torch.float32) if with_base else None
        got = fastmerge.ops.gram(
            _on(tensors, device),
            base=None if base is None else base.to(device),
            axis=axis,
            backend=backend,
        )
        _check(got, tensors, base, axis)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_dtype(backend, device, dtype):
    shape = (33, 17) if backend == "triton" else (67, 129)
    tensors = _inputs(shape, [dtype] * 3, seed=5)
    for base in (None, _base(shape, dtype)):
        for axis in AXES:
            got = fastmerge.ops.gram(
                _on(tensors, device),
                base=None if base is None else base.to(device),
                axis=axis,
                backend=backend,
            )
            _check(got, tensors, base, axis)


@pytest.mark.parametrize("backend,device", backend_params())
def test_mixed_dtypes_with_base(backend, device):
    shape = (5, 41)
    cases = [
        ([torch.float16, torch.bfloat16], torch.float64),  # a float64 base: float64 compute
        ([torch.float64, torch.float16], torch.bfloat16),
        ([torch.bfloat16, torch.float32, torch.float16], torch.float16),
    ]
    for dtypes, base_dtype in cases:
        tensors = _inputs(shape, dtypes, seed=7)
        base = _base(shape, base_dtype)
        for axis in AXES:
            got = fastmerge.ops.gram(
                _on(tensors, device), base=base.to(device), axis=axis, backend=backend
            )
            _check(got, tensors, base, axis)


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty(backend, device):
    for count in (1, 3):
        for shape, want in [
            ((0,), {None: (0,), -1: (1,), 0: (1,)}),
            ((0, 4), {None: (), -1: (0,), 0: (4,)}),
            ((4, 0), {None: (), -1: (4,), 0: (0,)}),
            ((2, 0, 3), {None: (), -1: (0,), 0: (0,)}),
        ]:
            tensors = [torch.empty(shape, device=device) for _ in range(count)]
            for axis in AXES:
                for base in (None, torch.empty(shape, device=device, dtype=torch.float16)):
                    got = fastmerge.ops.gram(tensors, base=base, axis=axis, backend=backend)
                    expected = (count, count) if axis is None else (*want[axis], count, count)
                    assert got.shape == expected, (shape, axis, got.shape)
                    assert (
                        got.dtype == torch.float64 and got.device.type == torch.device(device).type
                    )
                    assert (got == 0).all()


@pytest.mark.parametrize("backend,device", backend_params())
def test_non_contiguous(backend, device):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(9, 6, generator=g).t()  # (6, 9), transposed
    b = torch.randn(6, 18, generator=g, dtype=torch.float64)[:, ::2]  # strided
    c = torch.randn(6, 9, generator=g).to(torch.bfloat16)
    base = torch.randn(9, 6, generator=g).t()
    dense = [a.contiguous(), b.contiguous(), c]
    for axis in AXES:
        for with_base in (False, True):
            got = fastmerge.ops.gram(
                _on([a, b, c], device),
                base=base.to(device) if with_base else None,
                axis=axis,
                backend=backend,
            )
            _check(got, dense, base.contiguous() if with_base else None, axis)


@pytest.mark.parametrize("backend,device", backend_params())
def test_deterministic(backend, device):
    shape = (33, 65) if backend == "triton" else (129, 1025)
    tensors = _on(_inputs(shape, HALF_MIXED[:3], seed=11), device)
    base = _base(shape, torch.float32).to(device)
    for axis in AXES:
        first = fastmerge.ops.gram(tensors, base=base, axis=axis, backend=backend)
        second = fastmerge.ops.gram(tensors, base=base, axis=axis, backend=backend)
        assert torch.equal(first, second), axis


def test_cpu_result_does_not_depend_on_thread_count():
    tensors = _inputs((70, 3001), [torch.float32, torch.bfloat16, torch.float64], seed=12)
    base = _base((70, 3001), torch.float16)
    before = fastmerge.get_num_threads()
    try:
        for axis in AXES:
            results = []
            for threads in (1, 2, 3):
                fastmerge.set_num_threads(threads)
                results.append(fastmerge.ops.gram(tensors, base=base, axis=axis, backend="cpu"))
            assert all(torch.equal(r, results[0]) for r in results[1:]), axis
            _check(results[0], tensors, base, axis)
    finally:
        fastmerge.set_num_threads(before)


def test_many_tensors():
    """k up to the documented maximum (64): every pair of the triangle is filled."""
    shape = (5, 37)
    dtypes = [DTYPES[i % 4] for i in range(MAX_TENSORS)]
    tensors = _inputs(shape, dtypes, seed=13)
    base = _base(shape, torch.float32)
    for backend in ("cpu",):
        for axis in AXES:
            got = fastmerge.ops.gram(tensors, base=base, axis=axis, backend=backend)
            _check(got, tensors, base, axis)


def test_cuda_splits_plan():
    """The GPU's entry ranges: more than one only for long vectors (whole, columns)."""
    assert cuda_splits("whole", 1, 4096) == 1
    assert cuda_splits("whole", 1, 4097) == 2
    assert cuda_splits("whole", 1, 1 << 40) == 1024
    assert cuda_splits("rows", 1 << 20, 1 << 20) == 1
    assert cuda_splits("columns", 1024, 3) == 1
    assert cuda_splits("columns", 1 << 20, 3) == 1024
    assert cuda_splits("columns", 1 << 20, 1 << 20) == 1


def test_bad_input_names_the_argument():
    a = torch.zeros(4, 3)
    with pytest.raises(TypeError, match="list or tuple"):
        fastmerge.ops.gram(a)
    with pytest.raises(ValueError, match="tensors is empty"):
        fastmerge.ops.gram([])
    with pytest.raises(ValueError, match=r"tensors\[1\] has shape \(3,\)"):
        fastmerge.ops.gram([a, torch.zeros(3)])
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.int64"):
        fastmerge.ops.gram([a, torch.zeros(4, 3, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta"):
        fastmerge.ops.gram([a, torch.zeros(4, 3, device="meta")])
    with pytest.raises(ValueError, match="at most 64 tensors, got 65"):
        fastmerge.ops.gram([a] * 65)
    with pytest.raises(ValueError, match=r"base has shape \(3, 4\)"):
        fastmerge.ops.gram([a], base=torch.zeros(3, 4))
    with pytest.raises(TypeError, match="base has dtype torch.int32"):
        fastmerge.ops.gram([a], base=torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="base is on meta"):
        fastmerge.ops.gram([a], base=torch.zeros(4, 3, device="meta"))
    with pytest.raises(TypeError, match="base must be a torch.Tensor"):
        fastmerge.ops.gram([a], base=[1.0, 2.0])
    for axis in (1, 3, -2, -3):
        with pytest.raises(ValueError, match=f"axis is {axis}"):
            fastmerge.ops.gram([torch.zeros(2, 3, 4)], axis=axis)
    with pytest.raises(ValueError, match="axis is 1"):
        fastmerge.ops.gram([torch.zeros(4)], axis=1)
    with pytest.raises(TypeError, match="axis must be None or an int"):
        fastmerge.ops.gram([a], axis="rows")
    with pytest.raises(TypeError, match="axis must be None or an int"):
        fastmerge.ops.gram([a], axis=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastmerge.ops.gram([a], backend="gpu")
    with pytest.raises(fastmerge.BackendUnavailableError, match="cuda"):
        if torch.cuda.is_available():
            raise fastmerge.BackendUnavailableError("cuda (a GPU is present: nothing to check)")
        fastmerge.ops.gram([a], backend="cuda")


def test_axis_aliases_and_scalars():
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(2, 3)
    last = fastmerge.ops.gram([a, b], axis=-1)
    assert torch.equal(fastmerge.ops.gram([a, b], axis=1), last)
    x = torch.tensor(3.0)
    assert fastmerge.ops.gram([x, x]).tolist() == [[9.0, 9.0], [9.0, 9.0]]
    assert fastmerge.ops.gram([x], axis=0).shape == (1, 1, 1)
    assert fastmerge.ops.gram([x], axis=-1).shape == (1, 1, 1)
    # 1-D: one matrix for both axes, the whole-tensor one
    v = torch.arange(5.0)
    whole = fastmerge.ops.gram([v, v + 1])
    assert torch.equal(fastmerge.ops.gram([v, v + 1], axis=0)[0], whole)
    assert torch.equal(fastmerge.ops.gram([v, v + 1], axis=-1)[0], whole)
    # numpy inputs are accepted like elsewhere
    got = fastmerge.ops.gram([a.numpy(), b.numpy()], base=b.numpy())
    assert got.tolist() == [[31.0, 0.0], [0.0, 0.0]]
