"""scope_grad: every backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import fastmerge
from fastmerge.reference.scope_grad import scope_grad as reference

from ..conftest import backend_params

# Tolerance of one rounding step in the output dtype (kernels compute in float32 for
# the half types, the reference in float64).
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-6, torch.float64: 1e-14}


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_matches_reference(backend, device, dtype):
    g = torch.Generator().manual_seed(0)
    sizes = [1, 97, 16385, 65537, 0, 3]
    tensors = [torch.randn(n, generator=g).to(dtype).to(device) for n in sizes]
    tensors.append(torch.randn(30, 20, generator=g).to(dtype).t().to(device))  # non-contiguous
    k = len(tensors)
    mean, alpha, beta = (
        torch.randn(k, generator=g, dtype=torch.float64).to(device) for _ in range(3)
    )
    got = fastmerge.ops.scope_grad(tensors, mean, alpha, beta, backend=backend)
    want = reference(tensors, mean, alpha, beta)
    for i, (x, y) in enumerate(zip(got, want)):
        assert x.dtype == dtype and x.shape == tensors[i].shape, i
        scale = y.double().abs().max().item() if y.numel() else 0.0
        torch.testing.assert_close(
            x.double().cpu(),
            y.double().cpu(),
            rtol=0,
            atol=TOLERANCE[dtype] * (1 + scale),
            msg=f"tensor {i}",
        )


def test_coefficients_must_match_the_list():
    one = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="alpha"):
        fastmerge.ops.scope_grad([torch.ones(3), torch.ones(2)], one, one[:1], one)
