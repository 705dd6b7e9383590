"""``fastmerge merge`` against ``mergekit-yaml`` on LLaMA-style checkpoints on disk.

Builds four LLaMA-style checkpoints locally (a ``transformers`` ``LlamaConfig`` with
hidden 1,024, MLP 2,816, 8 layers, vocabulary 32,000, untied LM head: 168,313,856 float32
parameters, 673 MB each, random init, no download): a base and three experts
``base + 0.01 * randn``, saved with ``save_pretrained`` in 300 MB shards. Both tools merge
them from the same YAML (TIES, density 0.3, weight 1, the mergekit defaults otherwise),
each in its own subprocess, alternating, with the files in the page cache:

* wall time of the whole command (Python start-up and imports included, for both);
* peak resident memory of the process (``ru_maxrss`` from ``os.wait4``);
* the outputs compared tensor by tensor.

Throughput (``--throughput-rounds``, default 3): ``fastmerge merge`` alone on two
configurations of the same files, ``linear`` (the 3 experts, equal weights, normalized)
and ``ties`` (base + 3 experts, density 0.3), counting **input bytes only** (the tensors
read: 2.02 GB and 2.69 GB). A command's merge time is its wall time minus the wall time
of ``fastmerge merge --help`` (interpreter start-up and imports, the same for every
command; one is run before every merge), best of the rounds of each. The output
directory is removed and ``os.sync()`` called before every round, outside the timing, so
that one round's write-back does not throttle the next. Merges run with ``--no-fsync``
(the page cache takes the output, as it does for ``dd`` and mergekit) and, once per
configuration, with the default durable publish (every file fsync'ed: bounded by the
disk). The page-cache read rate of the same files is measured in the same run (each
input file read into one reused 16 MiB buffer, best of 3), and every throughput is also
given as a fraction of it. The load average is recorded before, during and after.
``--profile`` adds an in-process cProfile of one merge of each configuration (the main
thread's time per component) to the JSON and the report.

Run: ``python bench/bench_merge_cli.py [--rounds 3] [--workdir /tmp/...]``; results go to
``bench/results/merge_cli-cpu.{md,json}``. The checkpoints (2.7 GB) are written under
``--workdir`` (default: a new directory in /tmp) and removed at the end. Under pytest
(``fastmerge bench merge_cli``) one round of each peer is run and reported the same way.
``--skip-mergekit`` measures the throughput only (keeping the mergekit comparison of an
earlier results JSON in the report).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SEED = 0
EXPERTS = 3
DENSITY = 0.3
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, vocab_size=32000)
#: ``--small``: a 3.6M-parameter model of the same layout, for a quick check.
SMALL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, vocab_size=12000)


def build_checkpoints(root: Path, shape: dict[str, int]) -> list[Path]:
    """Write base and experts as Hugging Face model directories under `root`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shape, num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).float()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(SEED + 1)
    paths = []
    for i in range(EXPERTS + 1):
        path = root / ("base" if i == 0 else f"expert{i}")
        with torch.no_grad():
            for k, p in model.state_dict().items():
                noise = torch.randn(p.shape, generator=gen).mul_(0.01) if i else 0.0
                p.copy_(base[k] + noise)
        model.save_pretrained(path, max_shard_size="300MB")
        paths.append(path)
    return paths


def write_config(root: Path, paths: list[Path]) -> Path:
    """The TIES YAML both tools read."""
    lines = ["merge_method: ties", f"base_model: {paths[0]}", "models:"]
    for p in paths[1:]:
        lines += [
            f"  - model: {p}",
            "    parameters:",
            "      weight: 1.0",
            f"      density: {DENSITY}",
        ]
    lines += ["parameters:", "  normalize: true", "dtype: float32", ""]
    path = root / "ties.yaml"
    path.write_text("\n".join(lines))
    return path


