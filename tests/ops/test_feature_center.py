"""feature_center: every backend against the reference, for every input and output dtype."""

from __future__ import annotations

import pytest
import torch

import fastmerge
from fastmerge.reference.feature_center import feature_center as reference

from ..conftest import backend_params

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# rows x cols: empty, single, odd, around the CPU row block (256, in steps of 4), the CUDA
# split (256 rows) and the Triton split (512 rows) and tiles (32 x 64).
SHAPES = [(0, 3), (3, 0), (1, 1), (7, 97), (255, 17), (257, 65), (513, 33)]


def _input(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * 3 + 7).to(dtype)


def _check(out, sums, x, shift, out_dtype):
    want_out = torch.empty(x.shape, dtype=out_dtype)
    want_sums = reference(x.cpu(), shift.cpu(), want_out)
    assert out.dtype == out_dtype and sums.dtype == torch.float64
    assert torch.equal(out.cpu(), want_out), "x - shift must be exact in the output dtype"
    scale = want_out.double().abs().sum(0).max().item() if want_out.numel() else 0.0
    torch.testing.assert_close(sums[0].cpu(), want_sums[0], rtol=0, atol=1e-14 * (1 + scale))
    torch.testing.assert_close(sums[1].cpu(), want_sums[1], rtol=1e-14, atol=0)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference(backend, device, dtype, out_dtype, shape):
    x = _input(*shape, dtype)
    shift = x.double().mean(0) if shape[0] else torch.zeros(shape[1], dtype=torch.float64)
    out, sums = fastmerge.ops.feature_center(
        x.to(device), shift.to(device), out_dtype=out_dtype, backend=backend
    )
    assert out.device.type == device
    _check(out, sums, x, shift, out_dtype)


@pytest.mark.parametrize("backend,device", backend_params())
def test_strided_input_and_output(backend, device):
    wide = _input(300, 50, torch.float32, seed=1).to(device)
    x = wide[:, 5:42]  # row stride 50
    shift = torch.linspace(-1, 1, 37, dtype=torch.float64).to(device)
    buffer = torch.full((300, 60), float("nan"), device=device)
    out, sums = fastmerge.ops.feature_center(x, shift, out=buffer[:, 10:47], backend=backend)
    assert out.data_ptr() == buffer[:, 10:47].data_ptr()
    _check(out, sums, x, shift, torch.float32)
    assert buffer[:, :10].isnan().all() and buffer[:, 47:].isnan().all()
    # Transposed input (columns not contiguous) is copied first.
    xt = _input(40, 300, torch.float64, seed=2).to(device).T
    out, sums = fastmerge.ops.feature_center(xt, torch.zeros(40).to(device), backend=backend)
    _check(out, sums, xt, torch.zeros(40, dtype=torch.float64), torch.float64)


def test_default_output_dtype_is_the_gemm_dtype():
    for dtype in DTYPES:
        out, _ = fastmerge.ops.feature_center(torch.ones(2, 3, dtype=dtype), torch.zeros(3))
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_bad_input_names_the_argument():
    x = torch.ones(4, 3)
    with pytest.raises(TypeError, match="x"):
        fastmerge.ops.feature_center(x.int(), torch.zeros(3))
    with pytest.raises(ValueError, match="x must be 2-D"):
        fastmerge.ops.feature_center(torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="shift"):
        fastmerge.ops.feature_center(x, torch.zeros(4))
    with pytest.raises(ValueError, match="out_dtype"):
        fastmerge.ops.feature_center(x, torch.zeros(3), out_dtype=torch.float16)
    with pytest.raises(ValueError, match="out"):
        fastmerge.ops.feature_center(x, torch.zeros(3), out=torch.empty(4, 4))
    with pytest.raises(TypeError, match="out"):
        fastmerge.ops.feature_center(x, torch.zeros(3), out=torch.empty(4, 3, dtype=torch.half))
