"""Benchmark results pages: ``bench/results/*.json`` as Markdown pages and plots in ``docs/``.

Usage::

    python bench/report.py pages [--results bench/results] [--out docs/benchmarks]

Writes one page per results file (``<stem>.md``: the machine line from the JSON, then its
figures as tables), an index page ``results.md`` linking them, and three plots where a
picture reads faster than a table: ``lap_time_vs_n.png`` (every solver of
``linear_assignment-cpu.json``), ``merge_time_per_method.png`` (fastmerge vs mergekit from
``merge_methods-cpu.json``, with the newer ``merge_della-cpu.json`` / ``merge_sce-cpu.json``
rows as their own, labelled run) and ``twin_latency_vs_tokens.png`` (``twin-cpu.json``).
Four result formats are understood: report.py rows (a JSON list), ``fastmerge bench`` JSON
(``columns`` + ``rows``), merge-method runs (``methods``) and anything else (settings, plus
the results file's own ``.md`` page, its links turned into plain text so that the page links
only inside ``docs/``). Every figure on a page is read from the JSON; nothing is re-measured.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Callable, Optional

INDEX = "results.md"
LAP_PNG, MERGE_PNG, TWIN_PNG = (
    "lap_time_vs_n.png",
    "merge_time_per_method.png",
    "twin_latency_vs_tokens.png",
)
#: Results files whose rows are a newer measurement of some merge_methods-cpu methods.
NEWER_MERGE_RUNS = ("merge_della-cpu", "merge_sce-cpu")


def fmt(value: Any, digits: int = 4) -> str:
    """A number with `digits` significant digits; anything else as text."""
    if isinstance(value, (bool, int)) or not isinstance(value, float):
        return "" if value is None else str(value)
    if value == 0 or not math.isfinite(value):
        return str(value)
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    return f"{value:.{max(0, decimals)}f}"


def kind_of(data: Any) -> str:
    """The results format: ``rows`` (report.py), ``bench`` (fastmerge bench), ``methods``
    (merge-method runs) or ``other``."""
    if isinstance(data, list) and data and isinstance(data[0], dict) and "median" in data[0]:
        return "rows"
    if isinstance(data, dict) and isinstance(data.get("rows"), list) and "columns" in data:
        return "bench"
    if isinstance(data, dict) and isinstance(data.get("methods"), dict):
        return "methods"
    return "other"


def _load(value: Any) -> str:
    return "-".join(fmt(v, 3) for v in value) if isinstance(value, list) else fmt(value, 3)


def machine_line(data: Any) -> str:
    """The machine a results file ran on, as its JSON records it (CPU, cores, threads,
    torch, load average before/after where recorded)."""
    if isinstance(data, list):
        seen = sorted({f"{r.get('machine', '?')}, fastmerge {r.get('version', '?')}" for r in data})
        return "; ".join(seen) or "not recorded"
    if not isinstance(data, dict):
        return "not recorded"
    machine = data.get("machine")
    if isinstance(machine, str):
        parts = [machine] + ([f"torch {data['torch']}"] if "torch" in data else [])
        machine = {}
    elif isinstance(machine, dict):
        cores = machine.get("cores", machine.get("cpu_count"))
        parts = [str(machine.get("cpu", "CPU not recorded"))]
        parts += [f"{cores} cores"] if cores else []
        parts += [f"GPU {machine['gpu']}"] if machine.get("gpu") else []
        parts += [f"{machine['torch_threads']} torch threads"] if "torch_threads" in machine else []
        parts += [f"torch {machine['torch']}"] if "torch" in machine else []
        parts += [f"fastmerge {machine['fastmerge']}"] if "fastmerge" in machine else []
        parts += [f"mergekit {machine['mergekit']}"] if "mergekit" in machine else []
    else:
        return "not recorded"
    before = data.get("load_before", machine.get("load_average_before"))
    after = data.get("load_after", machine.get("load_average_after"))
    if before is not None or after is not None:
        parts.append(f"load average {_load(before)} before, {_load(after)} after")
    elif machine.get("load_average"):
        parts.append(f"load average {_load(machine['load_average'])} at start")
    return ", ".join(parts)


def _table(header: list[str], body: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(fmt(c) for c in row) + " |" for row in body]


def rows_section(data: list[dict[str, Any]]) -> list[str]:
    """report.py rows: one table per (op, workload), fastest first."""
    out: list[str] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in data:
        groups.setdefault((str(r.get("op", "")), str(r.get("x_value", ""))), []).append(r)
    for (op, x), members in groups.items():
        unit = members[0].get("unit", "")
        out += ["", f"## {op} {x}".rstrip(), ""]
        body = [
            [f"`{r.get('provider')}`", r.get("median"), r.get("p20"), r.get("p80")]
            for r in sorted(members, key=lambda r: r["median"])
        ]
        out += _table(["provider", f"median ({unit})", "p20", "p80"], body)
    return out


def bench_section(data: dict[str, Any]) -> list[str]:
    """fastmerge bench JSON: one table per suite, in the rows' order."""
    out: list[str] = []
    suites: dict[str, list[dict[str, Any]]] = {}
    for r in data["rows"]:
        suites.setdefault(str(r.get("suite", "")), []).append(r)
    for suite, members in suites.items():
        out += ["", f"## {suite}", ""]
        body = [
            [
                f"`{r.get('case')}`",
                f"`{r.get('provider')}`",
                r.get("x_value"),
                r.get("median"),
                r.get("unit", ""),
                r.get("iqr"),
                r.get("ratio"),
            ]
            for r in members
        ]
        out += _table(["case", "provider", "x", "median", "unit", "IQR", "ratio"], body)
    out += ["", "ratio: the case's anchor time over the row's time (above 1: faster)."]
    return out