def write_linear_config(root: Path, paths: list[Path]) -> Path:
    """The linear YAML of the throughput measurement: the experts, equal weights."""
    lines = ["merge_method: linear", "models:"]
    for p in paths[1:]:
        lines += [f"  - model: {p}", "    parameters:", "      weight: 1.0"]
    lines += ["parameters:", "  normalize: true", "dtype: float32", ""]
    path = root / "linear.yaml"
    path.write_text("\n".join(lines))
    return path


def input_bytes(paths: list[Path]) -> int:
    """Bytes of the tensors in the checkpoints at `paths` (what a merge reads), from their
    headers, in a child process (this one must stay small: see build_in_subprocess)."""
    code = (
        "import sys\nfrom fastmerge.io import open_checkpoint\n"
        "print(sum(c.info(n).nbytes for c in map(open_checkpoint, sys.argv[1:]) for n in c))"
    )
    done = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return int(done.stdout.strip())


def page_cache_read_rate(paths: list[Path], rounds: int = 3) -> dict[str, Any]:
    """GB/s of reading every safetensors file of `paths` from the page cache into one
    reused 16 MiB buffer (the bytes really copied to user space), best of `rounds`; and
    ``cat`` to /dev/null for reference (which may splice without copying)."""
    files = sorted(f for p in paths for f in Path(p).glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    buffer = bytearray(16 << 20)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buffer):
                    pass
        best = min(best, time.perf_counter() - start)
    cat = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        cat = min(cat, time.perf_counter() - start)
    return {"bytes": size, "read_s": best, "read_gb_s": size / best / 1e9, "cat_s": cat,
            "cat_gb_s": size / cat / 1e9}  # fmt: skip


def help_command() -> list[str]:
    return [sys.executable, "-m", "fastmerge.cli", "merge", "--help"]


def merge_command(config: Path, out: Path, fsync: bool) -> list[str]:
    cmd = [sys.executable, "-m", "fastmerge.cli", "merge", str(config), "--out", str(out),
           "--quiet"]  # fmt: skip
    return cmd if fsync else [*cmd, "--no-fsync"]


def measure_throughput(workdir: Path, paths: list[Path], rounds: int, profile: bool = False
                       ) -> dict[str, Any]:  # fmt: skip
    """The throughput section: see the module doc."""
    configs = {
        "linear": (write_linear_config(workdir, paths), paths[1:]),
        "ties": (write_config(workdir, paths), paths),
    }
    result: dict[str, Any] = {"rounds": rounds, "load_before": list(os.getloadavg())}
    result["page_cache"] = page_cache_read_rate(paths)
    helps: list[float] = []  # measured between the merges, under the same conditions
    result["help_s"] = helps
    out = workdir / "throughput-out"
    for name, (config, inputs) in configs.items():
        nbytes = input_bytes(inputs)
        runs = []
        for fsync in [False] * rounds + [True]:
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            if not fsync:
                helps.append(run_peer(help_command())["seconds"])
            run = run_peer(merge_command(config, out, fsync))
            run["fsync"] = fsync
            run["load"] = list(os.getloadavg())
            runs.append(run)
        fast = [r for r in runs if not r["fsync"]]
        result[name] = {
            "input_bytes": nbytes,
            "seconds": [r["seconds"] for r in fast],
            "cpu_seconds": [r["cpu_seconds"] for r in fast],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in fast),
            "loads": [r["load"] for r in runs],
            "durable_seconds": [r["seconds"] for r in runs if r["fsync"]][0],
        }
        if profile:
            result[name]["profile"] = profile_merge(config, out)
    shutil.rmtree(out, ignore_errors=True)
    result["load_after"] = list(os.getloadavg())
    read_rate = result["page_cache"]["read_gb_s"]
    for name in configs:  # every configuration against the best start-up of the whole run
        r = result[name]
        r["merge_s"] = min(r["seconds"]) - min(helps)
        r["gb_s"] = r["input_bytes"] / r["merge_s"] / 1e9
        r["fraction_of_read"] = r["gb_s"] / read_rate
        median_s = statistics.median(r["seconds"]) - statistics.median(helps)
        r["median_gb_s"] = r["input_bytes"] / median_s / 1e9
        r["durable_gb_s"] = r["input_bytes"] / (r["durable_seconds"] - min(helps)) / 1e9
    return result


