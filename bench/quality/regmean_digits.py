"""RegMean, RegMean++ and Fisher merging on the Twin-Merging digits ``conflict`` task set.

The task set, the models, the training and the scoring are those of
``bench/quality/twin_digits.py`` (imported, not copied): one base MLP pre-trained on four
input distributions, four experts fine-tuned from it on tasks with their own input
transform and their own permutation of the ten labels, one shared 10-way output layer in
every merge. Score per task: merged accuracy / expert accuracy x 100 on the task's test
split ("normalized"), averaged over the four tasks; mean ± std over 3 seeds.

Methods (every knob chosen on the **validation** split, never on the test split):

* ``task_arithmetic``: scale in ``twin_digits.TA_SCALES``;
* ``regmean``: :func:`fastmerge.merge.regmean` of the four experts, each on its own task's
  training inputs (batches of 64), alpha in ``ALPHAS`` and bias mode in ``BIASES``
  (``"average"``: the paper; ``"solve"``: regressed with the weight);
* ``regmean++``: the same with ``sequential=True`` (each layer's inputs from the merged
  model), the same grid;
* ``fisher``: :func:`fastmerge.merge.fisher_merge` with each expert's diagonal Fisher on its
  training data (:func:`fastmerge.merge.fisher_information`), the label source
  (``"empirical"`` / ``"model"``) chosen on validation; ``average`` and ``base`` for context.

Target (issue 15): RegMean >= task arithmetic + 3 normalized points.

Run (about 1 CPU-minute per seed on 2 busy shared cores)::

    pip install ".[quality]"  # scikit-learn
    python bench/quality/regmean_digits.py           # 3 seeds: table, JSON and markdown
    python bench/quality/regmean_digits.py --quick   # 1 seed, fewer epochs (smoke run)

Writes ``bench/results/regmean_digits.json`` and ``.md`` (``--quick``: ``regmean_digits-quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import twin_digits as td  # noqa: E402  (the task set, models and training)

from fastmerge import merge  # noqa: E402

RESULTS = td.RESULTS
SEEDS = td.SEEDS
SET = "conflict"
ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
BIASES = ("average", "solve")
LABELS = ("empirical", "model")
BATCH = 64
METHODS = ("base", "average", "task_arithmetic", "fisher", "regmean", "regmean++")


def task_batches(exp: td.Experiment, split: str = "train") -> list[list[tuple]]:
    """Per expert: its task's (inputs, labels) in batches of BATCH."""
    out = []
    for task in exp.tasks:
        x, y = td.task_data(task, exp.digits, split)
        out.append(list(zip(x.split(BATCH), y.split(BATCH))))
    return out


def run_seed(exp: td.Experiment, alphas=ALPHAS, biases=BIASES, labels=LABELS) -> dict:
    """Every method's test scores for one trained experiment, knobs chosen on validation."""
    base, experts = exp.base_state, exp.expert_states
    data = task_batches(exp)
    scores: dict[str, float] = {}
    per_task: dict[str, list[float]] = {}
    knobs: dict[str, dict] = {}
    timing: dict[str, float] = {}

    def record(method: str, state: dict) -> None:
        per_task[method] = exp.static_accuracies(state, "test")
        scores[method] = exp.normalized(per_task[method], "test")

    def best(build: Callable[..., dict], grid: list[tuple]) -> tuple[dict, tuple]:
        merged = {knob: build(*knob) for knob in grid}
        chosen = max(grid, key=lambda knob: exp.static_score(merged[knob], "val"))
        return merged[chosen], chosen

    record("base", base)
    record("average", merge.average(experts))
    ta, (scale,) = exp.tuned(
        lambda s: merge.task_arithmetic(base, experts, scale=s), [(s,) for s in td.TA_SCALES]
    )
    record("task_arithmetic", ta)
    knobs["task_arithmetic"] = {"scale": scale}

    t0 = time.perf_counter()
    fishers = {
        lab: [merge.fisher_information(e, d, labels=lab) for e, d in zip(exp.experts, data)]
        for lab in labels
    }
    fisher, (lab,) = best(
        lambda lab: merge.fisher_merge(exp.experts, fishers[lab]).state_dict(),
        [(lab,) for lab in labels],
    )
    timing["fisher"] = time.perf_counter() - t0
    record("fisher", fisher)
    knobs["fisher"] = {"labels": lab}

    t0 = time.perf_counter()
    stats = {
        b: [merge.regmean_statistics(e, d, bias=b) for e, d in zip(exp.experts, data)]
        for b in biases
    }
    grid = [(a, b) for a in alphas for b in biases]
    rm, (alpha, bias) = best(
        lambda a, b: merge.regmean_from_statistics(exp.experts, stats[b], alpha=a).state_dict(),
        grid,
    )
    timing["regmean"] = time.perf_counter() - t0
    record("regmean", rm)
    knobs["regmean"] = {"alpha": alpha, "bias": bias}

    t0 = time.perf_counter()
    rpp, (alpha, bias) = best(
        lambda a, b: merge.regmean(
            exp.experts, data, alpha=a, bias=b, sequential=True
        ).state_dict(),
        grid,
    )
    timing["regmean++"] = time.perf_counter() - t0
    record("regmean++", rpp)
    knobs["regmean++"] = {"alpha": alpha, "bias": bias}
    return {
        "expert_accuracy": exp.expert_acc["test"],
        "normalized": scores,
        "per_task_accuracy": per_task,
        "knobs": knobs,
        "merge_seconds": timing,
    }