def fastmerge_wall(m: dict[str, Any]) -> float:
    """fastmerge's median wall time of a merge-method entry, in seconds."""
    return statistics.median(m["seconds"]) if m.get("seconds") else m["merge_s"]


def methods_section(data: dict[str, Any]) -> list[str]:
    """Merge-method runs: fastmerge's median wall time beside mergekit's, per method."""
    header = ["method", "fastmerge wall s (median)", "mergekit wall s", "speed-up"]
    header += ["fastmerge RSS MiB", "mergekit RSS MiB", "max abs. diff"]
    body = []
    for name, m in data["methods"].items():
        wall, peer = fastmerge_wall(m), m.get("mergekit_s")
        body.append(
            [
                f"`{name}`",
                wall,
                peer,
                f"{fmt(peer / wall, 3)}x" if peer else "",
                m.get("peak_rss_mib"),
                m.get("mergekit_rss_mib"),
                (m.get("agreement") or {}).get("max_abs_diff"),
            ]
        )
    shape = data.get("shape")
    out = ["", f"{data.get('rounds', '?')} fastmerge round(s) per method"]
    out[-1] += f"; checkpoint shape {json.dumps(shape)}." if shape else "."
    return out + [""] + _table(header, body)


_LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)[^)]*\)")


def other_section(data: Any, md: Optional[Path]) -> list[str]:
    """Any other results file: its scalar settings, then its own .md page (headings one
    level down, links as plain text)."""
    out: list[str] = []
    if isinstance(data, dict):
        scalars = [
            [f"`{k}`", v]
            for k, v in data.items()
            if k != "machine" and (v is None or isinstance(v, (str, int, float, bool)))
        ]
        if scalars:
            out += ["", "## Settings", ""] + _table(["key", "value"], scalars)
    if md is not None and md.exists():
        text = _LINK.sub(lambda m: f"{m.group(1) or 'file'} (`{m.group(2)}`)", md.read_text())
        text = re.sub(r"^(#+) ", r"\1# ", text, flags=re.M)
        out += ["", f"## From `bench/results/{md.name}`", "", text.rstrip()]
    return out


SECTIONS: dict[str, Callable[..., list[str]]] = {
    "rows": rows_section,
    "bench": bench_section,
    "methods": methods_section,
}


