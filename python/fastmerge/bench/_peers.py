"""Optional peers: imported when installed, else skipped with a one-line note.

Peers come with the ``bench`` extra (``pip install "fastmerge[bench]"``); a missing one
never fails a run. The notes are collected here and printed once by the runner.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from types import ModuleType
from typing import Optional

#: import name -> distribution name, for the notes and the machine's version list.
PEERS = {
    "scipy": "scipy",
    "lap": "lap",
    "lapjv": "lapjv",
    "torch_linear_assignment": "torch-linear-assignment",
    "mergekit": "mergekit",
}

_notes: list[str] = []


def optional(module: str) -> Optional[ModuleType]:
    """The peer module `module` (e.g. ``"scipy.optimize"``), or None with a note.

    Example:
        >>> optional("no_such_peer_module") is None
        True
        >>> take_notes()[-1].startswith("note: no_such_peer_module is not installed")
        True
    """
    try:
        return importlib.import_module(module)
    except Exception:  # ImportError, or a broken install of the peer: skip it alike
        top = module.split(".")[0]
        note(
            f"{PEERS.get(top, top)} is not installed: its rows are skipped "
            '(pip install "fastmerge[bench]")'
        )
        return None


def note(text: str) -> None:
    """Record a one-line note for the run's output (each distinct note once)."""
    line = text if text.startswith("note: ") else f"note: {text}"
    if line not in _notes:
        _notes.append(line)


def take_notes() -> list[str]:
    """The notes recorded so far (kept, so that a repeated import does not note twice).

    Example:
        >>> isinstance(take_notes(), list)
        True
    """
    return list(_notes)


def versions() -> dict[str, Optional[str]]:
    """Installed version of every peer distribution (None when absent).

    Example:
        >>> "scipy" in versions()
        True
    """
    found: dict[str, Optional[str]] = {}
    for dist in PEERS.values():
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found
