"""``fastmerge bench [OP|all]``: run the benchmark suites of a source checkout.

The suites live in the repository's ``bench/`` directory and are not part of the wheel:
this command finds them from the current directory (or ``$FASTMERGE_BENCH_DIR``) and
runs them with pytest-benchmark, then prints the tables with ``bench/report.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional


def find_bench_dir(start: Optional[Path] = None) -> Optional[Path]:
    """The ``bench/`` directory of a fastmerge source checkout at or above `start`
    (default: the current directory), or ``$FASTMERGE_BENCH_DIR``; None if not found.

    Example:
        >>> find_bench_dir(Path("/")) is None or True
        True
    """
    env = os.environ.get("FASTMERGE_BENCH_DIR")
    if env:
        return Path(env) if (Path(env) / "conftest.py").is_file() else None
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        bench = d / "bench"
        if (bench / "conftest.py").is_file() and (bench / "report.py").is_file():
            return bench
    return None


def suites(bench: Path, op: str) -> list[Path]:
    """The suite files for `op` (``all``: every ``bench_*.py``)."""
    files = sorted(bench.glob("bench_*.py"))
    if op == "all":
        return files
    return [f for f in files if f.stem == f"bench_{op}"]


def bench_command(op: str, device: Optional[str]) -> int:
    """Run the suites and print their tables; 2 when the suites or the op are not found."""
    bench = find_bench_dir()
    if bench is None:
        print(
            "fastmerge bench: error: the benchmark suites are not installed with the wheel; "
            "run this from a fastmerge source checkout (or set FASTMERGE_BENCH_DIR to its bench/)",
            file=sys.stderr,
        )
        return 2
    files = suites(bench, op)
    if not files:
        names = ", ".join(f.stem.removeprefix("bench_") for f in suites(bench, "all"))
        print(f"fastmerge bench: error: no suite {op!r}; valid: all, {names}", file=sys.stderr)
        return 2
    results = bench / "results"
    results.mkdir(exist_ok=True)
    raw = results / f"{op}-cli.raw.json"
    cmd = [sys.executable, "-m", "pytest", *map(str, files), f"--benchmark-json={raw}", "-q"]
    if device:
        cmd += ["-k", device if device != "cpu" else "not cuda"]
    status = subprocess.call(cmd, cwd=bench.parent)
    if status != 0 or not raw.is_file():
        return status or 1
    return subprocess.call([sys.executable, str(bench / "report.py"), str(raw)], cwd=bench.parent)
