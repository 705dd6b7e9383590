"""conv_gram: every backend against the float64 unfold reference, and the reference against
an explicit im2col loop."""

from __future__ import annotations

import pytest
import torch

import fastmerge
from fastmerge.reference.conv_gram import conv_gram as reference

from ..conftest import backend_params

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation): 1x1, odd sizes, strided,
# dilated, rectangular kernels, a sample count around the Triton flush group (1,024).
CASES = [
    (1, 1, 1, 1, 1, 1, 1, 0, 1),
    (2, 3, 5, 4, 2, 1, 1, 0, 1),
    (3, 4, 9, 7, 5, (3, 2), (2, 2), (1, 0), (1, 2)),
    (2, 5, 8, 8, 33, 3, 1, 1, 1),
    (1, 2, 33, 31, 3, 2, 1, 0, 1),  # 32 x 30 = 960 samples
    (2, 3, 23, 23, 4, 3, 1, 1, 1),  # 1,058 samples: one flush group + 34
]


def _data(case, dtype=torch.float64, seed=0):
    n, c_in, h, w, c_out, k, s, p, d = case
    conv = torch.nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64) + 0.3
    y = conv.double()(x).detach() + 0.1 * torch.randn(1, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype), dict(stride=s, padding=p, dilation=d), conv.kernel_size


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_matches_reference(backend, device, bias, case):
    x, y, kw, ks = _data(case)
    want_g, want_c = fastmerge.ops.conv_gram(x, y, ks, bias=bias, backend="reference", **kw)
    got_g, got_c = fastmerge.ops.conv_gram(
        x.to(device), y.to(device), ks, bias=bias, backend=backend, **kw
    )
    assert got_g.dtype == got_c.dtype == torch.float64 and got_g.device.type == device
    assert torch.equal(got_g.cpu(), got_g.cpu().T)  # exactly symmetric
    scale = want_g.abs().max().item()
    torch.testing.assert_close(got_g.cpu(), want_g, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(got_c.cpu(), want_c, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("backend,device", backend_params())
def test_float32_input_is_within_float32_error(backend, device):
    x, y, kw, ks = _data(CASES[5], dtype=torch.float32)
    want_g, want_c = reference(x.double(), y.double(), ks, (1, 1), (1, 1), (1, 1), True)
    got_g, got_c = fastmerge.ops.conv_gram(x.to(device), y.to(device), ks, backend=backend, **kw)
    scale = want_g.abs().max().item()
    torch.testing.assert_close(got_g.cpu(), want_g, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(got_c.cpu(), want_c, rtol=0, atol=1e-5 * scale)


def test_reference_matches_an_explicit_im2col_loop():
    x, y, _, _ = _data((2, 2, 5, 6, 3, (2, 3), (1, 2), (1, 1), (2, 1)))
    g, c = reference(x, y, (2, 3), (1, 2), (1, 1), (2, 1), True)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    rows, targets = [], []
    for n in range(2):
        for oh in range(y.shape[2]):
            for ow in range(y.shape[3]):
                patch = xp[n, :, oh : oh + 3 : 2, 2 * ow : 2 * ow + 3]  # dilation (2, 1)
                rows.append(torch.cat([patch.reshape(-1), torch.ones(1, dtype=x.dtype)]))
                targets.append(y[n, :, oh, ow])
    p, t = torch.stack(rows), torch.stack(targets)
    torch.testing.assert_close(g, p.T @ p, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(c, p.T @ t, rtol=1e-13, atol=1e-12)


def test_empty_batch_gives_zeros():
    g, c = fastmerge.ops.conv_gram(torch.zeros(0, 2, 4, 4), torch.zeros(0, 3, 2, 2), 3)
    assert g.shape == (19, 19) and c.shape == (19, 3) and not g.any() and not c.any()


def test_bad_input_names_the_argument():
    x, y = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="y must have shape"):
        fastmerge.ops.conv_gram(x, y, 2)
    with pytest.raises(ValueError, match="x must be 4-D"):
        fastmerge.ops.conv_gram(x[0], y, 3)
    with pytest.raises(TypeError, match="y"):
        fastmerge.ops.conv_gram(x, y.long(), 3)
    with pytest.raises(ValueError, match="stride"):
        fastmerge.ops.conv_gram(x, y, 3, stride=0)
    with pytest.raises(ValueError, match="kernel_size"):
        fastmerge.ops.conv_gram(x, y, 9)
