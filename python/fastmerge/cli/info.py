"""``fastmerge info``: what is built and usable here."""

from __future__ import annotations

import torch

from .. import backends
from .._version import __version__


def _extension_line(name: str, loader) -> str:
    try:
        module = loader()
    except backends.BackendUnavailableError as exc:
        return f"{name}: not available ({exc})"
    return f"{name}: built ({module.__file__})"


def cuda_requirement_lines(cuda) -> list[str]:
    """Which CUDA `cuda` (the fastmerge._cuda module) needs, and whether this machine's
    driver can run it: the reason from :func:`fastmerge.backends.cuda_driver_problem`."""
    runtime = getattr(cuda, "cuda_runtime_version", None)
    if runtime is None:
        return ["CUDA runtime needed: unknown (fastmerge._cuda predates the version record)"]
    major = int(runtime) // 1000
    floor = backends.MIN_LINUX_DRIVER.get(major)
    lines = [
        f"CUDA runtime needed: built with CUDA {backends.cuda_version_text(int(runtime))} "
        f"(static runtime); needs a CUDA {major}.x driver or newer"
        + (f" (Linux {floor}+)" if floor else "")
    ]
    driver = int(cuda.driver_version())
    problem = backends.cuda_driver_problem(int(runtime), driver)
    seen = f"CUDA {backends.cuda_version_text(driver)}" if driver > 0 else "no driver"
    verdict = "can run fastmerge._cuda" if problem is None else f"cannot run it: {problem}"
    lines.append(f"CUDA driver: {seen}; {verdict}")
    return lines


def info_text() -> str:
    """A human-readable report of the installation.

    Example:
        >>> "fastmerge" in info_text()
        True
    """
    lines = [f"fastmerge {__version__} (torch {torch.__version__})"]
    lines.append(_extension_line("fastmerge._C (cpu)", backends.cpu_extension))
    lines.append(_extension_line("fastmerge._cuda (cuda)", backends.cuda_extension))
    try:
        cuda = backends.cuda_extension()
    except backends.BackendUnavailableError:
        cuda = None
    if cuda is not None:
        ptx = getattr(cuda, "ptx_arch", "")
        lines.append(
            f"CUDA archs compiled in: {cuda.compiled_archs}"
            + (f" (PTX for sm_{ptx}, JIT-compiled on newer GPUs)" if ptx else "")
        )
        lines.extend(cuda_requirement_lines(cuda))
        lines.append(f"CUDA devices seen by fastmerge._cuda: {cuda.device_count()}")
    try:
        import triton

        lines.append(f"triton: {triton.__version__} (interpreter: {backends.triton_interpret()})")
    except ImportError:
        lines.append("triton: not installed")
    try:
        threads = backends.cpu_extension().get_num_threads()
    except backends.BackendUnavailableError:
        threads = "n/a"
    lines.append(f"CPU threads: {threads}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    for device in devices:
        usable = ", ".join(backends.usable_backends(device))
        lines.append(f"usable backends for {device.type} tensors: {usable}")
    lines.append("FASTMERGE_BACKEND overrides the automatic choice; see fastmerge.backends")
    return "\n".join(lines)
