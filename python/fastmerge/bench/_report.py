"""Rows with fixed columns, the side-by-side markdown table, and the JSON file."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from . import _machine

#: The JSON rows' columns, in order (docs/benchmarks.md describes each).
COLUMNS = (
    "suite",
    "case",
    "provider",
    "metric",
    "unit",
    "x_name",
    "x_value",
    "median",
    "iqr",
    "ratio",
    "target",
    "machine",
    "version",
)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``ratio``: its median over the median of the first fastmerge row
    (``ours``) of its suite and case; None when the group has none.

    Example:
        >>> rows = [dict(suite="s", case="c", provider="fm", ours=True, median=1.0),
        ...         dict(suite="s", case="c", provider="peer", ours=False, median=3.0)]
        >>> add_ratios(rows); [r["ratio"] for r in rows]
        [1.0, 3.0]
    """
    reference: dict[tuple[str, str], float] = {}
    for row in rows:
        if row.get("ours"):
            reference.setdefault((row["suite"], row["case"]), row["median"])
    for row in rows:
        ref = reference.get((row["suite"], row["case"]))
        row["ratio"] = row["median"] / ref if ref else None


def fmt_time(seconds: Optional[float]) -> str:
    """A time with a unit that keeps three significant digits readable.

    Example:
        >>> fmt_time(2.5e-6), fmt_time(0.0123), fmt_time(3.0)
        ('2.50 us', '12.3 ms', '3.00 s')
    """
    if seconds is None or not math.isfinite(seconds):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if abs(seconds) >= scale or unit == "ns":
            value = seconds / scale
            digits = 0 if value >= 100 else 1 if value >= 10 else 2
            return f"{value:.{digits}f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def table(rows: list[dict[str, Any]], suite: str) -> str:
    """The markdown table of one suite: case, provider, median, IQR, ratio (and target).

    Example:
        >>> print(table([dict(suite="s", case="c", provider="fm", median=1e-3, iqr=1e-4,
        ...                   ratio=1.0, target=None)], "s"))
        | case | provider | median | IQR | x fastmerge |
        |---|---|---:|---:|---:|
        | c | fm | 1.00 ms | 100 us | 1.00 |
    """
    mine = [r for r in rows if r["suite"] == suite]
    targets = any(r.get("target") is not None for r in mine)
    head = ["case", "provider", "median", "IQR", "x fastmerge"]
    head += ["target", "<= target"] if targets else []
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in mine:
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        cells = [r["case"], r["provider"], fmt_time(r["median"]), fmt_time(r["iqr"]), ratio]
        if targets:
            target = r.get("target")
            met = "-" if target is None else ("yes" if r["median"] <= target else "no")
            cells += [fmt_time(target), met]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(
    rows: list[dict[str, Any]],
    machine: dict[str, Any],
    notes: list[str],
    seconds: Optional[dict[str, float]] = None,
) -> str:
    """The whole report: machine header, notes, one table per suite (with its wall time,
    set-up included, when `seconds` has it), the ratio's meaning.

    Example:
        >>> render([], _machine.describe(), []).startswith("- machine: ")
        True
    """
    parts = [_machine.header(machine)]
    parts += [""] + notes if notes else []
    for suite in dict.fromkeys(r["suite"] for r in rows):
        took = f" ({seconds[suite]:.1f} s)" if seconds and suite in seconds else ""
        parts += ["", f"### {suite}{took}", "", table(rows, suite)]
    parts += [
        "",
        "median and IQR: seconds per call over timed rounds; x fastmerge: the row's median "
        "over the group's first fastmerge row (a peer's value is fastmerge's speed-up).",
    ]
    return "\n".join(parts)


def json_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` reduced to :data:`COLUMNS`, in that order.

    Example:
        >>> list(json_rows([dict.fromkeys(COLUMNS, 0)])[0]) == list(COLUMNS)
        True
    """
    return [{c: r.get(c) for c in COLUMNS} for r in rows]


def write_json(path: Path, rows: list[dict[str, Any]], machine: dict[str, Any]) -> None:
    """Write ``{"columns", "machine", "rows"}`` to `path` atomically (temp file, rename).

    Example:
        >>> import tempfile, pathlib, json
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "r.json"
        >>> write_json(out, [], {"cpu": "x"}); json.loads(out.read_text())["rows"]
        []
    """
    path = Path(path)
    payload = {"columns": list(COLUMNS), "machine": machine, "rows": json_rows(rows)}
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
