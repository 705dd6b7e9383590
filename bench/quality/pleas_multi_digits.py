"""PLeaS with three models on scikit-learn's bundled digits (8x8 images, 1,797 samples).

Three models of the same architecture are trained from different seeds and merged into one
with ``fastmerge.pleas.merge_many`` (N = 3; budgets in relative Conv/Linear FLOPs, 1.0x =
one model, 3.0x = the three side by side).

Settings:

* ``full``: all three models are trained on all ten classes, from different seeds (the
  issue's quality target: PLeaS at 1.0x beats averaging after alignment to one reference);
* ``disjoint``: model 0 is trained on the samples of classes 0-3, model 1 on 4-6 and
  model 2 on 7-9, all with the shared 10-way head.

Every merged model is evaluated on the test samples of all ten classes.

Methods: ``average`` (plain weight average of the three, 1.0x), ``permute`` (models 1 and 2
aligned to model 0 by activation matching, then averaged, 1.0x), ``permute-iter`` (the same
after two iterative rounds re-matching each model to the mean of the others), ``zipit``
(stage-wise partial zipping, no least squares), ``pleas`` (reference alignment), and
``pleas-iter`` (two iterative rounds) at 1.0x, plus ``ensemble`` (the three models' averaged
logits, 3x) and the three models alone. Every method re-estimates BatchNorm statistics on
its merge data (all training inputs, unlabeled).

Data, architectures (``mlp``: 64 -> 128 -> 128 -> 10; ``resnet``: a small two-block ResNet),
training and the PLeaS configuration (``DEFAULT_PLEAS``: cost ``neg_sq_distance``, ridge
1e-4, greedy allocation, ``sequential=True``, chosen on the validation split in the two-model
study) are those of ``bench/quality/pleas_digits.py``, imported from it.

Run (17 minutes on 2 shared CPU cores at load average 8-10; ``--quick`` 11 s)::

    pip install -e ".[quality]"  # scikit-learn
    python bench/quality/pleas_multi_digits.py            # 3 seeds, both settings and archs
    python bench/quality/pleas_multi_digits.py --quick    # 1 seed, mlp, full, few epochs

Writes ``bench/results/pleas_multi_digits.json`` and ``.md`` (``--quick``:
``pleas_multi_digits-quick.*``).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from fastmerge.pleas import Ensemble, merge_many

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("pleas_digits", _HERE / "pleas_digits.py")
two = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("pleas_digits", two)
_spec.loader.exec_module(two)

RESULTS = _HERE.parent / "results"
N_MODELS = 3
BUDGETS = (1.0, 1.5, 2.0, 3.0)
SEEDS = (0, 1, 2)
SETTINGS = ("full", "disjoint")
ARCHS = ("mlp", "resnet")
SPLITS = ((0, 4), (4, 7), (7, 10))  # disjoint: the classes of each model
ROUNDS = 2  # the iterative variant's rounds
QUICK = {"seeds": 1, "settings": ("full",), "archs": ("mlp",), "budgets": (1.0, 1.5),
         "epochs": {"mlp": 15, "resnet": 5}}  # fmt: skip
ROWS = ("average", "permute", "permute-iter", "zipit", "pleas", "pleas-iter", "ensemble")


def train_three(setting, arch, seed, data, epochs):
    x, y = data["train"]
    saved = dict(two.EPOCHS)
    two.EPOCHS.update(epochs)
    try:
        models = []
        for i in range(N_MODELS):
            s = 2000 + N_MODELS * seed + i
            if setting == "disjoint":
                lo, hi = SPLITS[i]
                keep = (y >= lo) & (y < hi)
                models.append(two.train(arch, x[keep], y[keep], s))
            else:
                models.append(two.train(arch, x, y, s))
    finally:
        two.EPOCHS.clear()
        two.EPOCHS.update(saved)
    return models


def merged_models(models, data, budgets):
    """Yield (method, budget, model) for every method and budget."""
    own = two.batches(data["train"][0])
    kw = two.DEFAULT_PLEAS
    yield "average", 1.0, merge_many(models, own, method="average")
    yield "permute", 1.0, merge_many(models, own, method="permute")
    yield "permute-iter", 1.0, merge_many(models, own, method="permute", rounds=ROUNDS)
    for budget in budgets:
        yield "zipit", budget, merge_many(models, own, method="zipit", budget=budget)
        yield "pleas", budget, merge_many(models, own, method="pleas", budget=budget, **kw)
    yield "pleas-iter", 1.0, merge_many(models, own, method="pleas", rounds=ROUNDS, **kw)
    yield "ensemble", float(N_MODELS), Ensemble(*models)


def run(seeds, settings, archs, budgets, epochs, log, data=None):
    """{setting: {arch: {"models": [[acc per model] per seed], method: {budget: [acc]}}}}."""
    data = two.load_data() if data is None else data
    xs, ys = data["test"]
    out = {}
    for setting, arch in itertools.product(settings, archs):
        cell = out.setdefault(setting, {}).setdefault(arch, {"models": []})
        for seed in seeds:
            t0 = time.perf_counter()
            models = train_three(setting, arch, seed, data, epochs)
            cell["models"].append([two.accuracy(m, xs, ys) for m in models])
            t1 = time.perf_counter()
            for method, budget, model in merged_models(models, data, budgets):
                acc = two.accuracy(model, xs, ys)
                cell.setdefault(method, {}).setdefault(f"{budget:.1f}", []).append(acc)
            log(
                f"{setting:8s} {arch:6s} seed {seed}: models "
                + " ".join(f"{a:.1f}" for a in cell["models"][-1])
                + f" | permute {cell['permute']['1.0'][-1]:.1f} "
                f"pleas@1.0 {cell['pleas']['1.0'][-1]:.1f} "
                f"(train {t1 - t0:.1f}s, merge {time.perf_counter() - t1:.1f}s)"
            )
    return out


def fmt(values):
    return "{:.1f} ± {:.1f}".format(*two.mean_std(values))


def table(results, budgets):
    cols = sorted(set(budgets) | {1.0, float(N_MODELS)})
    lines = ["| setting | arch | method | " + " | ".join(f"{b:.1f}x" for b in cols) + " |"]
    lines.append("|" + "---|" * (3 + len(cols)))
    for setting, archs in results.items():
        for arch, cell in archs.items():
            for i in range(N_MODELS):
                accs = [seed[i] for seed in cell["models"]]
                vals = [fmt(accs) if b == 1.0 else "" for b in cols]
                lines.append(f"| {setting} | {arch} | model {i} | " + " | ".join(vals) + " |")
            for m in ROWS:
                vals = [fmt(cell[m][f"{b:.1f}"]) if f"{b:.1f}" in cell[m] else "" for b in cols]
                lines.append(f"| {setting} | {arch} | {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def targets(results):
    """The issue's target on the means: PLeaS 1.0x > averaging after alignment."""
    checks = []
    for setting, archs in results.items():
        for arch, cell in archs.items():
            mean = {m: two.mean_std(cell[m]["1.0"])[0] for m in ROWS if "1.0" in cell[m]}
            checks.append(
                {
                    "setting": setting,
                    "arch": arch,
                    "pleas_minus_permute_at_1.0": mean["pleas"] - mean["permute"],
                    "pleas_beats_permute_at_1.0": mean["pleas"] > mean["permute"],
                    "pleas_iter_minus_pleas_at_1.0": mean["pleas-iter"] - mean["pleas"],
                    "permute_iter_minus_permute": mean["permute-iter"] - mean["permute"],
                }
            )
    return checks


