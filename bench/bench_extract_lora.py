"""``fastmerge extract-lora`` against a plain ``torch.linalg.svd`` extraction and
``mergekit-extract-lora`` on a 168M-parameter LLaMA pair generated on disk.

The base is ``bench_merge_cli.py``'s checkpoint (a ``transformers`` ``LlamaConfig`` with
hidden 1,024, MLP 2,816, 8 layers, vocabulary 32,000, untied LM head: 168,313,856 float32
parameters, random init, no download, saved in 300 MB shards). The "fine-tune" changes
every 2-D weight by a rank-8 term with decaying singular values (1 down to 0.1 of
``0.02 * ||W||_F / sqrt(numel)`` per entry) plus Gaussian noise 20 times smaller, and
leaves the norms alone. Every peer extracts rank 16 from every 2-D weight (embedding
included: mergekit with ``--embed-lora``):

* ``fastmerge``: :func:`fastmerge.lora.extract_lora` in this process (randomized SVD, 10
  oversampling columns, 4 power iterations; its own per-module error computation counts
  in its time);
* ``torch.linalg.svd``: the plain extraction mergekit-extract-lora performs, written out
  here: per module read both tensors, ``torch.linalg.svd(delta, full_matrices=False)``,
  keep 16, ``B = U sqrt(S)``, ``A = sqrt(S) Vh``, save the adapter; in this process;
* ``mergekit-extract-lora`` (when installed) and ``fastmerge extract-lora`` as commands,
  each in its own subprocess (``HF_HUB_OFFLINE=1``; start-up and imports included for
  both), so that their ratio compares like with like.

Rounds alternate between the peers (after an untimed warm-up SVD; the commands only in
the first ``--command-rounds``); the medians are reported with their ratios, and the
results are written after every round. Each adapter's relative Frobenius reconstruction error
``||D - scale B A||_F / ||D||_F`` is computed afterwards, outside the timing, by one
function for every peer (mean and max over the modules). The load average is recorded
before and after.

Run: ``python bench/bench_extract_lora.py [--rounds 3] [--workdir DIR] [--keep]``;
results go to ``bench/results/extract_lora-cpu.{json,md}``.
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
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
RANK = 16
PLANTED_RANK = 8
SEED = 0


def build_pair(root: Path, small: bool = False) -> tuple[Path, Path]:
    """``root/base`` (bench_merge_cli.py's generator) and ``root/ft`` (base + low-rank
    change + noise of every 2-D weight, the same shards)."""
    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(HERE))
    import bench_merge_cli

    bench_merge_cli.EXPERTS = 0  # the base only
    shape = bench_merge_cli.SMALL if small else bench_merge_cli.SHAPE
    base = bench_merge_cli.build_checkpoints(root, shape)[0]
    ft = root / "ft"
    ft.mkdir()
    gen = torch.Generator().manual_seed(SEED + 7)
    for f in sorted(base.iterdir()):
        if f.suffix != ".safetensors":
            shutil.copy(f, ft / f.name)
            continue
        tensors = load_file(f)
        for name, w in tensors.items():
            if w.dim() != 2:
                continue
            m, n = w.shape
            scale = 0.02 * float(w.norm()) / (m * n) ** 0.5
            s = torch.logspace(0, -1, PLANTED_RANK) * scale * (m * n) ** 0.5 / PLANTED_RANK**0.5
            u = torch.linalg.qr(torch.randn(m, PLANTED_RANK, generator=gen)).Q
            v = torch.linalg.qr(torch.randn(n, PLANTED_RANK, generator=gen)).Q
            noise = torch.randn(m, n, generator=gen).mul_(scale / 20)
            tensors[name] = w + (u * s) @ v.T + noise
        save_file(tensors, str(ft / f.name), metadata={"format": "pt"})
    return base, ft


def plain_extract(base: Path, ft: Path, out: Path, rank: int = RANK) -> None:
    """The plain extraction: full SVD per differing 2-D weight, truncate, save."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    def shards(d: Path) -> dict[str, Path]:
        found = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                found.update(dict.fromkeys(h.keys(), f))
        return found

    b_of, f_of = shards(base), shards(ft)
    tensors, targets = {}, []
    for name, file in f_of.items():
        with safe_open(str(file), "pt") as h:
            w_ft = h.get_tensor(name)
        with safe_open(str(b_of[name]), "pt") as h:
            w_base = h.get_tensor(name)
        if w_ft.dim() != 2 or torch.equal(w_ft, w_base):
            continue
        module = name.removesuffix(".weight")
        embedding = "embed" in module.rsplit(".", 1)[-1]
        delta = (w_ft - w_base).float()
        delta = delta.T if embedding else delta
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        root = s[:rank].sqrt()
        a, b = (root[:, None] * vh[:rank]).contiguous(), (u[:, :rank] * root).contiguous()
        kind = (
            ("lora_embedding_A", "lora_embedding_B")
            if embedding
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"base_model.model.{module}.{kind[0]}"] = a
        tensors[f"base_model.model.{module}.{kind[1]}"] = b
        targets.append(module)
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": targets}
    (out / "adapter_config.json").write_text(json.dumps(config))


