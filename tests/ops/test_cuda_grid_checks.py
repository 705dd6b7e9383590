"""The CUDA launchers refuse sizes past CUDA's grid limits (and the magnitude threshold's
32-bit histogram counts) with a ValueError before they queue any work, so these checks
run wherever fastmerge._cuda is built, without a GPU (null pointers are never touched)."""

from __future__ import annotations

import pytest
import torch

from fastmerge import backends

FLOAT32 = 2  # csrc/include/fastmerge/dtypes.h


def _cuda():
    try:
        return backends.cuda_extension()
    except backends.BackendUnavailableError:
        return None


pytestmark = pytest.mark.skipif(_cuda() is None, reason="fastmerge._cuda is not built here")


def test_magnitude_threshold_refuses_more_entries_than_its_counts_hold():
    with pytest.raises(ValueError, match=r"4294967296 entries per expert exceed the CUDA"):
        _cuda().magnitude_threshold(0, 0, 1, 2**32, FLOAT32, 1, 0, 0, 0, 0, 0)


@pytest.mark.parametrize("rank, d_out", [(65535 * 32 + 1, 4), (4, 65535 * 64 + 1)])
def test_lowrank_mixture_refuses_tiles_past_grid_y(rank, d_out):
    with pytest.raises(ValueError, match=r"lowrank_mixture: rank .* \(grid\.y holds 65535 tiles\)"):
        _cuda().lowrank_mixture(0, FLOAT32, 1, 1, d_out, 1, rank, 1, 0, 0, 0, 0, 0, 0)


def test_conv_gram_refuses_row_tiles_past_grid_y():
    # n, c_in, h, w, c_out, h_out, w_out, kh, kw, sh, sw, ph, pw, dh, dw, bias
    c_in = 65535 * 32 + 1
    geometry = torch.tensor([1, c_in, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0])
    with pytest.raises(ValueError, match=rf"conv_gram: {c_in} features .* 65536 row tiles"):
        _cuda().conv_gram(0, 0, FLOAT32, geometry.data_ptr(), 0, 0)