def machine(threads):
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {threads} torch thread(s)"


def markdown(doc, results, budgets):
    load = doc["load_average"]
    lines = [
        "# PLeaS with three models on digits (`bench/quality/pleas_multi_digits.py`)",
        "",
        f"Machine: {doc['machine']}; torch {doc['torch']}; load average (1 min) "
        f"{load['before'][0]:.2f} before, {load['after'][0]:.2f} after; "
        f"{doc['seconds']:.0f} s. Seeds {doc['seeds']}; test accuracy (%) on all ten classes, "
        f"mean ± std over the seeds.",
        "",
        table(results, budgets),
        "",
        "| setting | arch | PLeaS 1.0x - permute | PLeaS-iter - PLeaS (1.0x) "
        "| permute-iter - permute |",
        "|---|---|---|---|---|",
    ]
    for c in doc["targets"]:
        lines.append(
            f"| {c['setting']} | {c['arch']} | {c['pleas_minus_permute_at_1.0']:+.1f} | "
            f"{c['pleas_iter_minus_pleas_at_1.0']:+.1f} | {c['permute_iter_minus_permute']:+.1f} |"
        )
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, mlp, full, few epochs")
    parser.add_argument("--seeds", type=int, default=len(SEEDS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no contention)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    before = os.getloadavg()
    if args.quick:
        seeds, settings, archs = SEEDS[: QUICK["seeds"]], QUICK["settings"], QUICK["archs"]
        budgets, epochs = QUICK["budgets"], QUICK["epochs"]
    else:
        seeds, settings, archs, budgets, epochs = (
            SEEDS[: args.seeds], SETTINGS, ARCHS, BUDGETS, dict(two.EPOCHS),
        )  # fmt: skip
    results = run(seeds, settings, archs, budgets, epochs, lambda s: print(s, flush=True))
    doc = {
        "benchmark": "pleas_multi_digits",
        "quick": args.quick,
        "machine": machine(args.threads),
        "torch": torch.__version__,
        "n_models": N_MODELS,
        "seeds": list(seeds),
        "budgets": list(budgets),
        "rounds": ROUNDS,
        "pleas_config": two.DEFAULT_PLEAS,
        "epochs": epochs,
        "split": "test",
        "accuracy": results,
        "targets": targets(results),
        "load_average": {"before": list(before), "after": list(os.getloadavg())},
        "seconds": time.perf_counter() - start,
    }
    md = markdown(doc, results, budgets)
    print()
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "pleas_multi_digits-quick" if args.quick else "pleas_multi_digits"
    write_atomic(args.out / f"{name}.json", json.dumps(doc, indent=1) + "\n")
    write_atomic(args.out / f"{name}.md", md)
    print(f"wrote {args.out / name}.json and .md")


if __name__ == "__main__":
    main()
