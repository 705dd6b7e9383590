"""RegMean speed, fastmerge vs plain torch, with the providers' rounds interleaved.

The workload, both providers and the agreement check are those of the packaged suite
(``fastmerge bench regmean``, :mod:`fastmerge.bench.regmean`); this script alternates the
two providers round by round (fastmerge, plain, fastmerge, plain, ...) so that a load spike
on a shared machine hits both sides alike, and reports per-round ratios and their median.

Run::

    python bench/regmean_interleaved.py [--rounds 3] [--batches 64 1024]

Writes ``bench/results/regmean-interleaved-cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fastmerge.bench import regmean as suite
from fastmerge.merge import regmean

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    layers, width, models, samples, _ = suite.DEFAULT
    load_before = [round(v, 2) for v in os.getloadavg()]
    start = time.perf_counter()
    reference = suite.reference(layers, width, models, samples)
    groups = []
    for batch in args.batches:
        w = suite.workload(layers, width, models, samples, batch)
        ours = regmean(w["models"], w["data"], alpha=suite.ALPHA).state_dict()
        agreement = suite._check_same(ours, reference)
        rounds = []
        for _ in range(args.rounds):
            t_ours = timed(regmean, w["models"], w["data"], alpha=suite.ALPHA)
            t_plain = timed(suite.plain_regmean, w["models"], w["data"], suite.ALPHA)
            rounds.append({"fastmerge": t_ours, "plain-torch": t_plain, "ratio": t_plain / t_ours})
            print(f"b{batch}: fastmerge {t_ours:.1f} s, plain {t_plain:.1f} s", flush=True)
        groups.append(
            {
                "case": f"mlp{layers}x{width}-n{samples}-b{batch}",
                "batch": batch,
                "rounds": rounds,
                "median_fastmerge_s": statistics.median(r["fastmerge"] for r in rounds),
                "median_plain_s": statistics.median(r["plain-torch"] for r in rounds),
                "median_ratio": statistics.median(r["ratio"] for r in rounds),
                "max_relative_weight_difference": agreement,
            }
        )
    doc = {
        "benchmark": "regmean-interleaved",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "seconds": time.perf_counter() - start,
        "groups": groups,
    }
    lines = [
        "# RegMean speed, rounds interleaved (bench/regmean_interleaved.py)",
        "",
        f"{doc['machine']}, torch {doc['torch']} ({doc['torch_threads']} threads); load "
        f"average before {load_before}, after {doc['load_after']}; {doc['seconds']:.0f} s.",
        "",
        "| case | fastmerge (median) | plain torch (median) | per-round ratios | median ratio |",
        "|---|---:|---:|---|---:|",
    ]
    for g in groups:
        ratios = ", ".join(f"{r['ratio']:.2f}" for r in g["rounds"])
        lines.append(
            f"| {g['case']} | {g['median_fastmerge_s']:.1f} s | {g['median_plain_s']:.1f} s | "
            f"{ratios} | **{g['median_ratio']:.2f}x** |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix, content in ((".json", json.dumps(doc, indent=1) + "\n"), (".md", text)):
        path = args.out / f"regmean-interleaved-cpu{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(content)
        tmp.replace(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
