"""empty_tensor: large CPU buffers on their own huge-page-aligned memory maps."""

from __future__ import annotations

import io as pyio

import pytest
import torch

from fastmerge import io
from fastmerge.io import _memory


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3,), (0, 5), (2049, 1024), (1, 3, 1 << 20)])
def test_like_torch_empty(shape, dtype):
    t = io.empty_tensor(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    t.fill_(2)
    assert bool((t == 2).all())
    assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.skipif(not _memory.huge_pages_available(), reason="no transparent huge pages")
def test_large_buffers_start_on_a_huge_page_and_free_their_map():
    t = io.empty_tensor((3 << 20,), torch.float32)
    assert t.data_ptr() % _memory.HUGE_PAGE == 0
    view = t[1:].view(torch.int32)
    del t
    view.fill_(1)  # the map lives as long as any view of it
    assert int(view.sum()) == (3 << 20) - 1


def test_saved_tensors_hold_only_their_own_bytes():
    t = io.empty_tensor((1 << 20,), torch.float32).fill_(1.5)
    buffer = pyio.BytesIO()
    torch.save(t, buffer)
    assert buffer.tell() < t.numel() * 4 + 4096
    assert torch.equal(torch.load(pyio.BytesIO(buffer.getvalue())), t)


def test_int_shape_and_small_buffers():
    assert io.empty_tensor(7).shape == (7,) and io.empty_tensor(7).dtype == torch.uint8