#: Functions whose main-thread time the profile reports (label: how to match them).
PROFILED = {
    "read the config (YAML)": "config.py:load_config",
    "plan (headers, checks)": "run.py:plan",
    "ops.weighted_sum kernel": "fastmerge._C.weighted_sum",
    "magnitude_threshold kernel": "fastmerge._C.magnitude_threshold",
    "ties_combine kernel": "fastmerge._C.ties_combine",
    "reads in the main thread (large tensors)": "posix.preadv",
    "waiting (prefetcher, writer)": "'acquire' of '_thread.lock'",
    "merge loop (_execute)": "run.py:_execute",
}


def profile_merge(config: Path, out: Path) -> dict[str, Any]:
    """cProfile of one in-process merge (main thread): seconds per PROFILED component,
    plus the total and the process's user/system CPU time."""
    code = f"""
import cProfile, io, json, os, pstats, resource, shutil, time
from fastmerge.engine import run
shutil.rmtree({str(out)!r}, ignore_errors=True); os.sync()
prof = cProfile.Profile(); r0 = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter(); prof.enable()
run({str(config)!r}, {str(out)!r}, fsync=False)
prof.disable(); total = time.perf_counter() - start; r1 = resource.getrusage(resource.RUSAGE_SELF)
rows = {{}}
for (file, line, func), (cc, nc, tt, ct, callers) in pstats.Stats(prof).stats.items():
    key = os.path.basename(file) + ":" + func
    rows[key] = max(ct, rows.get(key, 0.0))
user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
print(json.dumps({{"total": total, "user": user, "sys": system, "rows": rows}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    data = json.loads(done.stdout.strip().splitlines()[-1])
    parts = {}
    for label, pattern in PROFILED.items():
        parts[label] = sum(v for k, v in data["rows"].items() if pattern in k)
    return {"total_s": data["total"], "user_s": data["user"], "sys_s": data["sys"],
            "main_thread_s": parts}  # fmt: skip


def throughput_report(t: dict[str, Any]) -> str:
    pc = t["page_cache"]
    lines = [
        "## Throughput of `fastmerge merge` (input bytes)",
        "",
        f"Page cache read rate of the same files, this run: {pc['read_gb_s']:.2f} GB/s "
        f"(read into a reused 16 MiB buffer, {pc['bytes'] / 1e9:.2f} GB in "
        f"{pc['read_s']:.3f} s, best of 3; `cat` to /dev/null: {pc['cat_gb_s']:.2f} GB/s). "
        f"`fastmerge merge --help`: best {min(t['help_s']):.2f} s of "
        f"{', '.join(f'{x:.2f}' for x in t['help_s'])}.",
        "",
        "| config | input GB | best wall s (rounds) | merge s (wall - help) | GB/s of input, best "
        "| fraction of page-cache read | GB/s, medians | CPU s (user+sys) | peak RSS MiB "
        "| durable (fsync) wall s | durable GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("linear", "ties"):
        r = t[name]
        lines.append(
            f"| {name} | {r['input_bytes'] / 1e9:.2f} | {min(r['seconds']):.2f} "
            f"({', '.join(f'{x:.2f}' for x in r['seconds'])}) | {r['merge_s']:.2f} | "
            f"{r['gb_s']:.2f} | {100 * r['fraction_of_read']:.0f}% | {r['median_gb_s']:.2f} | "
            f"{statistics.median(r['cpu_seconds']):.2f} | {r['peak_rss_mib']:.0f} | "
            f"{r['durable_seconds']:.2f} | {r['durable_gb_s']:.2f} |"
        )
    lines.append("")
    loads = [x[0] for name in ("linear", "ties") for x in t[name]["loads"]]
    lines.append(
        f"Load average (1 min): {t['load_before'][0]:.2f} before, {min(loads):.2f}-"
        f"{max(loads):.2f} during, {t['load_after'][0]:.2f} after (2 cores; other jobs "
        "share the machine). `--no-fsync` merges, best of the rounds; the durable row is one "
        "merge with the default fsync of every output file before publishing."
    )
    profiles = {name: t[name]["profile"] for name in ("linear", "ties") if t[name].get("profile")}
    if profiles:
        lines += [
            "",
            "### Where the time goes",
            "",
            "One in-process merge of each configuration under cProfile (`engine.run`, "
            "`fsync=False`; main thread: the prefetch thread's reads and the writer thread's "
            "writes overlap with it and show up only as waits). Reading is mapping: tensors "
            "of 1 MiB or more are memory maps of the page cache, so their bytes are first "
            "touched, and faulted in, by the kernels.",
        ]
    for name, prof in profiles.items():
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in prof["main_thread_s"].items() if v > 0)
        lines += [
            "",
            f"* `{name}`: {prof['total_s']:.2f} s in all, CPU user {prof['user_s']:.2f} s + "
            f"system {prof['sys_s']:.2f} s (2 cores); {parts}.",
        ]
    return "\n".join(lines) + "\n"


def run_peer(cmd: list[str]) -> dict[str, Any]:
    """Run one command; its wall time and peak RSS (os.wait4 of that child)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{cmd[0]} failed ({status}):\n{out[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": usage.ru_maxrss / 1024,
            "log_tail": out[-400:]}  # fmt: skip


def peers(config: Path, out: Path) -> dict[str, list[str]]:
    bindir = Path(sys.executable).parent
    commands = {
        "fastmerge": [sys.executable, "-m", "fastmerge.cli", "merge", str(config), "--out",
                      str(out / "fastmerge"), "--overwrite", "--quiet"],
    }  # fmt: skip
    mergekit = bindir / "mergekit-yaml"
    if mergekit.exists():
        commands["mergekit"] = [str(mergekit), str(config), str(out / "mergekit"), "--quiet"]
    return commands


def compare(a: Path, b: Path) -> dict[str, Any]:
    """Max |difference| and entries differing by more than float32 rounding."""
    import torch

    from fastmerge.io import open_checkpoint

    x, y = open_checkpoint(a), open_checkpoint(b)
    worst, differing, total, relative = 0.0, 0, 0, 0.0
    missing = sorted(set(x) ^ set(y))
    for name in x:
        if name not in y:
            continue
        u, v = x[name].double(), y[name].double()
        diff = (u - v).abs()
        tol = 4 * torch.finfo(torch.float32).eps * torch.maximum(u.abs(), v.abs()).clamp(min=1e-30)
        differing += int((diff > tol).sum())
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        if diff.numel():
            relative = max(relative, float(diff.max() / v.abs().max().clamp(min=1e-30)))
        total += diff.numel()
    return {"max_abs_diff": worst, "max_rel_diff": relative,
            "entries_beyond_rounding": differing, "entries": total,
            "keys_only_in_one": missing}  # fmt: skip


def compare_in_subprocess(a: Path, b: Path) -> dict[str, Any]:
    """:func:`compare` in a child process: loading both outputs here would grow this
    process, and every later child's peak RSS would count the pages it inherits."""
    code = (
        "import json, sys\nsys.path.insert(0, sys.argv[1])\nfrom bench_merge_cli import compare\n"
        "print(json.dumps(compare(sys.argv[2], sys.argv[3])))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(HERE), str(a), str(b)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def warm(paths: list[Path]) -> None:
    """Read every safetensors file once, so that the measurements find them cached."""
    for p in paths:
        for f in Path(p).glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def build_in_subprocess(workdir: Path, small: bool) -> list[Path]:
    """Build the checkpoints in a child process: this process must stay small, since a
    child's peak RSS counts the pages it inherits when it is forked."""
    cmd = [sys.executable, __file__, "--build", str(workdir)] + (["--small"] if small else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [workdir / "base"] + [workdir / f"expert{i}" for i in range(1, EXPERTS + 1)]


def measure(
    rounds: int, workdir: Path, small: bool = False, peer_rounds: int | None = None
) -> dict[str, Any]:
    shape = SMALL if small else SHAPE
    paths = [workdir / "base"] + [workdir / f"expert{i}" for i in range(1, EXPERTS + 1)]
    if not all((p / "config.json").exists() for p in paths):
        paths = build_in_subprocess(workdir, small)
    config = write_config(workdir, paths)
    warm(paths)  # page cache warm for both peers
    out = workdir / "out"
    out.mkdir(exist_ok=True)
    commands = peers(config, out)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in commands}
    for i in range(rounds):
        for name, cmd in commands.items():
            if name == "mergekit" and peer_rounds is not None and i >= peer_rounds:
                continue
            if name == "mergekit":
                shutil.rmtree(out / "mergekit", ignore_errors=True)
            runs[name].append(run_peer(cmd))
    result: dict[str, Any] = {"rounds": rounds, "shape": shape, "peers": {}}
    result["rounds_per_peer"] = {name: len(rs) for name, rs in runs.items()}
    for name, rs in runs.items():
        result["peers"][name] = {
            "median_s": statistics.median(r["seconds"] for r in rs),
            "seconds": [r["seconds"] for r in rs],
            "median_cpu_s": statistics.median(r["cpu_seconds"] for r in rs),
            "cpu_seconds": [r["cpu_seconds"] for r in rs],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "log_tail": rs[-1]["log_tail"],
        }
    if "mergekit" in runs:
        result["agreement"] = compare(out / "fastmerge", out / "mergekit")
    return result


def report(result: dict[str, Any], machine: dict[str, Any]) -> str:
    p = result["peers"]
    lines = [
        "| peer | median wall s | median CPU s (user+sys) | peak RSS MiB | wall speed-up vs "
        "mergekit | CPU-time ratio | RSS vs mergekit |",
        "|---|---|---|---|---|---|---|",
    ]
    mk = p.get("mergekit")
    for name, r in p.items():
        speed = f"{mk['median_s'] / r['median_s']:.2f}x" if mk else "-"
        cpu = f"{mk['median_cpu_s'] / r['median_cpu_s']:.2f}x" if mk else "-"
        rss = f"{r['peak_rss_mib'] / mk['peak_rss_mib']:.2f}" if mk else "-"
        lines.append(
            f"| {name} | {r['median_s']:.2f} | {r['median_cpu_s']:.2f} | "
            f"{r['peak_rss_mib']:.0f} | {speed} | {cpu} | {rss} |"
        )
    if "agreement" in result:
        a = result["agreement"]
        lines.append("")
        lines.append(
            f"Outputs: max |fastmerge - mergekit| = {a['max_abs_diff']:.3g}; "
            f"{a['entries_beyond_rounding']} of {a['entries']:,} entries differ by more than "
            "4 float32 ulps; keys in one output only: "
            f"{a['keys_only_in_one'] or 'none'}."
        )
    lines.append("")
    lines.append(
        f"TIES density {DENSITY}, base + {EXPERTS} experts, LlamaConfig {result['shape']} "
        "(untied), "
        f"float32; rounds per peer {result['rounds_per_peer']}, alternating; {machine['cpu']}, "
        f"{machine['cores']} cores, torch {machine['torch']}, fastmerge {machine['fastmerge']}"
        f"{', mergekit ' + machine['mergekit'] if machine.get('mergekit') else ''}."
    )
    return "\n".join(lines) + "\n"


def machine_info() -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from conftest import machine_description

    info = machine_description()
    try:
        from importlib.metadata import version

        info["mergekit"] = version("mergekit")
    except Exception:
        info["mergekit"] = None
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default /tmp)")
    parser.add_argument("--name", default="merge_cli-cpu")
    parser.add_argument("--small", action="store_true", help="a 3.6M-parameter model")
    parser.add_argument("--mergekit-rounds", type=int, default=None,
                        help="rounds of mergekit (default: --rounds; it is slow)")  # fmt: skip
    parser.add_argument("--throughput-rounds", type=int, default=3,
                        help="rounds of the throughput measurement (0: skip it)")  # fmt: skip
    parser.add_argument("--skip-mergekit", action="store_true",
                        help="throughput only; keep the earlier comparison's results")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="profile one merge of each")
    parser.add_argument("--keep", action="store_true", help="keep --workdir's checkpoints")
    parser.add_argument("--methods", default=None,
                        help="'all' or a comma-separated list: every method against mergekit "
                        "(bench/merge_methods.py), results in merge_methods-cpu.*")  # fmt: skip
    parser.add_argument("--build", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        build_checkpoints(Path(args.build), SMALL if args.small else SHAPE)
        return 0
    if args.methods:
        return run_methods(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fastmerge-bench-merge-cli-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = HERE / "results"
    previous = results / f"{args.name}.json"
    try:
        paths = [workdir / "base"] + [workdir / f"expert{i}" for i in range(1, EXPERTS + 1)]
        if not all((p / "config.json").exists() for p in paths):
            paths = build_in_subprocess(workdir, args.small)
        throughput = None
        if args.throughput_rounds > 0:  # first: the comparison below makes this process big
            warm(paths)
            throughput = measure_throughput(workdir, paths, args.throughput_rounds, args.profile)
        if args.skip_mergekit and previous.exists():
            result = json.loads(previous.read_text())
            result.pop("throughput", None)
        else:
            result = measure(args.rounds, workdir, args.small, args.mergekit_rounds)
        if throughput is not None:
            result["throughput"] = throughput
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    machine = machine_info()
    result["machine"] = machine
    text = report(result, machine)
    if "throughput" in result:
        text += "\n" + throughput_report(result["throughput"])
    results.mkdir(exist_ok=True)
    (results / f"{args.name}.md").write_text(text)
    (results / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    return 0


def run_methods(args) -> int:
    """``--methods``: every method against mergekit (see bench/merge_methods.py)."""
    sys.path.insert(0, str(HERE))
    import merge_methods

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fastmerge-bench-methods-"))
    workdir.mkdir(parents=True, exist_ok=True)
    paths = [workdir / "base"] + [workdir / f"expert{i}" for i in range(1, EXPERTS + 1)]
    try:
        if not all((p / "config.json").exists() for p in paths):
            paths = build_in_subprocess(workdir, args.small)
        warm(paths)
        names = list(merge_methods.configs(paths)) if args.methods == "all" else [
            m.strip() for m in args.methods.split(",")]  # fmt: skip
        mergekit = None if args.skip_mergekit else Path(sys.executable).parent / "mergekit-yaml"
        result = merge_methods.measure_methods(
            workdir, paths, args.rounds, names, run_peer, help_command, merge_command,
            input_bytes, mergekit if mergekit and mergekit.exists() else None,
            compare_in_subprocess,
        )  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    machine = machine_info()
    result["machine"], result["shape"] = machine, SMALL if args.small else SHAPE
    results = HERE / "results"
    name = "merge_methods-cpu" if args.name == "merge_cli-cpu" else args.name
    previous = results / f"{name}.json"
    if args.methods != "all" and previous.exists():  # re-measured methods replace theirs
        earlier = json.loads(previous.read_text())
        earlier["methods"].update(result["methods"])
        result["methods"] = earlier["methods"]
        result["help_s"] = earlier["help_s"] + result["help_s"]
        result["load_before"] = earlier["load_before"]
    text = merge_methods.report(result, machine)
    (results / f"{name}.md").write_text(text)
    (results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if any("speedup" in r for r in result["methods"].values()):
        merge_methods.plot(result, results / f"{name}.png")
    print(text)
    return 0


def bench_merge_cli(benchmark) -> None:
    """pytest entry (``fastmerge bench merge_cli``): one round of each peer, printed; the
    recorded timing is the whole measurement (checkpoint building included)."""
    with tempfile.TemporaryDirectory(prefix="fastmerge-bench-merge-cli-") as d:
        result = benchmark.pedantic(measure, args=(1, Path(d)), rounds=1, iterations=1)
    benchmark.extra_info.update(op="merge_cli", provider="fastmerge", result=result)
    print(report(result, machine_info()))


if __name__ == "__main__":
    sys.exit(main())
