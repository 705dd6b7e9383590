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
        lines.append(f"CUDA archs compiled in: {cuda.compiled_archs}")
        lines.append(f"CUDA devices seen by fastmerge._cuda: {cuda.device_count()}")
    except backends.BackendUnavailableError:
        pass
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
