"""The machine a run was measured on: CPU, cores, GPU, threads, load and versions."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from fastmerge import backends
from fastmerge._version import __version__

from . import _peers


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform``).

    Example:
        >>> isinstance(cpu_model(), str)
        True
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str = "cpu") -> dict[str, Any]:
    """Everything the table's header shows, as a dict (also the JSON's ``machine``).

    Example:
        >>> describe()["cores"] >= 1
        True
    """
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on this platform
        load = None
    try:
        fm_threads = int(backends.cpu_extension().get_num_threads())
    except Exception:  # the native module is missing: the reference backend still runs
        fm_threads = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "fastmerge_threads": fm_threads,
        "load_average": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fastmerge": __version__,
        "peers": {k: v for k, v in _peers.versions().items() if v},
    }


def short(machine: dict[str, Any]) -> str:
    """One line: ``"<cpu> x<cores>[, <gpu>]"``, the rows' ``machine`` column.

    Example:
        >>> short({"cpu": "Some CPU", "cores": 2, "gpu": None})
        'Some CPU x2'
    """
    text = f"{machine['cpu']} x{machine['cores']}"
    return text + (f", {machine['gpu']}" if machine.get("gpu") else "")


def header(machine: dict[str, Any]) -> str:
    """The lines printed above the tables (a markdown list, so that a saved report reads
    well as a page too).

    Example:
        >>> header(describe()).startswith("- machine: ")
        True
    """
    load = machine["load_average"]
    peers = ", ".join(f"{k} {v}" for k, v in machine["peers"].items()) or "none installed"
    return "\n".join(
        [
            f"- machine: {short(machine)}; device {machine['device']}",
            f"- threads: torch {machine['torch_threads']},"
            f" fastmerge {machine['fastmerge_threads']};"
            f" load average {' '.join(map(str, load)) if load else 'n/a'}",
            f"- versions: fastmerge {machine['fastmerge']}, torch {machine['torch']}"
            f" (CUDA {machine['cuda']}), python {machine['python']}; peers: {peers}",
        ]
    )
