"""Git Re-Basin quality on scikit-learn's bundled digits: the loss barrier between two models
trained from different seeds, raw, after weight matching and after activation matching.

Models, data and training are those of ``bench/quality/pleas_digits.py`` (its ``full``
setting): ``mlp`` (64 -> 128 -> 128 -> 10) and ``resnet`` (a small ResNet with BatchNorm),
Adam on the standardized 60 % training split, seeds ``1000 + 2 s`` and ``1001 + 2 s`` for
s = 0, 1, 2. For each pair, ``fastmerge.wsa.interpolation_curve`` evaluates the test
cross-entropy and accuracy at 11 evenly spaced alphas, BatchNorm statistics re-estimated on
the training inputs at every alpha, along three paths:

* ``raw``: model b as trained;
* ``weights``: ``align="weights"``, b aligned by :func:`fastmerge.pleas.weight_matching`
  (data-free; one batch only traces the model);
* ``activations``: ``align="permute"``, b aligned by activation matching on the training
  inputs.

Reported: the loss barrier ``Curve.barrier("loss")`` (the highest loss on the path above the
straight line between the end points) and the accuracy at alpha = 0.5, mean +- std over the
seeds. Target: the weight-matching barrier at most 1/3 of the raw barrier.

**Width.** Weight matching needs wide enough models (Git Re-Basin's barriers vanish with
width). ``resnet-xM`` is ``resnet`` with every width multiplied by ``M`` (stem and first
block 32 M channels, second block 64 M), trained the same way (``resnet``'s epochs);
``resnet-x1`` is ``resnet`` again (the same seeds give the same models), to report it on
another split.
``--archs resnet-x2,resnet-x4 --split val --add`` evaluates them on the validation split
and adds their rows to the existing results (rows already there are kept; each row names
its split).

Run (a few minutes on 2 CPU cores; ``--quick``: 1 seed, few epochs, 5 alphas)::

    python bench/quality/rebasin_digits.py [--quick] [--archs A,B] [--split val] [--add]

Writes ``bench/results/rebasin_digits.{json,md,png}`` (``rebasin_digits-quick.*`` with
``--quick``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.nn import functional as F

import fastmerge

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
SEEDS = (0, 1, 2)
ARCHS = ("mlp", "resnet")
PATHS = ("raw", "weights", "activations")
ALIGN = {"raw": None, "weights": "weights", "activations": "permute"}
ALPHAS = 11


def _digits_module():
    """bench/quality/pleas_digits.py: its data, models and training."""
    spec = importlib.util.spec_from_file_location("pleas_digits", HERE / "pleas_digits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


digits = _digits_module()


class WideResNet(torch.nn.Module):
    """``resnet`` of bench/quality/pleas_digits.py with every width times ``mult``."""

    def __init__(self, mult: int) -> None:
        super().__init__()
        c1, c2 = 32 * mult, 64 * mult
        self.conv1 = torch.nn.Conv2d(1, c1, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c1)
        self.relu = torch.nn.ReLU()
        self.layer1 = digits.BasicBlock(c1, c1)
        self.layer2 = digits.BasicBlock(c1, c2, stride=2)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.flatten = torch.nn.Flatten()
        self.fc = torch.nn.Linear(c2, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(self.flatten(self.pool(x)))


def width(arch: str) -> int:
    """The width multiplier of ``resnet-xM`` (1 for ``resnet``, 0 for the MLP)."""
    if arch == "mlp":
        return 0
    if arch == "resnet":
        return 1
    if arch.startswith("resnet-x") and arch[len("resnet-x") :].isdigit():
        return int(arch[len("resnet-x") :])
    raise ValueError(f"unknown arch {arch!r} (mlp, resnet or resnet-xM)")


def train_pair(arch: str, seed: int, data: dict):
    """Two models trained from seeds ``1000 + 2 seed`` and ``1001 + 2 seed`` (pleas_digits'
    ``full`` setting; ``resnet-xM`` built here, trained like ``resnet``)."""
    if arch in ("mlp", "resnet"):
        return digits.train_pair("full", arch, seed, data)
    build = digits.build
    digits.build = lambda _: WideResNet(width(arch))
    digits.EPOCHS.setdefault(arch, digits.EPOCHS["resnet"])
    try:
        return digits.train_pair("full", arch, seed, data)
    finally:
        digits.build = build


def evaluator(x: torch.Tensor, y: torch.Tensor):
    def evaluate(model):
        out = model(x)
        return {
            "loss": float(F.cross_entropy(out, y)),
            "accuracy": 100.0 * float((out.argmax(1) == y).double().mean()),
        }

    return evaluate


def run_pair(arch: str, seed: int, data: dict, alphas: int, split: str = "test") -> dict:
    a, b = train_pair(arch, seed, data)
    train = digits.batches(data["train"][0])
    evaluate = evaluator(*data[split])
    out = {}
    for path in PATHS:
        t = time.perf_counter()
        curve = fastmerge.wsa.interpolation_curve(
            a,
            b,
            evaluate,
            alphas=alphas,
            bn_data=train if arch != "mlp" else None,
            align=ALIGN[path],
            align_data=train,
            progress=False,
        )
        out[path] = {
            "loss_barrier": curve.barrier("loss"),
            "mid_accuracy": curve.metrics["accuracy"][len(curve.alphas) // 2],
            "curve": curve.to_dict(),
            "seconds": time.perf_counter() - t,
        }
    # Not needed for the curves: how far the descent went, and the weight-matching objective
    # sum <W_a, W_b permuted> at activation matching's permutations, for comparison.
    spec = fastmerge.pleas.permutation_groups(a, data["train"][0][:2])
    wm = fastmerge.pleas.weight_matching(a, b, spec=spec)
    act = fastmerge.pleas.match(a, b, train, spec)
    at_act = fastmerge.pleas.weight_matching(
        a, b, spec=spec, init={g: m.perm_b for g, m in act.items()}, max_iter=1
    )
    out["weights"]["sweeps"] = wm.sweeps
    out["weights"]["objective"] = list(wm.objective)
    out["activations"]["weights_objective"] = at_act.objective[0]
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: dict) -> dict:
    summary = {}
    for arch, recs in results.items():
        cell = {}
        for path in PATHS:
            m, s = mean_std([r[path]["loss_barrier"] for r in recs])
            am, asd = mean_std([r[path]["mid_accuracy"] for r in recs])
            cell[path] = {
                "barrier_mean": m,
                "barrier_std": s,
                "mid_acc_mean": am,
                "mid_acc_std": asd,
            }
        cell["weights_objective"] = {
            "identity": statistics.fmean(r["weights"]["objective"][0] for r in recs),
            "weights": statistics.fmean(r["weights"]["objective"][-1] for r in recs),
            "activations": statistics.fmean(r["activations"]["weights_objective"] for r in recs),
        }
        ratios = [r["weights"]["loss_barrier"] / max(r["raw"]["loss_barrier"], 1e-12) for r in recs]
        cell["weights_over_raw"] = statistics.fmean(ratios)
        cell["seeds"] = len(recs)
        cell["target_met"] = cell["weights"]["barrier_mean"] <= cell["raw"]["barrier_mean"] / 3
        summary[arch] = cell
    return summary


def table(summary: dict, n_seeds: int, splits: Optional[dict] = None) -> str:
    splits = splits or {}
    lines = [
        "| arch | split | seeds | path | loss barrier (mean +- std) | accuracy at alpha 0.5 (%) |",
        "|---|---|---|---|---|---|",
    ]
    for arch, cell in summary.items():
        for path in PATHS:
            c = cell[path]
            lines.append(
                f"| {arch} | {splits.get(arch, 'test')} | {cell.get('seeds', n_seeds)} | {path} | "
                f"{c['barrier_mean']:.3f} +- "
                f"{c['barrier_std']:.3f} | {c['mid_acc_mean']:.1f} +- {c['mid_acc_std']:.1f} |"
            )
    lines.append("")
    for arch, cell in summary.items():
        lines.append(
            f"- {arch} ({splits.get(arch, 'test')}): weight matching / raw barrier = "
            f"{cell['weights_over_raw']:.3f} (mean of per-seed ratios); target <= 1/3 "
            f"{'met' if cell['target_met'] else 'NOT met'}"
        )
    lines.append("")
    lines.append(
        "Weight-matching objective sum <W_a, W_b permuted> (mean over seeds) at the identity, "
        "at weight matching's permutations and at activation matching's:"
    )
    for arch, cell in summary.items():
        o = cell["weights_objective"]
        lines.append(f"- {arch}: {o['identity']:.2f} / {o['weights']:.2f} / {o['activations']:.2f}")
    return "\n".join(lines)


def plot(results: dict, path: Path, splits: Optional[dict] = None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for ax, (arch, recs) in zip(axes[0], results.items()):
        for path_name, color in zip(PATHS, ("tab:red", "tab:blue", "tab:green")):
            for i, r in enumerate(recs):
                c = r[path_name]["curve"]
                ax.plot(
                    c["alphas"],
                    c["metrics"]["loss"],
                    color=color,
                    alpha=0.8,
                    label=path_name if i == 0 else None,
                )
        ax.set_title(f"{arch}: {(splits or {}).get(arch, 'test')} loss on the path a -> b")
        ax.set_xlabel("alpha")
        ax.set_ylabel("cross-entropy")
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _merge_rows(old: dict, results: dict, summary: dict, splits: dict, runs: dict) -> None:
    """Add the archs of the results document ``old`` that this run did not compute."""
    for arch in old["summary"]:
        if arch in results:
            continue
        results[arch] = old["results"][arch]
        summary[arch] = old["summary"][arch]
        splits[arch] = old.get("splits", {}).get(arch, "test")
        runs[arch] = old.get("runs", {}).get(
            arch,
            {
                "load_average_before": old["machine"]["load_average_before"],
                "seconds": old["seconds"],
            },
        )
    order = sorted(summary, key=lambda a: (a == "mlp" and -1) or width(a))
    for d in (summary, results):
        items = {a: d.pop(a) for a in order}
        d.update(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, 5 alphas")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--archs", default=",".join(ARCHS), help="comma-separated: mlp, resnet, resnet-xM"
    )
    parser.add_argument("--split", default="test", choices=("val", "test"), help="evaluated on")
    parser.add_argument(
        "--add", action="store_true", help="keep the other archs' rows of the existing results"
    )
    parser.add_argument(
        "--also",
        type=Path,
        action="append",
        default=[],
        help="a results json whose archs' rows are added too (repeatable)",
    )
    args = parser.parse_args()
    archs = [a for a in args.archs.split(",") if a]
    for arch in archs:
        width(arch)  # fail early on a bad name
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load_before = list(os.getloadavg())
    seeds, alphas = (SEEDS[:1], 5) if args.quick else (SEEDS, ALPHAS)
    if args.quick:
        digits.EPOCHS = {"mlp": 3, "resnet": 2}
    for arch in archs:
        digits.EPOCHS.setdefault(arch, digits.EPOCHS["resnet"])
    data = digits.load_data()
    results: dict = {arch: [] for arch in archs}
    for arch in archs:
        for seed in seeds:
            rec = run_pair(arch, seed, data, alphas, args.split)
            results[arch].append(rec)
            print(
                f"{arch} seed {seed}: "
                + ", ".join(f"{p} {rec[p]['loss_barrier']:.3f}" for p in PATHS),
                flush=True,
            )
    summary = summarize(results)
    stem = "rebasin_digits" + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    splits = {arch: args.split for arch in archs}
    runs = {arch: {"load_average_before": load_before, "seconds": None} for arch in archs}
    previous = [args.out / f"{stem}.json"] if args.add else []
    for path in previous + list(args.also):
        if path.exists():
            _merge_rows(json.loads(path.read_text()), results, summary, splits, runs)
    for arch in archs:
        runs[arch]["seconds"] = time.perf_counter() - start
    for arch in summary:  # rows added from other runs: resnet-xM trains for resnet's epochs
        digits.EPOCHS.setdefault(arch, digits.EPOCHS["resnet"])
    doc = {
        "benchmark": "rebasin_digits",
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "load_average_before": load_before,
            "load_average_after": list(os.getloadavg()),
        },
        "seeds": list(seeds),
        "epochs": digits.EPOCHS,
        "alphas": alphas,
        "splits": splits,
        "widths": {arch: width(arch) for arch in summary},
        "runs": runs,
        "summary": summary,
        "results": results,
        "seconds": time.perf_counter() - start,
    }
    write(args.out / f"{stem}.json", json.dumps(doc, indent=1) + "\n")
    md = "\n".join(
        [
            "# Loss barriers on digits: raw, weight matching, activation matching",
            "",
            f"- {os.cpu_count()} CPUs, {args.threads} torch thread(s), torch {torch.__version__}; "
            f"load average before {load_before}, after {doc['machine']['load_average_after']}",
            f"- epochs {digits.EPOCHS}, {alphas} alphas, the split of each row; this run "
            f"{doc['seconds']:.0f} s",
        ]
        + [
            f"- {arch}: run with load average before {r['load_average_before']}, "
            f"{r['seconds']:.0f} s"
            for arch, r in runs.items()
            if r.get("seconds") is not None
        ]
        + [
            "",
            table(summary, len(seeds), splits),
            "",
        ]
    )
    write(args.out / f"{stem}.md", md)
    plot(results, args.out / f"{stem}.png", splits)
    print(md)


if __name__ == "__main__":
    main()