def errors(base: Path, ft: Path, adapter_dir: Path) -> dict[str, float]:
    """Relative Frobenius error of the adapter's change of each module it adapts."""
    import torch

    from fastmerge.io import open_checkpoint
    from fastmerge.lora import load_adapter

    b, f = open_checkpoint(base), open_checkpoint(ft)
    adapter = load_adapter(adapter_dir)
    out = {}
    for module in adapter.modules:
        d = f[f"{module}.weight"].double() - b[f"{module}.weight"].double()
        out[module] = float(
            torch.linalg.norm(d - adapter.delta(module).double()) / torch.linalg.norm(d)
        )
    adapter.close()
    return out


def run_command(cmd: list[str]) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:4])} ...: exit {done.returncode}: {done.stderr[-1500:]}"
        )
    return seconds


def peers(base: Path, ft: Path, work: Path, mergekit: bool) -> dict[str, Any]:
    """name -> a function of the output directory that extracts into it."""
    from fastmerge.lora import extract_lora

    fast = lambda out: extract_lora(base, ft, out, rank=RANK, progress=False)  # noqa: E731
    found = {"fastmerge": fast, "torch.linalg.svd": lambda out: plain_extract(base, ft, out)}
    if mergekit:
        py = sys.executable
        found["fastmerge extract-lora (command)"] = lambda out: run_command(
            [
                py,
                "-m",
                "fastmerge",
                "extract-lora",
                "--base",
                str(base),
                "--model",
                str(ft),
                "--rank",
                str(RANK),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        found["mergekit-extract-lora (command)"] = lambda out: run_command(
            [
                py,
                "-m",
                "mergekit.scripts.extract_lora",
                "--model",
                str(ft),
                "--base-model",
                str(base),
                "--out-path",
                str(out),
                "--max-rank",
                str(RANK),
                "--embed-lora",
                "--quiet",
                "--lora-merge-cache",
                str(work / "mk-cache"),
                "--transformers-cache",
                str(work / "mk-cache"),
            ]
        )
    return found


def has_mergekit() -> bool:
    try:
        import mergekit  # noqa: F401
    except ImportError:
        return False
    return True


def measure(
    base: Path,
    ft: Path,
    work: Path,
    rounds: int,
    mergekit: bool,
    publish: Callable[[dict[str, Any]], None],
    command_rounds: int,
) -> dict[str, Any]:
    """Alternating rounds of every peer; `publish` gets the result after each round (so
    that a run cut short keeps what it measured). The two commands run in the first
    `command_rounds` rounds only (mergekit is slow)."""
    import torch

    todo = peers(base, ft, work, mergekit)
    warm = torch.randn(300, 200)  # LAPACK's and the randomized SVD's first calls, untimed
    torch.linalg.svd(warm, full_matrices=False)
    from fastmerge.lora import lora_factors

    lora_factors(warm, 4)
    times: dict[str, list[float]] = {name: [] for name in todo}
    errs: dict[str, dict[str, float]] = {}
    result: dict[str, Any] = {"rank": RANK, "planted_rank": PLANTED_RANK, "peers": {}}
    for r in range(rounds):
        for name, fn in todo.items():
            if name.endswith("(command)") and r >= command_rounds:
                continue
            out = work / f"out-{list(todo).index(name)}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            fn(out)
            times[name].append(time.perf_counter() - start)
            if name not in errs:
                errs[name] = errors(base, ft, out)
            shutil.rmtree(out, ignore_errors=True)
            print(f"round {r + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
        result["rounds"] = r + 1
        for name in todo:
            e = list(errs[name].values())
            result["peers"][name] = {
                "seconds": times[name],
                "median_s": statistics.median(times[name]),
                "modules": len(e),
                "mean_error": sum(e) / len(e),
                "max_error": max(e),
            }
        publish(result)
    return result


def report(result: dict[str, Any], machine: dict[str, Any]) -> str:
    p = result["peers"]
    plain = p["torch.linalg.svd"]["median_s"]
    lines = [
        f"# LoRA extraction, rank {result['rank']}: fastmerge vs torch.linalg.svd "
        "(and mergekit-extract-lora)",
        "",
        "| peer | median wall s | rounds | vs torch.linalg.svd | modules | mean rel. error "
        "| max rel. error |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in p.items():
        anchor = plain
        if name == "mergekit-extract-lora (command)":
            anchor = None
        ratio = f"{anchor / row['median_s']:.2f}x" if anchor else ""
        lines.append(
            f"| {name} | {row['median_s']:.2f} | {len(row['seconds'])} | {ratio} | "
            f"{row['modules']} | {row['mean_error']:.6f} | {row['max_error']:.6f} |"
        )
    cmd, mk = p.get("fastmerge extract-lora (command)"), p.get("mergekit-extract-lora (command)")
    mergekit = f", mergekit {machine['mergekit']}" if machine.get("mergekit") else ""
    lines.append("")
    lines.append(
        f"fastmerge (in process) is **{plain / p['fastmerge']['median_s']:.2f}x** faster "
        "than the plain torch.linalg.svd extraction (in process), at a mean relative "
        f"error of {p['fastmerge']['mean_error']:.6f} vs "
        f"{p['torch.linalg.svd']['mean_error']:.6f}."
    )
    if cmd and mk:
        lines.append(
            f"As commands (start-up and imports included): `fastmerge extract-lora` is "
            f"**{mk['median_s'] / cmd['median_s']:.2f}x** faster than "
            "`mergekit-extract-lora --embed-lora`."
        )
    lines += [
        "",
        f"A 168M-parameter float32 LLaMA (bench_merge_cli.py's base) and a fine-tune: every "
        f"2-D weight + a rank-{result['planted_rank']} change + noise; rank {result['rank']} "
        f"from every 2-D weight (embedding included). Rounds alternate between the peers. "
        f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, fastmerge "
        f"{machine['fastmerge']}{mergekit}; "
        f"load average before {result['load_before']}, after {result['load_after']} "
        "(a shared machine: compare the ratios, measured side by side).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default /tmp)")
    parser.add_argument("--name", default="extract_lora-cpu")
    parser.add_argument("--small", action="store_true", help="a 3.6M-parameter model")
    parser.add_argument("--skip-mergekit", action="store_true", help="leave the commands out")
    parser.add_argument("--keep", action="store_true", help="keep --workdir's checkpoints")
    parser.add_argument(
        "--command-rounds",
        type=int,
        default=None,
        help="rounds of the two commands (default: --rounds; mergekit is slow)",
    )
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fastmerge-bench-extract-lora-"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    from bench_merge_cli import machine_info

    machine = machine_info()
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    state: dict[str, Any] = {"text": ""}

    def publish(result: dict[str, Any]) -> None:
        result["load_before"] = load_before
        result["load_after"] = [round(x, 2) for x in os.getloadavg()]
        result["small"] = args.small
        result["machine"] = machine
        state["text"] = text = report(result, machine)
        (results / f"{args.name}.md").write_text(text)
        (results / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")

    try:
        base, ft = work / "base", work / "ft"
        if not (ft / "config.json").exists():
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(ft, ignore_errors=True)
            base, ft = build_pair(work, args.small)
        load_before = [round(x, 2) for x in os.getloadavg()]
        mergekit = has_mergekit() and not args.skip_mergekit
        command_rounds = args.rounds if args.command_rounds is None else args.command_rounds
        measure(base, ft, work, args.rounds, mergekit, publish, command_rounds)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = state["text"]
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
