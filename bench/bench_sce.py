"""SCE of one tensor: ``fastmerge.ops.sce_combine`` (with ``sce_variance``) against the
torch path it replaced, side by side in one run.

Both sides run the whole SCE merge of one float32 tensor with 3 experts: ``torch-passes``
is fastmerge's former ``sce`` (τ copies, the variance in torch passes, the top-k threshold
by ``ops.magnitude_threshold``, the mask multiplies, ``ops.gram`` for the energies, the
election and weighted mean in ~27 in-place torch passes); ``sce_combine`` is the method
now (the fused variance pass, the same threshold, then the fused energy and combine
passes). Both at ``select_topk`` 0.3 (the setting of bench/merge_methods.py) and 1.0 (no
selection), and the variance step alone (torch passes vs ``ops.sce_variance``). Rounds
alternate between the sides; medians, ratios, the load average before and after.

Run: ``python bench/bench_sce.py [--rounds 7] [--name sce-cpu]``; results go to
``bench/results/<name>.{md,json}``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any, Callable

import _side_by_side as side_by_side
import torch

import fastmerge
from fastmerge import ops
from fastmerge.engine.methods import sce

SHAPE = (3072, 768)
EXPERTS = 3


def _torch_variance(taus: list[torch.Tensor]) -> torch.Tensor:
    mean = torch.zeros_like(taus[0])
    for tau in taus:
        mean += tau
    mean /= len(taus)
    var = torch.zeros_like(mean)
    for tau in taus:
        deviation = tau - mean
        var.addcmul_(deviation, deviation)
    return var.div_(len(taus))


def former_sce(base: torch.Tensor, experts: list[torch.Tensor], topk: float) -> torch.Tensor:
    """fastmerge's sce before ops.sce_combine (select_topk in (0, 1])."""
    taus = [x - base for x in experts]
    if topk < 1:
        var = _torch_variance(taus)
        k = int(torch.count_nonzero(var).item() * topk)
        thr = ops.magnitude_threshold(torch.zeros_like(var), [var], k)[0]
        mask = var >= thr
        for tau in taus:
            tau.mul_(mask)
    n = max(base.numel(), 1)
    energy = [x / n for x in torch.diagonal(ops.gram(taus)).tolist()]
    total = sum(energy)
    weights = [e / total for e in energy] if abs(total) >= 1e-6 else [1 / len(taus)] * len(taus)
    total = torch.zeros_like(base)
    for tau in taus:
        total += tau
    positive = total >= 0
    merged, divisor = total.zero_(), torch.zeros_like(base)
    for w, tau in zip(weights, taus):
        agrees = torch.where(positive, tau > 0, tau < 0)
        merged.add_(tau.mul_(agrees), alpha=w)
        divisor.add_(agrees, alpha=w)
    return merged.div_(divisor.clamp_(min=1e-6)).add_(base)


def fused_sce(base: torch.Tensor, experts: list[torch.Tensor], topk: float) -> torch.Tensor:
    task = SimpleNamespace(base_index=0, shared={"select_topk": topk})
    return sce.merge(task, [base, *experts])


PEERS: dict[str, Callable[..., Any]] = {"torch-passes": former_sce, "sce_combine": fused_sce}
VARIANCE: dict[str, Callable[..., Any]] = {
    "torch-passes": lambda b, es: _torch_variance([e - b for e in es]),
    "sce_variance": ops.sce_variance,
}


def _alternate(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def measure(rounds: int) -> dict[str, Any]:
    result: dict[str, Any] = {"load_before": os.getloadavg(), "cases": {}}
    g = torch.Generator().manual_seed(0)
    base = torch.randn(SHAPE, generator=g)
    experts = [base + 0.01 * (t + 1) * torch.randn(SHAPE, generator=g) for t in range(EXPERTS)]
    for topk in (0.3, 1.0):
        diff = (former_sce(base, experts, topk) - fused_sce(base, experts, topk)).abs().max()
        fns = {name: (lambda f=fn, k=topk: f(base, experts, k)) for name, fn in PEERS.items()}
        times = _alternate(fns, rounds)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        result["cases"][f"merge, select_topk {topk}"] = {
            "seconds": times, "median_s": medians, "max_abs_difference": diff.item(),
            "speedup": medians["torch-passes"] / medians["sce_combine"],
        }  # fmt: skip
    fns = {name: (lambda f=fn: f(base, experts)) for name, fn in VARIANCE.items()}
    times = _alternate(fns, rounds)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    result["cases"]["variance step alone"] = {
        "seconds": times, "median_s": medians,
        "speedup": medians["torch-passes"] / medians["sce_variance"],
    }  # fmt: skip
    result["load_after"] = os.getloadavg()
    result["rounds"] = rounds
    result["threads"] = fastmerge.get_num_threads()
    return result


def report(result: dict[str, Any], machine: dict[str, Any]) -> str:
    lines = [
        "# SCE of one tensor: `ops.sce_combine` vs the former torch path (CPU)",
        "",
        f"Medians of {result['rounds']} alternating rounds; one {SHAPE[0]}x{SHAPE[1]} float32 "
        f"tensor, {EXPERTS} experts; fastmerge threads: {result['threads']}.",
        "",
        "| case | torch passes (ms) | fused (ms) | speedup | max abs difference |",
        "|---|---|---|---|---|",
    ]
    for case, r in result["cases"].items():
        old, new = r["median_s"].values()
        diff = r.get("max_abs_difference")
        diff_text = "" if diff is None else f"{diff:.1e}"
        lines.append(
            f"| {case} | {old * 1e3:.1f} | {new * 1e3:.1f} | {r['speedup']:.1f}x | {diff_text} |"
        )
    lines += side_by_side.footer(result, machine)
    return "\n".join(lines)


def main(argv=None) -> int:
    return side_by_side.main(__doc__.splitlines()[0], "sce-cpu", measure, report, argv)


if __name__ == "__main__":
    sys.exit(main())
