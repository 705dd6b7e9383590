"""Every merge method of mergekit's table: ``fastmerge merge`` against ``mergekit-yaml``.

Used by ``bench/bench_merge_cli.py --methods``: on the 168M-parameter float32 LLaMA set of
that script (a base and three experts ``base + 0.01 * randn``), each method merges base +
3 experts, or base + 1 expert where it takes two models (``slerp``, ``nearswap``,
``arcee_fusion``; ``nuslerp``: base + 2; ``passthrough``: one model). Per method, in one
run and on the same files in the page cache:

* mergekit 0.1.5's wall time and peak RSS (one run: it is slow), and fastmerge's (median
  of its rounds), both whole commands in their own subprocess, and their ratios;
* fastmerge's input throughput: the tensors read / (best ``--no-fsync`` wall time minus the
  best ``fastmerge merge --help`` time of the run, the interpreter's start-up), and the
  same with the default fsync of every output file (one run) beside it;
* whether the two outputs agree (max relative difference per tensor, for the
  deterministic methods).

``report`` writes the table, ``plot`` the bar chart of the speed-ups (matplotlib).
"""

from __future__ import annotations

import os
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

#: The methods whose masks are random (their outputs agree with mergekit's in distribution).
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
#: Issue targets: input GB/s of the one-pass and of the selection methods.
ONE_PASS = {"linear", "task_arithmetic", "slerp", "nuslerp", "nearswap", "passthrough"}
SELECTION = {"ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce"}
TARGETS = {"speedup": 10.0, "rss": 1 / 3, "one_pass_gb_s": 3.0, "selection_gb_s": 2.0}


