"""Every Triton launch goes through fastmerge.kernels._launch: on the inputs' device (a
stand-in device context records it), on a grid within CUDA's limits; axes past 65,535
(experts, tasks) are walked inside the kernels; the bfloat16 rounding helper keeps NaNs
NaN for every NaN bit pattern; an AOT signature entry names its kernel's arguments in order."""

from __future__ import annotations

import contextlib
import doctest
import inspect
import types

import numpy as np
import pytest
import torch

from ..conftest import HAS_TRITON

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
]

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fastmerge import kernels
    from fastmerge.kernels import _aot, _launch, _rounding

    @triton.jit
    def _round_kernel(x_ptr, out_ptr, n, OUT: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        tl.store(out_ptr + offsets, _rounding.to_out(x, OUT), mask=mask)


def _geometry() -> list[int]:
    # n, c_in, h, w, c_out, h_out, w_out, kh, kw, sh, sw, ph, pw, dh, dw, bias
    return [1, 1, 3, 3, 1, 2, 2, 2, 2, 1, 1, 0, 0, 1, 1, 1]


def _launchers() -> dict[str, object]:
    """Launcher name (module.function) -> a call of it on small CPU inputs."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    base, experts = r(50), [r(50), r(50)]
    moments = [r(3, dtype=torch.float64) for _ in range(2)]
    return {
        "conv_gram.conv_gram": lambda: kernels.conv_gram.conv_gram(
            r(1, 1, 3, 3), r(1, 1, 2, 2), _geometry()
        ),
        "feature_center.feature_center": lambda: kernels.feature_center.feature_center(
            r(4, 3), torch.zeros(3, dtype=torch.float64), torch.empty(4, 3)
        ),
        "feature_cost.feature_cost": lambda: kernels.feature_cost.feature_cost(
            r(3, 3, dtype=torch.float64), *moments, *moments, *moments, 4.0, 0
        ),
        "gram.gram": lambda: [
            kernels.gram.gram([r(4, 5), r(4, 5)], None, mode, torch.float32)
            for mode in ("whole", "rows", "columns")
        ],
        "gta_combine.gta_combine": lambda: kernels.gta_combine.gta_combine(
            base, experts, torch.ones(4, 2), None, 0, True, False, True, 1.0, torch.empty(50)
        ),
        "lowrank_mixture.add_lowrank": lambda: kernels.lowrank_mixture.add_lowrank(
            torch.zeros(4, 3), r(4, 5), r(2, 3, 2), r(2, 2, 5), r(4, 2), 1
        ),
        "magnitude_threshold.magnitude_threshold": (
            lambda: kernels.magnitude_threshold.magnitude_threshold(base, experts, 3, torch.float32)
        ),
        "magprune.magprune": lambda: kernels.magprune.magprune(
            base, experts[0], 123, 2**51, 2**47, 0, 10, 1, torch.float32, torch.empty(50)
        ),
        "nearswap.nearswap": lambda: kernels.nearswap.nearswap(
            base, experts[0], 0.5, torch.float32, torch.empty(50)
        ),
        "sce_combine.sce_variance": lambda: kernels.sce_combine.sce_variance(
            base, experts, torch.empty(50)
        ),
        "sce_combine.sce_energies": lambda: kernels.sce_combine.sce_energies(
            base, experts, torch.zeros(1)
        ),
        "sce_combine.sce_combine": lambda: kernels.sce_combine.sce_combine(
            base, experts, None, torch.ones(2), torch.empty(50)
        ),
        "scope_grad.scope_grad": lambda: kernels.scope_grad.scope_grad(
            [r(7), r(3)], torch.ones(3, 2, dtype=torch.float64)
        ),
        "scope_stats.scope_stats": lambda: kernels.scope_stats.scope_stats([r(7), r(3)]),
        "ties_combine.ties_combine": lambda: kernels.ties_combine.ties_combine(
            base, experts, torch.zeros(2), 1.0, torch.empty(50)
        ),
        "weighted_sum.weighted_sum": lambda: kernels.weighted_sum.weighted_sum(
            experts, [0.5, 0.5], torch.float32, torch.empty(50)
        ),
    }


def _public_launchers() -> set[str]:
    """Every public plain function defined in a kernel module: the launchers."""
    names = set()
    for name in kernels.KERNEL_MODULES:
        module = getattr(kernels, name)
        for attr, value in vars(module).items():
            if (
                isinstance(value, types.FunctionType)
                and value.__module__ == module.__name__
                and not attr.startswith("_")
            ):
                names.add(f"{name}.{attr}")
    return names


def _kernel_names() -> set[str]:
    return {kernel.__name__ for kernel, _, _ in kernels.AOT_SIGNATURES.values()}


def test_the_launcher_table_covers_every_launcher():
    assert set(_launchers()) == _public_launchers()


def test_every_launch_runs_inside_the_device_guard_with_the_inputs_device(monkeypatch):
    current: list[torch.device] = []  # the device the stand-in guard has made current
    launches: list[tuple[str, object]] = []

    @contextlib.contextmanager
    def recording_context(device):
        current.append(device)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(_launch, "device_context", recording_context)
    kernel_types = {type(kernel) for kernel, _, _ in kernels.AOT_SIGNATURES.values()}
    for kernel_type in kernel_types:
        original = kernel_type.run

        def run(self, *args, _original=original, **kwargs):
            launches.append((self.__name__, current[-1] if current else None))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(kernel_type, "run", run)

    for name, call in _launchers().items():
        before = len(launches)
        call()
        assert len(launches) > before, f"{name} launched no kernel"
    outside = sorted({kernel for kernel, device in launches if device is None})
    assert not outside, f"launched outside the device guard: {outside}"
    assert {device for _, device in launches} == {torch.device("cpu")}
    assert {kernel for kernel, _ in launches} == _kernel_names()


def test_the_device_context_makes_a_cuda_inputs_device_current():
    context = _launch.device_context(torch.device("cuda", 1))
    assert isinstance(context, torch.cuda.device) and context.idx == 1
    assert isinstance(_launch.device_context(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.parametrize(
    "grid, message",
    [
        ((2**31 - 1, 65535, 65535), None),
        ((2**31, 1, 1), "axis x (tiles) has 2147483648 programs, more than CUDA's limit of "),
        ((1, 65536), "axis y (experts) has 65536 programs"),
        ((1, 1, 65536), "axis z (tasks) has 65536 programs, more than CUDA's limit of 65535"),
    ],
)
def test_grid_error_names_the_axis_past_its_limit(grid, message):
    error = _launch.grid_error("some_kernel", grid, ("tiles", "experts", "tasks"))
    if message is None:
        assert error is None
    else:
        assert error.startswith("some_kernel: grid axis") and message in error


def test_launch_refuses_a_grid_past_the_limit_before_launching():
    class Kernel:
        __name__ = "lowrank_up_kernel"
        launched = False

        def __getitem__(self, grid):
            Kernel.launched = True
            return lambda *args, **kwargs: None

    with pytest.raises(ValueError, match=r"lowrank_up_kernel: grid axis y \(output tiles\)"):
        _launch.launch(Kernel(), (1, 70000), torch.device("cpu"), axes=("rows", "output tiles"))
    assert not Kernel.launched


def test_magnitude_threshold_walks_experts_past_the_grid_limit(monkeypatch):
    import fastmerge

    # A grid of 2 programs along y for 5 experts: each program must walk several experts.
    monkeypatch.setattr(kernels.magnitude_threshold, "GRID_LIMITS", (2**31 - 1, 2, 2))
    g = torch.Generator().manual_seed(1)
    base = torch.randn(300, generator=g)
    experts = [torch.randn(300, generator=g) for _ in range(5)]
    got = fastmerge.ops.magnitude_threshold(base, experts, 17, backend="triton")
    want = fastmerge.ops.magnitude_threshold(base, experts, 17, backend="reference")
    assert torch.equal(got, want)


def test_lowrank_mixture_walks_tasks_past_the_grid_limit(monkeypatch):
    import fastmerge

    monkeypatch.setattr(kernels.lowrank_mixture, "GRID_LIMITS", (2**31 - 1, 65535, 2))
    g = torch.Generator().manual_seed(2)
    x, weight = torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g)
    us, vs = torch.randn(5, 4, 2, generator=g), torch.randn(5, 2, 5, generator=g)
    gates = torch.rand(6, 5, generator=g)
    got = fastmerge.ops.lowrank_mixture(x, weight, None, us, vs, gates, backend="triton")
    want = fastmerge.ops.lowrank_mixture(x, weight, None, us, vs, gates, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# float32 bit patterns: NaNs whose rounding bias would carry (0x7FFFFFFF is the GPU's
# NaN), signalling NaNs, infinities, the largest finite values, ties, subnormals, zeros.
BIT_PATTERNS = [
    0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF,
    0x7FFF8000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x3F808000,
    0x3F818000, 0x3F80FFFF, 0x00000001, 0x80000001, 0x00008000, 0x00000000, 0x80000000,
    0x3F800000, 0xBF800000,
]  # fmt: skip


def test_bfloat16_rounding_matches_torch_on_nan_and_edge_bit_patterns():
    bits = np.array(BIT_PATTERNS, dtype=np.uint32).view(np.int32)
    x = torch.from_numpy(bits.copy()).view(torch.float32)
    out = torch.empty(len(BIT_PATTERNS), dtype=torch.bfloat16)
    _round_kernel[(1,)](x, out, len(BIT_PATTERNS), OUT=tl.bfloat16, BLOCK=32)
    want = x.to(torch.bfloat16)
    assert torch.equal(out.isnan(), want.isnan()), [
        hex(p) for p, a, b in zip(BIT_PATTERNS, out.isnan(), want.isnan()) if a != b
    ]
    finite = ~want.isnan()
    assert torch.equal(out[finite].view(torch.int16), want[finite].view(torch.int16))


def test_every_bfloat16_writer_uses_the_shared_rounding():
    # A kernel module with its own copy of the rounding could miss the NaN case again.
    for name in ("gta_combine", "nearswap", "ties_combine", "weighted_sum"):
        assert getattr(kernels, name)._to_out is _rounding.to_out, name
    for name in kernels.KERNEL_MODULES:
        source = inspect.getsource(getattr(kernels, name))
        assert "+ 0x7FFF +" not in source, f"{name} rounds to bfloat16 by hand"


def test_ties_combine_keeps_a_gpu_nan_a_nan_in_bfloat16():
    # 0x7FFFFFFF in the base: the interpreter's arithmetic keeps that payload (as the GPU's
    # does), so the sum reaches the rounding with the bits that used to become -0.0.
    base = torch.tensor([0x7FFFFFFF, 0x3F800000], dtype=torch.int32).view(torch.float32)
    experts = [torch.ones(2)]
    out = torch.empty(2, dtype=torch.bfloat16)
    kernels.ties_combine.ties_combine(base, experts, torch.zeros(1), 1.0, out)
    assert out[0].isnan() and out[1].item() == 1.0


def test_an_aot_entry_names_the_kernels_arguments_in_order():
    types_ = {"x_ptr": "*fp32", "out_ptr": "*bf16", "n": "i32"}
    kernel, signature, constexprs = _aot.aot_entry(
        _round_kernel, types_, {"OUT": tl.bfloat16, "BLOCK": 8}
    )
    assert kernel is _round_kernel and constexprs == {"OUT": tl.bfloat16, "BLOCK": 8}
    assert signature == {**types_, "OUT": "constexpr", "BLOCK": "constexpr"}
    assert list(signature) == ["x_ptr", "out_ptr", "n", "OUT", "BLOCK"]
    with pytest.raises(ValueError, match="_round_kernel .* takes"):  # BLOCK missing
        _aot.aot_entry(_round_kernel, types_, {"OUT": tl.bfloat16})
    with pytest.raises(ValueError, match="_round_kernel"):  # out of order
        _aot.aot_entry(_round_kernel, types_, {"BLOCK": 8, "OUT": tl.bfloat16})
    assert doctest.testmod(_aot).failed == 0
