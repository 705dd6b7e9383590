"""Shared test set-up.

Triton kernels run on this CPU-only machine in interpreter mode, which must be chosen
before triton is imported. CUDA tests run only where a GPU is present.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def backend_params():
    """(backend, device) pairs for every non-reference backend, skipped where unusable."""
    return [
        pytest.param("cpu", "cpu", id="cpu"),
        pytest.param(
            "triton",
            "cpu",
            id="triton-interpret",
            marks=[
                pytest.mark.triton,
                pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
            ],
        ),
        pytest.param(
            "cuda",
            "cuda",
            id="cuda",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")],
        ),
        pytest.param(
            "triton",
            "cuda",
            id="triton-cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.triton,
                pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="no CUDA GPU"),
            ],
        ),
    ]


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose backends explicitly; a developer's FASTMERGE_BACKEND must not leak in."""
    monkeypatch.delenv("FASTMERGE_BACKEND", raising=False)