def _models(paths: list[Path], params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [{"model": str(p), **({"parameters": dict(params)} if params else {})} for p in paths]


def configs(paths: list[Path]) -> dict[str, tuple[dict[str, Any], list[Path]]]:
    """method -> (its YAML, the models it reads)."""
    base, experts = paths[0], paths[1:]
    one = [base, experts[0]]
    gta = {"weight": 1.0, "density": 0.3}
    c: dict[str, tuple[dict[str, Any], list[Path]]] = {}

    def add(method: str, models: list[Path], cfg: dict[str, Any]) -> None:
        c[method] = ({"merge_method": method, **cfg, "dtype": "float32"}, models)

    add("linear", paths, {"models": _models(paths, {"weight": 1.0})})
    add("task_arithmetic", paths, {"base_model": str(base),
                                   "models": _models(experts, {"weight": 0.5})})  # fmt: skip
    for m in ("ties", "dare_ties", "dare_linear"):
        add(m, paths, {"base_model": str(base), "models": _models(experts, gta)})
    for m in ("breadcrumbs", "breadcrumbs_ties"):
        add(m, paths, {"base_model": str(base),
                       "models": _models(experts, {**gta, "gamma": 0.01})})  # fmt: skip
    for m in ("della", "della_linear"):
        add(m, paths, {"base_model": str(base),
                       "models": _models(experts, {**gta, "epsilon": 0.1})})  # fmt: skip
    add("sce", paths, {"base_model": str(base), "models": _models(experts),
                       "parameters": {"select_topk": 0.3}})  # fmt: skip
    add("ram", paths, {"base_model": str(base), "models": _models(experts)})
    add("ramplus_tl", paths, {"base_model": str(base), "models": _models(experts)})
    add("model_stock", paths, {"base_model": str(base), "models": _models(experts)})
    add("multislerp", paths, {"base_model": str(base),
                              "models": _models(experts, {"weight": 1.0})})  # fmt: skip
    add("karcher", paths, {"models": _models(paths)})
    add("slerp", one, {"base_model": str(base), "models": _models(one),
                       "parameters": {"t": 0.4}})  # fmt: skip
    add("nuslerp", paths[:3], {"base_model": str(base),
                               "models": _models(experts[:2], {"weight": 0.5})})  # fmt: skip
    add("nearswap", one, {"base_model": str(base), "models": _models(one),
                          "parameters": {"t": 0.005}})  # fmt: skip
    add("arcee_fusion", one, {"base_model": str(base), "models": _models(one)})
    add("passthrough", experts[:1], {"models": _models(experts[:1])})
    return c


def measure_methods(workdir: Path, paths: list[Path], rounds: int, methods: list[str],
                    run_peer: Callable, help_command: Callable, merge_command: Callable,
                    input_bytes: Callable, mergekit: Path | None,
                    compare: Callable) -> dict[str, Any]:  # fmt: skip
    """The measurements of the module doc, one method after the other."""
    table = configs(paths)
    unknown = sorted(set(methods) - set(table))
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; valid: {', '.join(table)}")
    out = workdir / "methods-out"
    helps: list[float] = []
    result: dict[str, Any] = {"rounds": rounds, "load_before": list(os.getloadavg()),
                              "help_s": helps, "methods": {}}  # fmt: skip
    if mergekit is not None:  # its start-up (imports), to compare the merges themselves
        result["mergekit_help_s"] = [run_peer([str(mergekit), "--help"])["seconds"]
                                     for _ in range(3)]  # fmt: skip
    for method in methods:
        cfg, models = table[method]
        config = workdir / f"{method}.yaml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        r: dict[str, Any] = {"input_bytes": input_bytes(models), "seconds": []}
        for fsync in [False] * rounds + [True]:
            shutil.rmtree(out / "fastmerge", ignore_errors=True)
            os.sync()
            if not fsync:
                helps.append(run_peer(help_command())["seconds"])
            run = run_peer(merge_command(config, out / "fastmerge", fsync))
            if fsync:
                r["durable_s"] = run["seconds"]
            else:
                r["seconds"].append(run["seconds"])
                r["peak_rss_mib"] = max(r.get("peak_rss_mib", 0.0), run["peak_rss_mib"])
        r["load"] = list(os.getloadavg())
        if mergekit is not None:
            shutil.rmtree(out / "mergekit", ignore_errors=True)
            os.sync()
            mk = run_peer([str(mergekit), str(config), str(out / "mergekit"), "--quiet",
                           "--no-copy-tokenizer"])  # fmt: skip
            r["mergekit_s"], r["mergekit_rss_mib"] = mk["seconds"], mk["peak_rss_mib"]
            r["agreement"] = compare(out / "fastmerge", out / "mergekit")
        result["methods"][method] = r
        print(f"{method}: fastmerge {min(r['seconds']):.2f} s, "
              f"mergekit {r.get('mergekit_s', float('nan')):.2f} s", flush=True)  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    startup = min(helps)
    for r in result["methods"].values():
        r["merge_s"] = min(r["seconds"]) - startup
        r["gb_s"] = r["input_bytes"] / r["merge_s"] / 1e9
        r["durable_gb_s"] = r["input_bytes"] / (r["durable_s"] - startup) / 1e9
        if "mergekit_s" in r:
            r["speedup"] = r["mergekit_s"] / statistics.median(r["seconds"])
            r["rss_ratio"] = r["peak_rss_mib"] / r["mergekit_rss_mib"]
            if result.get("mergekit_help_s"):  # the merges without either tool's start-up
                net = r["mergekit_s"] - min(result["mergekit_help_s"])
                r["net_speedup"] = net / r["merge_s"]
    result["load_after"] = list(os.getloadavg())
    return result


def _verdict(method: str, r: dict[str, Any]) -> str:
    misses = []
    if method not in RANDOM and r.get("speedup", TARGETS["speedup"]) < TARGETS["speedup"]:
        misses.append("speed")
    if method not in RANDOM and r.get("rss_ratio", 0.0) > TARGETS["rss"]:
        misses.append("RSS")
    want = (TARGETS["one_pass_gb_s"] if method in ONE_PASS else
            TARGETS["selection_gb_s"] if method in SELECTION else None)  # fmt: skip
    if want is not None and r["gb_s"] < want:
        misses.append(f"GB/s < {want:g}")
    return "missed: " + ", ".join(misses) if misses else "met"


def report(result: dict[str, Any], machine: dict[str, Any]) -> str:
    """The Markdown table of every method."""
    lines = [
        "| method | input GB | fastmerge median wall s | mergekit wall s | speed-up | "
        "speed-up without start-up | "
        "fastmerge RSS MiB | mergekit RSS MiB | RSS ratio | input GB/s (no fsync, best) | "
        "GB/s with fsync | max rel. diff (entries beyond 4 ulps) | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in result["methods"].items():
        a = r.get("agreement")
        diff = "-" if not a else f"{a['max_rel_diff']:.1e} ({a['entries_beyond_rounding']:,})"
        diff = "random masks" if method in RANDOM else diff
        lines.append(
            f"| `{method}` | {r['input_bytes'] / 1e9:.2f} | {statistics.median(r['seconds']):.2f} "
            f"| {r.get('mergekit_s', float('nan')):.1f} | {r.get('speedup', float('nan')):.1f}x | "
            f"{r.get('net_speedup', float('nan')):.1f}x | "
            f"{r['peak_rss_mib']:.0f} | {r.get('mergekit_rss_mib', float('nan')):.0f} | "
            f"{r.get('rss_ratio', float('nan')):.2f} | {r['gb_s']:.2f} | "
            f"{r['durable_gb_s']:.2f} | {diff} | {_verdict(method, r)} |"
        )
    loads = [r["load"][0] for r in result["methods"].values()]
    lines += [
        "",
        f"Whole commands in their own subprocess, files in the page cache; fastmerge: "
        f"{result['rounds']} `--no-fsync` rounds (median wall; GB/s from the best minus the "
        f"best `fastmerge merge --help` of the run, {min(result['help_s']):.2f} s) and one "
        "durable run; mergekit: one run. Speed-up and RSS ratio against mergekit "
        "(targets for the deterministic methods: >= 10x and <= 1/3); without start-up: "
        "each tool's wall time minus its best `--help` time of the run (fastmerge "
        f"{min(result['help_s']):.2f} s, mergekit "
        f"{min(result.get('mergekit_help_s') or [float('nan')]):.2f} s). GB/s targets: "
        ">= 3 for the one-pass methods, >= 2 for the selection methods. Load average "
        f"(1 min) {result['load_before'][0]:.2f} before, {min(loads):.2f}-{max(loads):.2f} "
        f"during, {result['load_after'][0]:.2f} after; {machine['cpu']}, {machine['cores']} "
        f"cores, torch {machine['torch']}, fastmerge {machine['fastmerge']}, mergekit "
        f"{machine.get('mergekit')}.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Bar chart of the speed-ups over mergekit (whole commands, and without either tool's
    start-up), log scale, the 10x target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(m, r["speedup"], r.get("net_speedup")) for m, r in result["methods"].items()
            if "speedup" in r]  # fmt: skip
    rows.sort(key=lambda x: x[1])
    fig, ax = plt.subplots(figsize=(7.5, 0.36 * len(rows) + 1.4))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [w for _, w, _ in rows], height=0.4, color="#1f77b4",
            label="whole commands")  # fmt: skip
    if all(n is not None for _, _, n in rows):
        ax.barh([y - 0.2 for y in ys], [n for _, _, n in rows], height=0.4, color="#ff7f0e",
                label="without start-up")  # fmt: skip
    ax.set_yticks(list(ys), [m + (" (random)" if m in RANDOM else "") for m, _, _ in rows])
    ax.axvline(TARGETS["speedup"], color="#d62728", linestyle="--", label="10x target")
    ax.set_xscale("log")
    ax.set_xlabel("mergekit wall time / fastmerge wall time")
    ax.set_title("fastmerge merge vs mergekit 0.1.5: 168M LLaMA, float32, 2-core CPU")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
