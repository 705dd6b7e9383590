"""Optional display helpers: a tqdm progress bar and matplotlib PNGs (both optional extras)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import Optional, TypeVar

T = TypeVar("T")


def progress_bar(
    items: Iterable[T], enabled: bool, desc: str, total: Optional[int] = None
) -> Iterator[T]:
    """``items`` wrapped in a tqdm bar when ``enabled`` and tqdm is installed, else as is."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # progress is a nicety; tqdm is an optional dependency
            return iter(items)
        return iter(tqdm(items, desc=desc, total=total, leave=False))
    return iter(items)


def new_figure(size: tuple[float, float]):
    """A matplotlib ``Figure`` that is not registered with pyplot (no GUI backend, no global
    state), or an ImportError telling how to install matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "plotting needs matplotlib: pip install 'fastmerge[plot]' (or matplotlib)"
        ) from e
    return Figure(figsize=size)


def save_png(fig, path) -> None:
    """Write ``fig`` as a PNG at ``path`` atomically (temp file, then rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
