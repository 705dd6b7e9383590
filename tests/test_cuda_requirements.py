"""The CUDA requirements of fastmerge._cuda: the driver/runtime comparison, the cuda
backend's BackendUnavailableError for an unusable driver, the `fastmerge info` lines, and
(where the extension is built) the recorded versions and the PTX of the highest arch."""

from __future__ import annotations

import doctest
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import torch

from fastmerge import backends
from fastmerge.cli import info


@pytest.mark.parametrize(
    "runtime, driver, problem",
    [
        (13000, 13000, None),
        (13000, 13020, None),  # a newer minor version
        (13020, 13000, None),  # an older minor version: CUDA's minor version compatibility
        (12080, 13000, None),  # a newer major version runs older modules
        (13000, 12080, "the CUDA driver supports CUDA 12.8, but fastmerge._cuda was built "),
        (13000, 0, "no CUDA driver found (fastmerge._cuda was built with CUDA 13.0)"),
        (12040, 11080, "needs a CUDA 12.x driver (Linux 525.60.13 or newer)"),
    ],
)
def test_cuda_driver_problem(runtime, driver, problem):
    got = backends.cuda_driver_problem(runtime, driver)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got


def test_cuda_version_text():
    assert backends.cuda_version_text(13000) == "13.0"
    assert backends.cuda_version_text(12080) == "12.8"
    assert backends.cuda_version_text(11020) == "11.2"


def _fake_cuda(runtime: int, driver: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        __file__="/fake/_cuda.so",
        compiled_archs="80,90",
        ptx_arch="90",
        cuda_runtime_version=runtime,
        driver_version=lambda: driver,
        device_count=lambda: 0,
    )


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch sees a GPU and fastmerge._cuda is the returned namespace's `module`."""
    state = types.SimpleNamespace(module=_fake_cuda(13000, 13000))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "cuda_extension", lambda: state.module)
    return state


def test_an_old_driver_makes_the_cuda_backend_unavailable_with_the_reason(fake_gpu):
    device = torch.device("cuda", 0)
    fake_gpu.module = _fake_cuda(13000, 12080)
    reason = backends.unavailable_reason("cuda", device)
    assert reason is not None and "supports CUDA 12.8" in reason and "CUDA 13.0" in reason
    with pytest.raises(backends.BackendUnavailableError, match="supports CUDA 12.8"):
        backends.resolve_backend("cuda", device)
    # Chosen automatically, the cuda backend is skipped, not an error.
    assert backends.resolve_backend(None, device, ("reference", "cuda")) == "reference"


def test_a_missing_driver_makes_the_cuda_backend_unavailable(fake_gpu):
    fake_gpu.module = _fake_cuda(13000, 0)
    reason = backends.unavailable_reason("cuda", torch.device("cuda"))
    assert reason is not None and reason.startswith("no CUDA driver found")


def test_a_matching_driver_leaves_the_cuda_backend_usable(fake_gpu):
    fake_gpu.module = _fake_cuda(13000, 13020)
    assert backends.unavailable_reason("cuda", torch.device("cuda")) is None


def test_a_module_without_the_version_record_is_not_refused(fake_gpu):
    fake_gpu.module = types.SimpleNamespace(device_count=lambda: 1)
    assert backends.unavailable_reason("cuda", torch.device("cuda")) is None


@pytest.mark.parametrize(
    "driver, verdict",
    [
        (13000, "CUDA driver: CUDA 13.0; can run fastmerge._cuda"),
        (12080, "CUDA driver: CUDA 12.8; cannot run it: the CUDA driver supports CUDA 12.8"),
        (0, "CUDA driver: no driver; cannot run it: no CUDA driver found"),
    ],
)
def test_info_says_which_runtime_is_needed_and_whether_the_driver_runs_it(driver, verdict):
    lines = info.cuda_requirement_lines(_fake_cuda(13000, driver))
    assert lines[0] == (
        "CUDA runtime needed: built with CUDA 13.0 (static runtime); needs a CUDA 13.x driver "
        "or newer (Linux 580.65.06+)"
    )
    assert lines[1].startswith(verdict), lines[1]


def test_info_text_has_the_cuda_lines(monkeypatch):
    monkeypatch.setattr(backends, "cuda_extension", lambda: _fake_cuda(13000, 0))
    text = info.info_text()
    assert "CUDA archs compiled in: 80,90 (PTX for sm_90, JIT-compiled on newer GPUs)" in text
    assert "CUDA runtime needed: built with CUDA 13.0" in text
    assert "CUDA driver: no driver; cannot run it" in text


def test_docstring_examples():
    from fastmerge.kernels import _launch

    for module in (backends, _launch):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def _cuobjdump():
    """cuobjdump from PATH, else the copy that triton's NVIDIA backend bundles."""
    found = shutil.which("cuobjdump")
    if found is None:
        try:
            import triton
        except ImportError:
            return None
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        found = str(bundled) if bundled.is_file() else None
    return found


def _built_cuda():
    try:
        return backends.cuda_extension()
    except backends.BackendUnavailableError:
        return None


@pytest.mark.skipif(_built_cuda() is None, reason="fastmerge._cuda is not built here")
def test_the_built_module_records_its_versions_and_ships_ptx_for_the_highest_arch():
    cuda = _built_cuda()
    assert cuda.cuda_runtime_version >= 11000
    assert cuda.driver_version() >= 0  # callable without a GPU (0: no driver)
    archs = cuda.compiled_archs.split(",")
    assert cuda.ptx_arch == max(archs, key=int)
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's bundled one)")
    ptx = subprocess.run(
        [cuobjdump, "--list-ptx", cuda.__file__], capture_output=True, text=True, check=True
    ).stdout
    elf = subprocess.run(
        [cuobjdump, "--list-elf", cuda.__file__], capture_output=True, text=True, check=True
    ).stdout
    assert f"sm_{cuda.ptx_arch}" in ptx
    assert all(f"sm_{arch}" not in ptx for arch in archs if arch != cuda.ptx_arch)
    assert all(f"sm_{arch}" in elf for arch in archs)
