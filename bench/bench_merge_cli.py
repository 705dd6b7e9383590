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

Run: ``python bench/bench_merge_cli.py [--rounds 3] [--workdir /tmp/...]``; results go to
``bench/results/merge_cli-cpu.{md,json}``. The checkpoints (2.7 GB) are written under
``--workdir`` (default: a new directory in /tmp) and removed at the end. Under pytest
(``fastmerge bench merge_cli``) one round of each peer is run and reported the same way.
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
    worst, differing, total = 0.0, 0, 0
    missing = sorted(set(x) ^ set(y))
    for name in x:
        if name not in y:
            continue
        u, v = x[name].double(), y[name].double()
        diff = (u - v).abs()
        tol = 4 * torch.finfo(torch.float32).eps * torch.maximum(u.abs(), v.abs()).clamp(min=1e-30)
        differing += int((diff > tol).sum())
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        total += diff.numel()
    return {"max_abs_diff": worst, "entries_beyond_rounding": differing, "entries": total,
            "keys_only_in_one": missing}  # fmt: skip


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
    paths = build_in_subprocess(workdir, small)
    config = write_config(workdir, paths)
    for f in workdir.rglob("*.safetensors"):  # page cache warm for both peers
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
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
    parser.add_argument("--build", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        build_checkpoints(Path(args.build), SMALL if args.small else SHAPE)
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fastmerge-bench-merge-cli-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = measure(args.rounds, workdir, args.small, args.mergekit_rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    machine = machine_info()
    result["machine"] = machine
    text = report(result, machine)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"{args.name}.md").write_text(text)
    (results / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
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