def summarize(runs: list[dict]) -> dict:
    methods = {m: [r["normalized"][m] for r in runs] for m in METHODS}
    means = {m: td.mean_std(v)[0] for m, v in methods.items()}
    gain = means["regmean"] - means["task_arithmetic"]
    return {
        "normalized": methods,
        "knobs": {m: [r["knobs"][m] for r in runs] for m in runs[0]["knobs"]},
        "targets": {
            "regmean_minus_task_arithmetic": gain,
            "regmean_ge_task_arithmetic_plus_3": gain >= 3.0,
        },
    }


def markdown(summary: dict, doc: dict) -> str:
    lines = [
        "# RegMean, RegMean++ and Fisher merging on the digits `conflict` task set",
        "",
        f"`python bench/quality/regmean_digits.py{' --quick' if doc['quick'] else ''}`; "
        f"{doc['machine']}, torch {doc['torch']}, seeds {doc['seeds']}, epochs "
        f"{doc['epochs']}; load average before {doc['load_before']}, after "
        f"{doc['load_after']}; {doc['seconds']:.0f} s wall.",
        "Normalized accuracy (merged / expert x 100 on each task's test split, mean over the "
        "four tasks), mean ± std over seeds; knobs chosen on validation.",
        "",
        "| method | normalized | knobs (per seed) |",
        "|---|---|---|",
    ]
    for m in METHODS:
        knobs = summary["knobs"].get(m, "")
        lines.append(f"| {m} | {td.fmt(summary['normalized'][m])} | {knobs} |")
    t = summary["targets"]
    lines += [
        "",
        f"RegMean - task arithmetic: {t['regmean_minus_task_arithmetic']:+.1f} points "
        f"(target >= +3: {t['regmean_ge_task_arithmetic_plus_3']}).",
    ]
    return "\n".join(lines) + "\n"


def run_all(seeds, epochs: dict[str, int], log: Optional[Callable[[str], None]] = print):
    digits = td.load_digits_split()
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        result = run_seed(td.Experiment(SET, digits, seed, epochs))
        result["seconds"] = time.perf_counter() - t0
        runs.append(result)
        if log:
            s = result["normalized"]
            log(
                f"seed {seed}: "
                + " ".join(f"{m} {s[m]:.1f}" for m in METHODS)
                + f" ({result['seconds']:.1f}s)"
            )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer epochs (smoke run)")
    parser.add_argument("--seeds", type=int, default=len(SEEDS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no contention)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The digits MLP has ReLU units that are 0 on every input of every task (and constant
    # pixels): those layers' Grams are singular and get the fallback ridge, with a warning
    # per layer and grid point. Said once here instead.
    print("note: singular Gram warnings (dead ReLU units: fallback ridge) are silenced")
    warnings.filterwarnings("ignore", message="regmean: the Gram matrix", category=RuntimeWarning)
    load_before = [round(v, 2) for v in os.getloadavg()]
    start = time.perf_counter()
    seeds = SEEDS[: 1 if args.quick else args.seeds]
    epochs = td.QUICK_EPOCHS if args.quick else td.EPOCHS
    runs = run_all(seeds, epochs, lambda s: print(s, flush=True))
    summary = summarize(runs)
    doc = {
        "benchmark": "regmean_digits",
        "set": SET,
        "quick": args.quick,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s)",
        "torch": torch.__version__,
        "seeds": list(seeds),
        "epochs": epochs,
        "grids": {
            "alpha": list(ALPHAS),
            "bias": list(BIASES),
            "fisher_labels": list(LABELS),
            "ta_scale": list(td.TA_SCALES),
        },  # fmt: skip
        "split": "test (knobs tuned on val)",
        "summary": summary,
        "runs": runs,
        "seconds": time.perf_counter() - start,
        "load_before": load_before,
        "load_after": [round(v, 2) for v in os.getloadavg()],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "regmean_digits-quick" if args.quick else "regmean_digits"
    text = markdown(summary, doc)
    print()
    print(text)
    for suffix, content in ((".json", json.dumps(doc, indent=1) + "\n"), (".md", text)):
        path = args.out / (name + suffix)
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(content)
        tmp.replace(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
