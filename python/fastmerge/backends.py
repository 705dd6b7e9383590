"""Backend registry: which implementations exist, which are usable, and which to pick.

Backends, in the order they are tried automatically:

* tensors on a CUDA device: ``cuda`` -> ``triton`` -> ``reference``
* tensors on the CPU: ``cpu`` -> ``reference``

``triton`` on CPU tensors runs only under ``TRITON_INTERPRET=1`` and only when asked
for. A backend asked for by name (the ``backend=`` argument, else the
``FASTMERGE_BACKEND`` environment variable) that cannot run raises
:class:`BackendUnavailableError` saying why; one chosen automatically falls back
silently. Native modules are imported lazily, so ``import fastmerge`` never fails
because an extension is missing.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Optional

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_BACKEND = "FASTMERGE_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run here; the message says why."""


@functools.cache
def _import(module: str) -> tuple[Optional[ModuleType], str]:
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # ImportError, or an OSError from a missing shared library
        return None, f"{type(exc).__name__}: {exc}"


def cpu_extension() -> ModuleType:
    """The compiled CPU module ``fastmerge._C``; raises if it was not built."""
    module, error = _import("fastmerge._C")
    if module is None:
        raise BackendUnavailableError(f"the CPU extension fastmerge._C is not built ({error})")
    return module


def cuda_extension() -> ModuleType:
    """The compiled CUDA module ``fastmerge._cuda``; raises if it was not built."""
    module, error = _import("fastmerge._cuda")
    if module is None:
        raise BackendUnavailableError(
            f"the CUDA extension fastmerge._cuda is not built ({error}); rebuild with a CUDA "
            "toolkit on PATH (FASTMERGE_CUDA=ON makes a missing toolkit a build error)"
        )
    return module


#: The oldest Linux driver of each CUDA major version (CUDA's minor version compatibility:
#: a module built with CUDA X.y runs on any driver of major X from this release on).
MIN_LINUX_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


def cuda_version_text(version: int) -> str:
    """CUDA's integer version (``1000 * major + 10 * minor``, as ``CUDART_VERSION`` and
    ``cudaDriverGetVersion`` give it) as text.

    Example:
        >>> cuda_version_text(13000), cuda_version_text(12080)
        ('13.0', '12.8')
    """
    return f"{version // 1000}.{version % 1000 // 10}"


def cuda_driver_problem(runtime_version: int, driver_version: int) -> Optional[str]:
    """Why a driver supporting CUDA `driver_version` (0: no driver) cannot run a module
    built with CUDA `runtime_version`, or None when it can.

    The rule is CUDA's minor version compatibility: the module carries machine code for
    its archs and links the runtime statically, so any driver of the same major version
    (or a newer one) runs it; only an older major version, or no driver, cannot.

    Example:
        >>> cuda_driver_problem(13000, 13020) is None, cuda_driver_problem(13000, 12080)[:30]
        (True, 'the CUDA driver supports CUDA ')
    """
    built = cuda_version_text(runtime_version)
    if driver_version <= 0:
        return f"no CUDA driver found (fastmerge._cuda was built with CUDA {built})"
    if driver_version // 1000 < runtime_version // 1000:
        major = runtime_version // 1000
        floor = MIN_LINUX_DRIVER.get(major)
        need = f"a CUDA {major}.x driver" + (f" (Linux {floor} or newer)" if floor else "")
        return (
            f"the CUDA driver supports CUDA {cuda_version_text(driver_version)}, but "
            f"fastmerge._cuda was built with CUDA {built} and needs {need}; update the "
            "driver, or rebuild fastmerge with the toolkit the driver supports"
        )
    return None


def _cuda_driver_error(module: ModuleType) -> Optional[str]:
    """The driver problem of the built module, or None (also for a module built before
    the versions were recorded, which cannot say)."""
    runtime = getattr(module, "cuda_runtime_version", None)
    if runtime is None or not hasattr(module, "driver_version"):
        return None
    return cuda_driver_problem(int(runtime), int(module.driver_version()))


def triton_kernels() -> ModuleType:
    """The Triton kernels package ``fastmerge.kernels``; raises if triton is missing."""
    module, error = _import("triton")
    if module is None:
        raise BackendUnavailableError(f"triton is not installed ({error}); pip install triton")
    module, error = _import("fastmerge.kernels")
    if module is None:
        raise BackendUnavailableError(f"fastmerge.kernels failed to import ({error})")
    return module


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why `backend` cannot run on tensors on `device`, or None when it can."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend takes CPU tensors, got tensors on {device}"
        return _extension_error(cpu_extension)
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend takes CUDA tensors, got tensors on {device}"
        if not torch.cuda.is_available():
            return "no CUDA GPU is available to torch"
        error = _extension_error(cuda_extension)
        if error:
            return error
        # torch may run on a driver too old for the toolkit fastmerge._cuda was built with.
        return _cuda_driver_error(cuda_extension())
    if backend == "triton":
        error = _extension_error(triton_kernels)
        if error:
            return error
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA GPU is available to torch"
        if device.type == "cpu":
            return (
                None
                if triton_interpret()
                else (
                    "triton runs on CPU tensors only in interpreter mode (set TRITON_INTERPRET=1 "
                    "before importing triton)"
                )
            )
        return f"triton does not run on {device}"
    return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"


def _extension_error(loader) -> Optional[str]:
    try:
        loader()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def resolve_backend(
    backend: Optional[str], device: torch.device, implemented: tuple[str, ...] = BACKENDS
) -> str:
    """Pick the backend for tensors on `device`.

    `backend` (or else ``$FASTMERGE_BACKEND``) names one explicitly; it must be usable or
    :class:`BackendUnavailableError` is raised. Otherwise the first usable backend of the
    device's order is returned. `implemented` lists the backends the op has.
    """
    requested = backend or os.environ.get(ENV_BACKEND) or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
        reason = (
            unavailable_reason(requested, device)
            if requested in implemented
            else f"this op has no {requested} backend (it has {', '.join(implemented)})"
        )
        if reason is not None:
            source = "backend=" if backend else f"${ENV_BACKEND}="
            raise BackendUnavailableError(f"{source}{requested!r} cannot run: {reason}")
        return requested
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        if candidate in implemented and unavailable_reason(candidate, device) is None:
            return candidate
    return "reference"


def usable_backends(device: torch.device) -> list[str]:
    """Backends that can run on tensors on `device` right now."""
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]
