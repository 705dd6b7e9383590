"""Side-by-side tables from a pytest-benchmark JSON file.

Usage::

    python bench/report.py bench/results/cpu.raw.json [--anchor PROVIDER ...] [--name NAME]
    python bench/report.py pages [--results bench/results] [--out docs/benchmarks]

For each benchmark group it prints a markdown table (provider, median, p20, p80, GB/s and
the ratios to the anchors) and writes ``<out-dir>/<name>.md``, plus ``<name>.json`` and
``<name>.csv`` with one row per measurement in fixed columns (Liger-Kernel's row style).
Ratios are ``anchor median / provider median``: for the default scope_stats anchors that
is the speed-up over the ``torch.std_mean`` loop and the fraction of ``torch.sum``'s
bytes/s; for the WSA group, the speed-up over the autograd loop.

``pages`` writes the results pages and plots under ``docs/benchmarks/`` instead (see
``bench/report_pages.py``).

p20/p80 are computed from the per-round timings, which ``--benchmark-json`` always stores.
Files without them (``--benchmark-save`` without ``--benchmark-save-data``) fall back to
pytest-benchmark's q1/q3, labelled p25/p75 in the table and left blank in the CSV/JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

COLUMNS = (
    "op",
    "provider",
    "metric",
    "unit",
    "x_name",
    "x_value",
    "median",
    "p20",
    "p80",
    "machine",
    "version",
)
# A pseudo-provider: the fastest provider of the group that is not fastmerge.
FASTEST_PEER = "@fastest-peer"
# Anchors whose ratio compares FLOP rates (extra_info "flops" / median), not medians.
FLOP_RATE_ANCHORS = {"torch.matmul"}
# Default anchors per op: (provider, column header).
DEFAULT_ANCHORS: dict[str, list[tuple[str, str]]] = {
    "scope_stats": [
        ("torch.std_mean-loop", "speed-up vs std_mean loop"),
        ("torch.sum-flat", "fraction of torch.sum bytes/s"),
    ],
    "wsa_penalty": [("autograd-loop", "speed-up vs autograd loop")],
    "feature_stats": [
        ("torch.matmul", "fraction of torch.matmul FLOP/s"),
        ("torch.corrcoef-concat", "speed-up vs torch.corrcoef"),
    ],
    "linear_assignment": [(FASTEST_PEER, "fastest peer median / median")],
    "least_squares": [("torch.linalg.lstsq", "speed-up vs torch.linalg.lstsq")],
    "pleas_least_squares": [("adam-400", "speed-up vs 400 Adam steps")],
    "ties": [("torch.kthvalue-loop", "speed-up vs torch.kthvalue loop")],
    "lowrank_mixture": [
        ("torch.nn.Linear-static", "static nn.Linear time / time (per sample)"),
        ("naive-merge-per-sample", "throughput vs naive per-sample merge (dense deltas)"),
    ],
    "twin": [
        ("reference-per-sample", "throughput vs per-sample materialization"),
        ("torch-static-shared", "static shared model time / time"),
    ],
}


@dataclass
class Result:
    """One benchmark's summary, times in milliseconds."""

    group: str
    op: str
    provider: str
    workload: str
    device: str
    nbytes: Optional[int]
    median: float
    lo: float  # p20, or q1 when the per-round data is missing
    hi: float  # p80, or q3
    exact_quantiles: bool  # True: lo/hi are p20/p80 from the data
    flops: Optional[float] = None  # floating-point operations of one call, if recorded
    samples: Optional[int] = None  # samples one call processes, if recorded (per-sample ratios)


def fmt(value: float, digits: int) -> str:
    """`value` with `digits` significant digits, in fixed notation (trailing zeros kept)."""
    decimals = digits - 1 - math.floor(math.log10(abs(value))) if value else 0
    return f"{value:.{max(0, decimals)}f}"


def load_results(raw: dict[str, Any]) -> list[Result]:
    """Summaries of every benchmark in a pytest-benchmark JSON document."""
    results = []
    for bench in raw["benchmarks"]:
        stats, info = bench["stats"], bench.get("extra_info", {})
        data = stats.get("data")
        if data:
            lo, hi = (float(q) for q in np.percentile(data, [20, 80]))
        else:
            lo, hi = stats["q1"], stats["q3"]
        results.append(
            Result(
                group=bench["group"] or bench["name"],
                op=info.get("op", (bench["group"] or "").split("-")[0]),
                provider=info.get("provider", bench["name"]),
                workload=info.get("workload", ""),
                device=info.get("device", "cpu"),
                nbytes=info.get("bytes"),
                median=stats["median"] * 1e3,
                lo=lo * 1e3,
                hi=hi * 1e3,
                exact_quantiles=bool(data),
                flops=info.get("flops"),
                samples=info.get("samples"),
            )
        )
    return results


def describe_machine(machine_info: dict[str, Any], device: str) -> str:
    """The hardware a row ran on: the GPU name for CUDA rows, else CPU model and cores."""
    desc = machine_info.get("fastmerge", {})
    if device != "cpu" and desc.get("gpu"):
        return str(desc["gpu"])
    cpu = desc.get("cpu") or machine_info.get("processor") or machine_info.get("machine", "?")
    cores = desc.get("cores")
    return f"{cpu} ({cores} cores)" if cores else str(cpu)


