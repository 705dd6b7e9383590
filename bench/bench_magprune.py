"""DELLA's MAGPRUNE of one expert: ``fastmerge.ops.magprune`` against the torch path it
replaced, side by side in one run.

Both sides do the whole per-expert selection of DELLA on one float32 tensor: the keep
mask by ascending |τ| rank per row, the L1 norms of τ and of the kept τ (the rescale) and
the kept τ itself. ``torch-argsort`` is fastmerge's former path (``argsort`` per row,
a scatter of the ranks, ``torch.rand`` from a ``torch.Generator``, the probability tensor,
the mask, the masked τ); ``magprune`` is the fused op (per row an exact radix rank, the
counter-based hash, the mask and the sums in one pass). Rounds alternate between the two;
the report gives medians and their ratio, with the load average before and after.

Run: ``python bench/bench_magprune.py [--rounds 7] [--name magprune-cpu]``; results go to
``bench/results/<name>.{md,json}``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Callable

import _side_by_side as side_by_side
import torch

import fastmerge

SHAPES = [(3072, 768), (768, 768)]
DENSITY, EPSILON, SEED = 0.5, 0.15, 1234


def former_path(base: torch.Tensor, expert: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """fastmerge's DELLA selection before ops.magprune (2-D tensors): mask by per-row
    argsort ranks and a torch.Generator's uniforms, L1 norms, masked τ."""
    magnitude = (expert - base).abs_()
    width = magnitude.shape[1]
    order = torch.argsort(magnitude, dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(width).expand_as(order))
    probs = (DENSITY - EPSILON) + ranks.to(torch.float32) / max(width - 1, 1) * (2 * EPSILON)
    uniform = torch.rand(magnitude.shape, generator=torch.Generator().manual_seed(SEED))
    keep = uniform < probs
    before = magnitude.sum().item()
    after = torch.where(keep, magnitude, 0).sum().item()
    kept = (expert - base).mul_(keep)
    return kept, before, after


def fused_path(base: torch.Tensor, expert: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    kept, norms = fastmerge.ops.magprune(base, expert, DENSITY, EPSILON, seed=SEED)
    before, after = norms.tolist()
    return kept, before, after


PEERS: dict[str, Callable[..., Any]] = {"torch-argsort": former_path, "magprune": fused_path}


def measure(rounds: int) -> dict[str, Any]:
    result: dict[str, Any] = {"load_before": os.getloadavg(), "shapes": {}}
    for shape in SHAPES:
        g = torch.Generator().manual_seed(0)
        base = torch.randn(shape, generator=g)
        expert = base + 0.01 * torch.randn(shape, generator=g)
        times: dict[str, list[float]] = {name: [] for name in PEERS}
        rates = {}
        for name, fn in PEERS.items():  # warm-up, and the keep rate of each
            kept, before, after = fn(base, expert)
            rates[name] = (kept != 0).float().mean().item()
        for _ in range(rounds):
            for name, fn in PEERS.items():
                start = time.perf_counter()
                fn(base, expert)
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        result["shapes"]["x".join(map(str, shape))] = {
            "seconds": times,
            "median_s": medians,
            "keep_rate": rates,
            "speedup": medians["torch-argsort"] / medians["magprune"],
        }
    result["load_after"] = os.getloadavg()
    result["rounds"] = rounds
    return result


def report(result: dict[str, Any], machine: dict[str, Any]) -> str:
    lines = [
        "# DELLA MAGPRUNE of one expert: `ops.magprune` vs the former torch path (CPU)",
        "",
        f"Medians of {result['rounds']} alternating rounds, float32, density {DENSITY}, "
        f"epsilon {EPSILON}; mask + L1 norms + kept τ on both sides.",
        "",
        "| tensor | torch-argsort (ms) | magprune (ms) | speedup | keep rate (torch / magprune) |",
        "|---|---|---|---|---|",
    ]
    for shape, r in result["shapes"].items():
        m, k = r["median_s"], r["keep_rate"]
        lines.append(
            f"| {shape} | {m['torch-argsort'] * 1e3:.1f} | {m['magprune'] * 1e3:.1f} | "
            f"{r['speedup']:.1f}x | {k['torch-argsort']:.4f} / {k['magprune']:.4f} |"
        )
    lines += side_by_side.footer(result, machine)
    return "\n".join(lines)


def main(argv=None) -> int:
    return side_by_side.main(__doc__.splitlines()[0], "magprune-cpu", measure, report, argv)


if __name__ == "__main__":
    sys.exit(main())