def _write(path: Path, writer: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename (nothing partial)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """`text` to `path`, atomically."""
    _write(path, lambda p: p.write_text(text))


def save_figure(fig: Any, path: Path) -> None:
    """A matplotlib figure to `path` as PNG, atomically, and closed."""
    import matplotlib.pyplot as plt

    _write(path, lambda p: fig.savefig(p, format="png", dpi=110, metadata={"Software": None}))
    plt.close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lap(data: dict[str, Any], path: Path) -> None:
    """Median time vs n for every solver, one panel per cost family (log-log)."""
    plt = _pyplot()
    families: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in data["rows"]:
        family = str(r["case"]).rsplit("-", 1)[0]
        if r.get("x_name") == "n" and family != "batch":
            scale = {"s": 1e3, "ms": 1.0, "us": 1e-3}.get(r.get("unit", "s"), 1e3)
            line = families.setdefault(family, {}).setdefault(r["provider"], [])
            line.append((int(r["x_value"]), r["median"] * scale))
    fig, axes = plt.subplots(1, len(families), figsize=(5.2 * len(families), 4.2), squeeze=False)
    for ax, (family, lines) in zip(axes[0], families.items()):
        for provider, points in lines.items():
            points.sort()
            ax.plot(*zip(*points), marker="o", ms=3, label=provider)
        ax.set(xscale="log", yscale="log", xlabel="n (n x n cost matrix)", ylabel="median ms")
        ax.set_title(f"{family} costs")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Linear assignment, time vs n: {machine_line(data)}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_merge(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """fastmerge's median wall time beside mergekit's per method; one panel per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.6 * len(runs)), squeeze=False)
    for ax, (stem, data) in zip(axes[:, 0], runs.items()):
        names = list(data["methods"])
        ours = [fastmerge_wall(data["methods"][n]) for n in names]
        peer = [data["methods"][n].get("mergekit_s") or float("nan") for n in names]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], ours, 0.4, label="fastmerge (median wall)")
        ax.bar([x + 0.2 for x in xs], peer, 0.4, label="mergekit (wall)")
        for x, a, b in zip(xs, ours, peer):
            if b == b:
                ax.annotate(f"{b / a:.1f}x", (x, max(a, b)), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set(yscale="log", ylabel="seconds, whole command")
        ax.set_title(textwrap.fill(f"run {stem}: {machine_line(data)}", 150), fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_twin(data: list[dict[str, Any]], path: Path) -> None:
    """Median latency of one batch vs tokens per sample, per provider."""
    plt = _pyplot()
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in data:
        tokens = re.search(r"-L(\d+)$", str(r.get("x_value", "")))
        if r.get("op") == "twin" and tokens:
            lines.setdefault(r["provider"], []).append((int(tokens.group(1)), r["median"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for provider, points in lines.items():
        points.sort()
        ax.plot(*zip(*points), marker="o", label=provider)
    ax.set(yscale="log", xlabel="tokens per sample", ylabel=f"median {data[0].get('unit', 'ms')}")
    ax.set_title(f"Twin-Merging, one batch: {machine_line(data)}", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _image(png: str, alt: str) -> list[str]:
    return ["", f"![{alt}]({png})"]


def write_pages(results: Path, out: Path) -> list[Path]:
    """Write every page and plot for the JSON files in `results` into `out`; return them.

    Example:
        >>> import json, tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> row = {"op": "x", "provider": "p", "unit": "ms", "x_value": "w", "median": 1.0}
        >>> _ = (d / "x-cpu.json").write_text(json.dumps([dict(row, machine="CPU")]))
        >>> sorted(p.name for p in write_pages(d, d / "pages"))
        ['results.md', 'x-cpu.md']
    """
    files = sorted(results.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"report pages: no *.json results in {results}")
    out.mkdir(parents=True, exist_ok=True)
    loaded = {f.stem: json.loads(f.read_text()) for f in files}
    written: list[Path] = []
    plots: dict[str, tuple[str, str]] = {}  # stem -> (png, alt)
    lap = loaded.get("linear_assignment-cpu")
    if kind_of(lap) == "bench":
        plot_lap(lap, out / LAP_PNG)
        plots["linear_assignment-cpu"] = (LAP_PNG, "LAP time vs n for every solver")
    if kind_of(loaded.get("merge_methods-cpu")) == "methods":
        runs = {"merge_methods-cpu": loaded["merge_methods-cpu"]}
        runs |= {s: loaded[s] for s in NEWER_MERGE_RUNS if kind_of(loaded.get(s)) == "methods"}
        plot_merge(runs, out / MERGE_PNG)
        for stem in runs:
            plots[stem] = (MERGE_PNG, "merge time per method, fastmerge vs mergekit")
    if kind_of(loaded.get("twin-cpu")) == "rows":
        plot_twin(loaded["twin-cpu"], out / TWIN_PNG)
        plots["twin-cpu"] = (TWIN_PNG, "Twin latency vs tokens")
    written += [out / png for png, _ in set(plots.values())]

    index = [
        "# Benchmark results",
        "",
        "Generated by `python bench/report.py pages` from `bench/results/*.json`: one page per",
        "results file, each with the machine it ran on. The machines are shared 2-core hosts;",
        "read ratios measured side by side in one run, not absolute times across runs.",
    ]
    for png, alt in dict.fromkeys(plots.values()):
        index += _image(png, alt)
    index += ["", "| results | format | machine |", "|---|---|---|"]
    for stem, data in loaded.items():
        kind = kind_of(data)
        page = [f"# {stem}", "", f"Machine: {machine_line(data)}.", ""]
        page += [f"Source: `bench/results/{stem}.json` ({kind} format). [All results]({INDEX})"]
        if stem in plots:
            page += _image(*plots[stem])
        if stem == "merge_methods-cpu":
            newer = [s for s in NEWER_MERGE_RUNS if s in plots]
            if newer:
                links = ", ".join(f"[{s}]({s}.md)" for s in newer)
                page += [
                    "",
                    f"Newer measurements of some of these methods, each its own run: {links}.",
                ]
        if stem in NEWER_MERGE_RUNS:
            page += [
                "",
                "A newer run than [merge_methods-cpu](merge_methods-cpu.md), on its own machine.",
            ]
        md = results / f"{stem}.md"
        section = SECTIONS.get(kind)
        page += section(data) if section else other_section(data, md)
        write_text(out / f"{stem}.md", "\n".join(page) + "\n")
        written.append(out / f"{stem}.md")
        index.append(f"| [{stem}]({stem}.md) | {kind} | {machine_line(data)} |")
    write_text(out / INDEX, "\n".join(index) + "\n")
    return [out / INDEX] + written


def main(argv: Optional[list[str]] = None) -> None:
    """``report.py pages``: parse the arguments and write the pages."""
    import argparse

    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(prog="report.py pages", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=root / "bench" / "results")
    parser.add_argument("--out", type=Path, default=root / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    for path in write_pages(args.results, args.out):
        print(path)