def describe_version(machine_info: dict[str, Any]) -> str:
    """fastmerge's version, with torch's."""
    desc = machine_info.get("fastmerge", {})
    return f"{desc.get('fastmerge', '?')} (torch {desc.get('torch', '?')})"


def anchors_for(op: str, cli_anchors: Optional[list[str]]) -> list[tuple[str, str]]:
    """The (provider, header) anchors for an op: the command line's, else the defaults."""
    if cli_anchors:
        return [(a, f"{a} median / median") for a in cli_anchors]
    return DEFAULT_ANCHORS.get(op, [])


def group_table(results: list[Result], anchors: list[tuple[str, str]]) -> str:
    """A markdown table of one group, fastest first, with a ratio column per anchor."""
    by_provider = {r.provider: r for r in results}
    peers = [r for r in results if not r.provider.startswith("fastmerge")]
    if peers:
        by_provider[FASTEST_PEER] = min(peers, key=lambda r: r.median)
    anchors = [(p, h) for p, h in anchors if p in by_provider]
    exact = all(r.exact_quantiles for r in results)
    lo, hi = ("p20", "p80") if exact else ("p25 (q1)", "p75 (q3)")
    header = ["provider", "median (ms)", f"{lo} (ms)", f"{hi} (ms)", "GB/s"]
    with_flops = any(r.flops for r in results)
    header += ["GFLOP/s"] if with_flops else []
    with_samples = any(r.samples for r in results)
    header += ["samples/s"] if with_samples else []
    header += [h for _, h in anchors]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(results, key=lambda r: r.median):
        gbps = fmt(r.nbytes / (r.median * 1e-3) / 1e9, 3) if r.nbytes else ""
        cells = [f"`{r.provider}`", fmt(r.median, 4), fmt(r.lo, 4), fmt(r.hi, 4), gbps]
        if with_flops:
            cells.append(fmt(r.flops / (r.median * 1e-3) / 1e9, 3) if r.flops else "")
        if with_samples:
            cells.append(fmt(r.samples / (r.median * 1e-3), 4) if r.samples else "")
        cells += [_ratio(by_provider[p], r, p in FLOP_RATE_ANCHORS) for p, _ in anchors]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(anchor: Result, r: Result, flop_rate: bool) -> str:
    """anchor median / r's median; with flop_rate, r's FLOP/s over the anchor's; when both
    recorded how many samples a call processes, their time per sample."""
    if flop_rate and anchor.flops and r.flops:
        return fmt((r.flops / r.median) / (anchor.flops / anchor.median), 3)
    if anchor.samples and r.samples:
        return fmt((anchor.median / anchor.samples) / (r.median / r.samples), 3)
    return fmt(anchor.median / r.median, 3)


def rows(results: list[Result], machine_info: dict[str, Any]) -> list[dict[str, Any]]:
    """One fixed-column row per benchmark (Liger-Kernel style)."""
    version = describe_version(machine_info)
    return [
        {
            "op": r.op,
            "provider": r.provider,
            "metric": "time",
            "unit": "ms",
            "x_name": "workload",
            "x_value": r.workload,
            "median": round(r.median, 6),
            "p20": round(r.lo, 6) if r.exact_quantiles else None,
            "p80": round(r.hi, 6) if r.exact_quantiles else None,
            "machine": describe_machine(machine_info, r.device),
            "version": version,
        }
        for r in results
    ]


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pages"]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import report_pages

        report_pages.main(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path, help="JSON written by pytest --benchmark-json")
    parser.add_argument("--anchor", action="append", help="provider to compare against")
    parser.add_argument("--name", help="output name (default: RAW's name less .raw.json)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    raw = json.loads(args.raw.read_text())
    machine_info = raw.get("machine_info", {})
    name = args.name or args.raw.name.removesuffix(".json").removesuffix(".raw")
    results = load_results(raw)

    sections = [
        f"# {name}",
        "",
        f"Machine: {describe_machine(machine_info, 'cpu')}; "
        f"torch threads: {machine_info.get('fastmerge', {}).get('torch_threads', '?')}; "
        f"fastmerge {describe_version(machine_info)}; {raw.get('datetime', '')}.",
        "GB/s is the input tensors' bytes over the median time. Ratios are the anchor's median",
        "over the provider's median (above 1: faster than the anchor).",
    ]
    if any(r.flops for r in results):
        sections[-1] += (
            " GFLOP/s is the benchmark's recorded FLOPs over the median time; a FLOP/s ratio is"
            " the provider's GFLOP/s over the anchor's."
        )
    for group in sorted({r.group for r in results}):
        members = [r for r in results if r.group == group]
        anchors = anchors_for(members[0].op, args.anchor)
        sections += ["", f"## {group}", "", group_table(members, anchors)]
    markdown = "\n".join(sections) + "\n"
    print(markdown)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = rows(results, machine_info)
    (args.out_dir / f"{name}.md").write_text(markdown)
    (args.out_dir / f"{name}.json").write_text(json.dumps(table, indent=2) + "\n")
    with open(args.out_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)


if __name__ == "__main__":
    main()
