"""Weight-matching speed: :func:`fastmerge.pleas.weight_matching` against Git Re-Basin's
algorithm written plainly with numpy and scipy, on two ResNet-18s.

Models: ResNet-18 with CIFAR widths (3x3 stem, BasicBlocks [2, 2, 2, 2] of widths
64-128-256-512, projection shortcuts, 10 classes; 11.2 M parameters, 12 permutation groups),
float32. Workloads:

* ``random``: two independent initializations (seeds 0 and 1);
* ``perturbed``: model b is model a with every group randomly permuted and Gaussian noise of
  the same standard deviation as each weight added (a correlated pair, as two briefly
  trained models are).

Peers, both given the same :class:`~fastmerge.pleas.PermutationSpec`, the same group order
per sweep (``torch.randperm`` draws from ``seed``) and the same acceptance rule (a group's
permutation is replaced when its cost rises by more than 1e-6 of the old one):

* ``fastmerge``: ``fastmerge.pleas.weight_matching(a, b, spec=spec, seed=seed)``;
* ``scipy-loop``: the reference's way: for each group in turn, for each of its parameter
  axes, the other axes of b's parameter permuted (``np.take``), the axis moved to the front
  and flattened, ``cost += w_a @ w_b.T`` (numpy float32), then
  ``scipy.optimize.linear_sum_assignment(cost, maximize=True)``;
* ``scipy-loop-torch``: the same loop with torch building the costs (``index_select``,
  ``movedim``, torch's GEMM), scipy solving them;
* ``rebasin`` (PyPI ``rebasin``, if installed and importable): its
  ``PermutationCoordinateDescent(a, b, x).rebasin()``; it finds its own groups and order,
  so only its time is comparable; it takes minutes, so it runs in the first round only
  (``--rebasin-rounds``: every round).

Rounds alternate the peers (``--rounds``, default 3) and the medians are reported, with the
final objective ``sum <W_a, W_b permuted>`` of each (must be equal, or fastmerge's higher).
Output: ``bench/results/weight_matching-cpu.{json,md}``.

Run: ``python bench/bench_weight_matching.py [--rounds N] [--quick]`` (``--quick``: one
round, the random workload only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

import fastmerge
from fastmerge.bench._machine import describe, header

RESULTS = Path(__file__).resolve().parent / "results"
STEM = "weight_matching-cpu"
SEED = 0
RTOL = 1e-6
PEERS = ("scipy-loop", "scipy-loop-torch", "fastmerge", "rebasin")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18 with CIFAR widths (3x3 stem, no max pool)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin, layers = 64, []
        for i, width in enumerate((64, 128, 256, 512)):
            layers.append(
                nn.Sequential(
                    BasicBlock(cin, width, 1 if i == 0 else 2), BasicBlock(width, width, 1)
                )
            )
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def workload(name: str) -> tuple[nn.Module, nn.Module, Any, torch.Tensor]:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(SEED))
    torch.manual_seed(SEED)
    a = ResNet18().eval()
    spec = fastmerge.pleas.permutation_groups(a, x)
    if name == "random":
        torch.manual_seed(SEED + 1)
        b = ResNet18().eval()
    else:
        gen = torch.Generator().manual_seed(SEED + 2)
        b = fastmerge.pleas.apply_permutation(a, spec, spec.random_perms(gen))
        with torch.no_grad():
            for p in b.parameters():
                std = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.1
                p.add_(torch.randn(p.shape, generator=gen) * std)
    return a, b, spec, x


def scipy_loop(a: nn.Module, b: nn.Module, spec: Any, seed: int, max_iter: int = 100) -> dict:
    """Git Re-Basin weight matching written plainly (numpy float32 costs, scipy LSA)."""
    pa = {k: v.detach().numpy() for k, v in a.named_parameters()}
    pb = {k: v.detach().numpy() for k, v in b.named_parameters()}
    axes: dict[str, list[tuple[str, int]]] = {}
    for g in spec.groups.values():
        for name, dim in g.axes:
            if name in pa:
                axes.setdefault(name, []).append((g.name, dim))
    perm = {g: np.arange(s.size) for g, s in spec.groups.items()}

    def permuted(name: str, skip: Optional[int] = None) -> np.ndarray:
        w = pb[name]
        for g, d in axes[name]:
            if d != skip:
                w = np.take(w, perm[g], axis=d)
        return w

    names = list(spec.groups)
    gen = torch.Generator().manual_seed(seed)
    sweeps = 0
    for _ in range(max_iter):
        sweeps += 1
        progress = False
        for i in torch.randperm(len(names), generator=gen).tolist():
            g = names[i]
            n = spec.groups[g].size
            cost = np.zeros((n, n), dtype=np.float64)
            for name, dim in spec.groups[g].axes:
                if name not in pa:
                    continue
                wa = np.moveaxis(pa[name], dim, 0).reshape(n, -1)
                wb = np.moveaxis(permuted(name, skip=dim), dim, 0).reshape(n, -1)
                cost += wa @ wb.T
            _, cols = linear_sum_assignment(cost, maximize=True)
            old = cost[np.arange(n), perm[g]].sum()
            new = cost[np.arange(n), cols].sum()
            if new - old > RTOL * max(abs(old), abs(new)):
                perm[g] = cols
                progress = True
        if not progress:
            break
    return {"perm_b": perm, "sweeps": sweeps}


def scipy_loop_torch(a: nn.Module, b: nn.Module, spec: Any, seed: int, max_iter: int = 100) -> dict:
    """The same loop with the cost matrices built by torch (its GEMMs) instead of numpy."""
    pa = {k: v.detach() for k, v in a.named_parameters()}
    pb = {k: v.detach() for k, v in b.named_parameters()}
    axes: dict[str, list[tuple[str, int]]] = {}
    for g in spec.groups.values():
        for name, dim in g.axes:
            if name in pa:
                axes.setdefault(name, []).append((g.name, dim))
    perm = {g: torch.arange(s.size) for g, s in spec.groups.items()}

    def permuted(name: str, skip: int) -> torch.Tensor:
        w = pb[name]
        for g, d in axes[name]:
            if d != skip:
                w = w.index_select(d, perm[g])
        return w

    names = list(spec.groups)
    gen = torch.Generator().manual_seed(seed)
    sweeps = 0
    with torch.no_grad():
        for _ in range(max_iter):
            sweeps += 1
            progress = False
            for i in torch.randperm(len(names), generator=gen).tolist():
                g = names[i]
                n = spec.groups[g].size
                cost = torch.zeros(n, n, dtype=torch.float64)
                for name, dim in spec.groups[g].axes:
                    if name not in pa:
                        continue
                    wa = pa[name].movedim(dim, 0).reshape(n, -1)
                    wb = permuted(name, dim).movedim(dim, 0).reshape(n, -1)
                    cost += (wa @ wb.T).double()
                c = cost.numpy()
                _, cols = linear_sum_assignment(c, maximize=True)
                old = c[np.arange(n), perm[g].numpy()].sum()
                new = c[np.arange(n), cols].sum()
                if new - old > RTOL * max(abs(old), abs(new)):
                    perm[g] = torch.from_numpy(cols)
                    progress = True
            if not progress:
                break
    return {"perm_b": {g: p.numpy() for g, p in perm.items()}, "sweeps": sweeps}


def run_fastmerge(a: nn.Module, b: nn.Module, spec: Any, seed: int) -> dict:
    wm = fastmerge.pleas.weight_matching(a, b, spec=spec, seed=seed)
    perm = {g: p.numpy() for g, p in wm.perm_b.items()}
    return {"perm_b": perm, "sweeps": wm.sweeps}


def run_rebasin(a: nn.Module, b: nn.Module, x: torch.Tensor) -> Optional[dict]:
    try:
        from rebasin import PermutationCoordinateDescent
    except Exception:  # not installed or its dependencies are missing
        return None
    import copy

    b = copy.deepcopy(b)
    pcd = PermutationCoordinateDescent(a, b, x)
    pcd.rebasin()
    return {"perm_b": None, "sweeps": None}


def objective(a: nn.Module, b: nn.Module, spec: Any, perm: dict) -> float:
    """``sum <W_a, W_b permuted>`` over the parameters in the groups, in float64 (one
    function for both peers)."""
    aligned = dict(fastmerge.pleas.apply_permutation(b, spec, perm).named_parameters())
    names = {ax.name for g in spec.groups.values() for ax in g.axes}
    total = 0.0
    for name, p in a.named_parameters():
        if name in names:
            w = aligned[name].detach()
            total += float(torch.dot(p.detach().double().ravel(), w.double().ravel()))
    return total


def gemm_work(a: nn.Module, b: nn.Module, spec: Any, seed: int) -> dict:
    """fastmerge's GEMM multiply-adds (one untimed, instrumented run) in units of one full
    sweep's (every group's whole cost built once, which the scipy loop does every sweep)."""
    import importlib

    module = importlib.import_module("fastmerge.pleas.weight_matching")
    counts = {"full": 0, "incremental": 0}
    original = module._Term.gemm

    def counting(term, x, y):
        kind = "incremental" if x.shape[1] != term.a.shape[1] else "full"
        counts[kind] += x.shape[0] * x.numel()
        return original(term, x, y)

    module._Term.gemm = counting
    try:
        module.weight_matching(a, b, spec=spec, seed=seed)
    finally:
        module._Term.gemm = original
    params = dict(a.named_parameters())
    sweep = sum(
        params[ax.name].numel() * g.size
        for g in spec.groups.values()
        for ax in g.axes
        if ax.name in params
    )
    return {k: v / sweep for k, v in counts.items()}


def timed(fn, *args) -> tuple[float, float, dict]:
    """Wall seconds, process CPU seconds (all threads) and the result of ``fn(*args)``."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - t, time.process_time() - c, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--rebasin-rounds", action="store_true", help="time PyPI rebasin every round, not once"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for every peer (default: torch's); results get a -tN suffix",
    )
    args = parser.parse_args()
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    rounds = 1 if args.quick else args.rounds
    names = ("random",) if args.quick else ("random", "perturbed")
    load_before = list(os.getloadavg())
    rows = []
    for name in names:
        a, b, spec, x = workload(name)
        times: dict[str, list[float]] = {p: [] for p in PEERS}
        cpu: dict[str, list[float]] = {p: [] for p in PEERS}
        results: dict[str, dict] = {}
        for r in range(rounds):
            for peer in PEERS:
                if peer == "scipy-loop":
                    t, c, out = timed(scipy_loop, a, b, spec, SEED)
                elif peer == "scipy-loop-torch":
                    t, c, out = timed(scipy_loop_torch, a, b, spec, SEED)
                elif peer == "fastmerge":
                    t, c, out = timed(run_fastmerge, a, b, spec, SEED)
                else:
                    if r > 0 and not args.rebasin_rounds:
                        continue  # minutes per run: once is enough to place it
                    t, c, out = timed(run_rebasin, a, b, x)
                    if out is None:
                        continue
                times[peer].append(t)
                cpu[peer].append(c)
                results[peer] = out
                print(f"{name} round {r} {peer}: {t:.2f} s", file=sys.stderr, flush=True)
        med = {p: statistics.median(v) for p, v in times.items() if v}
        med_cpu = {p: statistics.median(v) for p, v in cpu.items() if v}
        work = gemm_work(a, b, spec, SEED)
        row = {
            "workload": f"resnet18-cifar-{name}",
            "groups": len(spec.groups),
            "parameters": sum(p.numel() for p in a.parameters()),
            "median_s": med,
            "median_cpu_s": med_cpu,
            # Peers of one round run back to back: the median of the per-round ratios is
            # less exposed to the load drifting between rounds than the ratio of medians.
            "speedup_paired": {
                p: statistics.median(t / f for t, f in zip(times[p], times["fastmerge"]))
                for p in med
                if p != "fastmerge"
            },
            "all_cpu_s": cpu,
            "speedup_cpu": {
                p: med_cpu[p] / med_cpu["fastmerge"] for p in med_cpu if p != "fastmerge"
            },
            "all_times_s": times,
            "speedup": {p: med[p] / med["fastmerge"] for p in med if p != "fastmerge"},
            "objective": {
                p: objective(a, b, spec, out["perm_b"])
                for p, out in results.items()
                if out["perm_b"] is not None
            },
            "sweeps": {p: out["sweeps"] for p, out in results.items() if out["sweeps"]},
            "fastmerge_gemm_work_in_sweeps": work,
            "same_permutations": {
                p: all(
                    np.array_equal(results["fastmerge"]["perm_b"][g], out["perm_b"][g])
                    for g in spec.groups
                )
                for p, out in results.items()
                if p != "fastmerge" and out["perm_b"] is not None
            },
        }
        rows.append(row)
    machine = describe("cpu")
    machine["load_average_before"] = load_before
    machine["load_average_after"] = list(os.getloadavg())
    doc = {"rounds": rounds, "seed": SEED, "machine": machine, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = STEM + ("-quick" if args.quick else "")
    stem += f"-t{args.torch_threads}" if args.torch_threads is not None else ""
    tmp = args.out / f".{stem}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(args.out / f"{stem}.json")
    lines = [
        "# Weight matching: fastmerge vs a plain scipy loop (ResNet-18, CIFAR widths)",
        "",
        header(machine),
        f"- load average before {load_before}, after {machine['load_average_after']}",
        f"- medians of {rounds} rounds, peers alternated in one run; same spec, group order "
        "and acceptance rule",
        "",
        "| workload | peer | median (s) | fastmerge's speed-up | median CPU time (s) "
        "| speed-up in CPU time | final objective | sweeps | same permutations as fastmerge |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for p, t in r["median_s"].items():
            obj = r["objective"].get(p)
            lines.append(
                f"| {r['workload']} | {p} | {t:.2f} | "
                + (f"{r['speedup'][p]:.1f}x" if p in r["speedup"] else "-")
                + f" | {r['median_cpu_s'][p]:.2f} | "
                + (f"{r['speedup_cpu'][p]:.1f}x" if p in r["speedup_cpu"] else "-")
                + f" | {f'{obj:.8g}' if obj is not None else 'n/a (own groups)'} | "
                + f"{r['sweeps'].get(p, 'n/a')} | {r['same_permutations'].get(p, '-')} |"
            )
    lines += [""]
    for r in rows:
        lines.append(
            f"- {r['workload']}: wall times per round (s): "
            + "; ".join(
                f"{p} {', '.join(f'{t:.2f}' for t in v)}" for p, v in r["all_times_s"].items() if v
            )
        )
    for r in rows:
        lines.append(
            f"- {r['workload']}: median of the per-round speed-ups: "
            + ", ".join(f"{p} {v:.1f}x" for p, v in r["speedup_paired"].items())
        )
    for r in rows:
        w = r["fastmerge_gemm_work_in_sweeps"]
        lines.append(
            f"- {r['workload']}: fastmerge's GEMM work = {w['full']:.2f} full sweeps + "
            f"{w['incremental']:.2f} in incremental updates; the scipy loops do "
            f"{r['sweeps']['scipy-loop']} full sweeps (one per sweep)"
        )
    lines += [
        "",
        "rebasin (PyPI) traces the model itself and visits the groups in its own order, so "
        "only its time compares; the final objective is sum <W_a, W_b permuted> over the "
        "parameters in the groups, in float64, computed the same way for every peer.",
    ]
    tmp = args.out / f".{stem}.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out / f"{stem}.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
