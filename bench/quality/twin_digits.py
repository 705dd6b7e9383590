"""Twin-Merging quality benchmark on scikit-learn's bundled digits (8x8 images, 1,797 samples).

One base model is pre-trained on a mixture of four input distributions, T = 4 experts are
fine-tuned from it on tasks with different input distributions and label sets, and the
experts are merged. Score per task: merged accuracy / expert accuracy x 100 on the task's
test split ("normalized"), averaged over the four tasks; mean ± std over 3 seeds.

Task sets (inputs are the digits scaled to [0, 1]; every task sees all ten digit classes):

* ``conflict`` (the main set: static merges suffer). One shared 10-way output layer, part of
  every merge. Each task has its own fixed input transform, so a router can tell the tasks
  apart, and its own fixed permutation of the ten labels, so the experts pull the shared
  weights in incompatible directions (digit d is labelled ``PERMUTATIONS[t][d]``):

  ===== ========================================== ================================
  task  input                                      label of digit d (d = 0..9)
  ===== ========================================== ================================
  0     original digit                             3 4 8 5 9 0 7 6 2 1
  1     inverted (1 - x)                           6 2 4 9 1 3 8 0 5 7
  2     rotated 90 degrees                         6 2 8 5 9 1 0 3 4 7
  3     pixels shuffled by one fixed permutation   2 3 5 4 8 1 9 6 7 0
  ===== ========================================== ================================

  (the label permutations are the first four derangements drawn by
  ``numpy.random.default_rng(7)``; the pixel permutation is ``default_rng(11).permutation(64)``).

* ``easy`` (the set of the quick check in the issue). Per-task output layers (10, 2, 3 and
  2 classes), kept out of the merges: each task is scored with its own expert's output
  layer on top of the merged body, as Twin-Merging's reference does with classifier heads.

  ===== ================================================ =====================
  task  input                                            label
  ===== ================================================ =====================
  0     original digit                                   the digit (10 classes)
  1     rotated 90 degrees                               parity (2)
  2     inverted (1 - x)                                 digit mod 3 (3)
  3     Gaussian noise, std 0.5, fixed per sample        digit > 4 (2)
  ===== ================================================ =====================

Models: an MLP body 64 -> 512 -> 256 -> 128 (Linear + ReLU) and a Linear output layer. The
base is pre-trained on the union of the four tasks' training inputs labelled with the digit
(10 classes, ``EPOCHS["pretrain"]`` epochs); each expert starts from it and fine-tunes every
weight on its task (``EPOCHS["finetune"]`` epochs; in ``easy`` with a freshly initialised
output layer of the task's size). Adam, lr 1e-3, batch 64.

Methods (``fastmerge.merge`` and ``fastmerge.twin``): ``average``; ``task_arithmetic``
(scale tuned); ``ties`` (density and scale tuned); ``dare`` (drop and scale tuned); Twin-Merging
at ranks 5%, 10% and 25% of min(shape) per weight matrix, with its shared expert the
task-arithmetic merge at the tuned scale, with the trained router (``fit_router`` on the
shared model's last hidden layer, 128 features, for the training inputs of all tasks) and
with oracle routing (one-hot gates of the true task), which separates the routing loss from
the compression loss. Every method knob is tuned on the **validation** split (mean normalized
score), never on the test split; the grids are ``TA_SCALES``, ``TIES_GRID`` and ``DARE_GRID``.
Router accuracy is reported per task on the test inputs; each sample is routed on its own
(the gates are per sample), so a batch of one task tells the router nothing.

Size: the bytes Twin-Merging keeps per task (factors plus dense deltas of biases, from
``TwinMerger.nbytes()``) over the bytes of the T dense experts of the merged part.

Data: a fixed, stratified train/val/test split (60/20/20, seed 0) of ``load_digits``; the
seeds change the initialisation and the minibatch order, not the split or the task set.

Run (about 1.5 CPU-minutes, 5 minutes wall-clock on 2 busy shared cores)::

    pip install ".[quality]"  # scikit-learn, matplotlib
    python bench/quality/twin_digits.py            # 3 seeds, both sets: table and JSON
    python bench/quality/twin_digits.py --quick    # 1 seed, fewer epochs (smoke run)

Writes ``bench/results/twin_digits.json`` (``--quick``: ``twin_digits-quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fastmerge import merge
from fastmerge.twin import TwinMerger, TwinModel, fit_router

RESULTS = Path(__file__).resolve().parent.parent / "results"
SEEDS = (0, 1, 2)
SETS = ("conflict", "easy")
RANKS = (0.05, 0.1, 0.25)
WIDTHS = (64, 512, 256, 128)
EPOCHS = {"pretrain": 20, "finetune": 30}
QUICK_EPOCHS = {"pretrain": 8, "finetune": 12}
LR = 1e-3
BATCH = 64
NOISE_STD = 0.5
# Method knobs, tuned on the validation split.
TA_SCALES = tuple(round(0.1 * i, 1) for i in range(1, 11))
TIES_GRID = tuple((d, s) for d in (0.1, 0.2, 0.5, 1.0) for s in (0.5, 1.0, 1.5, 2.0))
DARE_GRID = tuple((p, s) for p in (0.3, 0.5, 0.9) for s in TA_SCALES)
PERMUTATIONS = (
    (3, 4, 8, 5, 9, 0, 7, 6, 2, 1),
    (6, 2, 4, 9, 1, 3, 8, 0, 5, 7),
    (6, 2, 8, 5, 9, 1, 0, 3, 4, 7),
    (2, 3, 5, 4, 8, 1, 9, 6, 7, 0),
)
PIXELS = torch.from_numpy(np.random.default_rng(11).permutation(64))


# --------------------------------------------------------------------------------------------
# Tasks and data


def original(x: torch.Tensor, split: str) -> torch.Tensor:
    return x


def inverted(x: torch.Tensor, split: str) -> torch.Tensor:
    return 1.0 - x


def rotated(x: torch.Tensor, split: str) -> torch.Tensor:
    return torch.rot90(x.view(-1, 8, 8), 1, (1, 2)).reshape(-1, 64)


def shuffled(x: torch.Tensor, split: str) -> torch.Tensor:
    return x[:, PIXELS]


def noisy(x: torch.Tensor, split: str) -> torch.Tensor:
    # Fixed per split, so the task's inputs do not change between seeds or evaluations.
    gen = torch.Generator().manual_seed({"train": 1, "val": 2, "test": 3}[split])
    return x + NOISE_STD * torch.randn(x.shape, generator=gen)


def permuted(t: int) -> Callable[[torch.Tensor], torch.Tensor]:
    table = torch.tensor(PERMUTATIONS[t])
    return lambda y: table[y]


@dataclass(frozen=True)
class Task:
    name: str
    inputs: Callable[[torch.Tensor, str], torch.Tensor]
    labels: Callable[[torch.Tensor], torch.Tensor]
    classes: int


@dataclass(frozen=True)
class TaskSet:
    tasks: tuple[Task, ...]
    shared_head: bool  # one output layer in every merge; else per-task layers kept out


TASK_SETS = {
    "conflict": TaskSet(
        (
            Task("original/perm0", original, permuted(0), 10),
            Task("inverted/perm1", inverted, permuted(1), 10),
            Task("rotated/perm2", rotated, permuted(2), 10),
            Task("shuffled/perm3", shuffled, permuted(3), 10),
        ),
        shared_head=True,
    ),
    "easy": TaskSet(
        (
            Task("original/digit", original, lambda y: y, 10),
            Task("rotated/parity", rotated, lambda y: y % 2, 2),
            Task("inverted/mod3", inverted, lambda y: y % 3, 3),
            Task("noisy/gt4", noisy, lambda y: (y > 4).long(), 2),
        ),
        shared_head=False,
    ),
}


def load_digits_split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Digits scaled to [0, 1], split 60/20/20 (stratified, seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.data.astype(np.float32) / 16.0, digits.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=0)
    x_va, x_te, y_va, y_te = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=0
    )
    pairs = {"train": (x_tr, y_tr), "val": (x_va, y_va), "test": (x_te, y_te)}
    return {s: (torch.from_numpy(a), torch.from_numpy(b)) for s, (a, b) in pairs.items()}


def task_data(task: Task, digits, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits[split]
    return task.inputs(x, split), task.labels(y)


# --------------------------------------------------------------------------------------------
# Models and training


def mlp_body() -> nn.Sequential:
    layers: list[nn.Module] = []
    for d_in, d_out in zip(WIDTHS[:-1], WIDTHS[1:]):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers)


class Net(nn.Module):
    """The MLP body and one output layer."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = mlp_body()
        self.head = nn.Linear(WIDTHS[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    """Adam (lr 1e-3), batch 64, cross-entropy; every parameter trains."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH):
            idx = order[i : i + BATCH]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def pretrain(task_set: TaskSet, digits, seed: int, epochs: int) -> Net:
    """The base: all four tasks' training inputs, labelled with the digit."""
    xs = torch.cat([task_data(t, digits, "train")[0] for t in task_set.tasks])
    ys = torch.cat([digits["train"][1]] * len(task_set.tasks))
    torch.manual_seed(seed)
    return fit(Net(10), xs, ys, epochs, seed)


def finetune(task_set: TaskSet, base: Net, digits, seed: int, epochs: int) -> list[Net]:
    experts = []
    for t, task in enumerate(task_set.tasks):
        torch.manual_seed(1000 * seed + t)
        expert = Net(task.classes)
        expert.body.load_state_dict(base.body.state_dict())
        if task_set.shared_head:
            expert.head.load_state_dict(base.head.state_dict())
        experts.append(fit(expert, *task_data(task, digits, "train"), epochs, 1000 * seed + t))
    return experts


def merged_part(task_set: TaskSet, model: Net) -> nn.Module:
    """What the merges see: the whole net with a shared output layer, else the body."""
    return model if task_set.shared_head else model.body


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def last_hidden(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Router features: the 128-unit last hidden layer of the (shared) model."""
    return model.body(x) if isinstance(model, Net) else model(x)


@torch.no_grad()
def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == y).double().mean().item()


# --------------------------------------------------------------------------------------------
# One task set, one seed


class Experiment:
    """Base, experts and scoring of one task set for one seed."""

    def __init__(self, set_name: str, digits, seed: int, epochs: dict[str, int]) -> None:
        self.name, self.digits, self.seed = set_name, digits, seed
        self.task_set = TASK_SETS[set_name]
        self.tasks = self.task_set.tasks
        self.base = pretrain(self.task_set, digits, seed, epochs["pretrain"])
        self.experts = finetune(self.task_set, self.base, digits, seed, epochs["finetune"])
        self.base_state = state(merged_part(self.task_set, self.base))
        self.expert_states = [state(merged_part(self.task_set, e)) for e in self.experts]
        self.expert_acc = {s: self._accuracies(self._expert_logits, s) for s in ("val", "test")}

    def _expert_logits(self, t: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts[t](x)

    def _accuracies(self, logits_fn, split: str) -> list[float]:
        accs = []
        for t, task in enumerate(self.tasks):
            x, y = task_data(task, self.digits, split)
            with torch.no_grad():
                accs.append(accuracy(logits_fn(t, x), y))
        return accs

    def normalized(self, accs: list[float], split: str) -> float:
        return statistics.fmean(100.0 * a / e for a, e in zip(accs, self.expert_acc[split]))

    def static_accuracies(self, merged: dict[str, torch.Tensor], split: str) -> list[float]:
        """Per-task accuracy of a static merge (with each task's own output layer in
        ``easy``)."""
        if self.task_set.shared_head:
            model = Net(10)
            model.load_state_dict(merged)
            return self._accuracies(lambda t, x: model(x), split)
        body = mlp_body()
        body.load_state_dict(merged)
        return self._accuracies(lambda t, x: self.experts[t].head(body(x)), split)

    def static_score(self, merged: dict[str, torch.Tensor], split: str) -> float:
        return self.normalized(self.static_accuracies(merged, split), split)

    def tuned(self, build: Callable[..., dict], grid) -> tuple[dict[str, torch.Tensor], tuple]:
        """The merge of the grid point with the best validation score, and that point."""
        best = max(grid, key=lambda knobs: self.static_score(build(*knobs), "val"))
        return build(*best), best

    def twin_model(self, merger: TwinMerger, router=None) -> TwinModel:
        if self.task_set.shared_head:
            return TwinModel(Net(10), merger, router, feature_fn=last_hidden)
        heads = [e.head for e in self.experts]
        return TwinModel(mlp_body(), merger, router, feature_fn=last_hidden, heads=heads)

    def twin_accuracies(self, twin: TwinModel, oracle: bool) -> list[float]:
        def logits(t: int, x: torch.Tensor) -> torch.Tensor:
            ids = torch.full((len(x),), t)
            gates = F.one_hot(ids, len(self.tasks)).float() if oracle else None
            kwargs = {} if self.task_set.shared_head else {"task_ids": ids}
            return twin(x, gates=gates, **kwargs)

        return self._accuracies(logits, "test")

    def fit_router(self, twin: TwinModel):
        feats, ids = [], []
        for t, task in enumerate(self.tasks):
            x = task_data(task, self.digits, "train")[0]
            with torch.no_grad():
                feats.append(twin.features(x))
            ids.append(torch.full((len(x),), t))
        return fit_router(torch.cat(feats), torch.cat(ids), seed=self.seed)

    def router_accuracy(self, twin: TwinModel) -> list[float]:
        accs = []
        for t, task in enumerate(self.tasks):
            x = task_data(task, self.digits, "test")[0]
            accs.append(100.0 * (twin.gates(x).argmax(1) == t).double().mean().item())
        return accs

    def run(self) -> dict:
        base, experts = self.base_state, self.expert_states
        scores: dict[str, float] = {}
        knobs: dict[str, object] = {}
        per_task: dict[str, list[float]] = {}

        def record(method: str, accs: list[float]) -> None:
            per_task[method] = accs
            scores[method] = self.normalized(accs, "test")

        record("base", self.static_accuracies(base, "test"))
        record("average", self.static_accuracies(merge.average(experts), "test"))
        ta, (scale,) = self.tuned(
            lambda s: merge.task_arithmetic(base, experts, scale=s), [(s,) for s in TA_SCALES]
        )
        record("task_arithmetic", self.static_accuracies(ta, "test"))
        knobs["task_arithmetic"] = {"scale": scale}
        ties, (density, ties_scale) = self.tuned(
            lambda d, s: merge.ties(base, experts, density=d, scale=s), TIES_GRID
        )
        record("ties", self.static_accuracies(ties, "test"))
        knobs["ties"] = {"density": density, "scale": ties_scale}
        dare, (drop, dare_scale) = self.tuned(
            lambda p, s: merge.dare(base, experts, drop=p, scale=s, seed=self.seed), DARE_GRID
        )
        record("dare", self.static_accuracies(dare, "test"))
        knobs["dare"] = {"drop": drop, "scale": dare_scale}

        router, router_acc, size_ratio = None, [], {}
        for rank in RANKS:
            merger = TwinMerger(
                base, experts, shared_kwargs={"scale": scale}, rank=rank, progress=False
            )
            if router is None:  # the shared expert, hence the features, do not depend on rank
                router = self.fit_router(self.twin_model(merger))
            twin = self.twin_model(merger, router)
            if not router_acc:
                router_acc = self.router_accuracy(twin)
            record(f"twin@{rank:g}", self.twin_accuracies(twin, oracle=False))
            record(f"twin@{rank:g}-oracle", self.twin_accuracies(twin, oracle=True))
            sizes = merger.nbytes()
            size_ratio[f"{rank:g}"] = {
                "exclusive_bytes": sizes.exclusive,
                "factor_bytes": sizes.factors,
                "dense_delta_bytes": sizes.dense_deltas,
                "dense_expert_bytes": sizes.experts,
                "ratio": sizes.ratio,
            }
        knobs["twin"] = {"shared": "task_arithmetic", "scale": scale}
        return {
            "expert_accuracy": self.expert_acc["test"],
            "normalized": scores,
            "per_task_accuracy": per_task,
            "knobs": knobs,
            "router_accuracy": router_acc,
            "router_epochs": len(router.history.val_loss),
            "size": size_ratio,
        }


# --------------------------------------------------------------------------------------------
# Reporting

METHODS = (
    "base",
    "average",
    "task_arithmetic",
    "ties",
    "dare",
    *(f"twin@{r:g}{s}" for r in RANKS for s in ("", "-oracle")),
)
STATIC = ("average", "task_arithmetic", "ties", "dare")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 1) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def label(method: str) -> str:
    if not method.startswith("twin@"):
        return method
    rank, _, oracle = method[5:].partition("-")
    return f"Twin {float(rank) * 100:g}% ({'oracle routing' if oracle else 'router'})"


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per set: per method the normalized scores over seeds, router accuracy per task,
    size ratios, and the issue's targets."""
    out = {}
    for name, seeds in runs.items():
        tasks = [t.name for t in TASK_SETS[name].tasks]
        methods = {m: [r["normalized"][m] for r in seeds] for m in METHODS}
        static_means = {m: mean_std(methods[m])[0] for m in STATIC}
        best_static = max(static_means, key=static_means.get)
        twin10 = mean_std(methods["twin@0.1"])[0]
        ratio10 = mean_std([r["size"]["0.1"]["ratio"] for r in seeds])[0]
        out[name] = {
            "tasks": tasks,
            "normalized": methods,
            "expert_accuracy": {
                task: [r["expert_accuracy"][i] for r in seeds] for i, task in enumerate(tasks)
            },
            "router_accuracy": {
                task: [r["router_accuracy"][i] for r in seeds] for i, task in enumerate(tasks)
            },
            "size_ratio": {f"{r:g}": [s["size"][f"{r:g}"]["ratio"] for s in seeds] for r in RANKS},
            "targets": {
                "best_static": best_static,
                "best_static_normalized": static_means[best_static],
                "best_static_le_85": static_means[best_static] <= 85.0,
                "twin10_router_normalized": twin10,
                "twin10_ge_95": twin10 >= 95.0,
                "twin10_minus_best_static": twin10 - static_means[best_static],
                "twin10_ge_best_static_plus_10": twin10 - static_means[best_static] >= 10.0,
                "size_ratio_at_10": ratio10,
                "size_ratio_at_10_le_0.2": ratio10 <= 0.2,
            },
        }
    return out


def tables(summary: dict) -> str:
    names = list(summary)
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    expert = [
        fmt([statistics.fmean(v) for v in zip(*summary[n]["expert_accuracy"].values())])
        for n in names
    ]
    lines.append("| experts (accuracy %, mean over tasks) | " + " | ".join(expert) + " |")
    for m in METHODS:
        lines.append(
            f"| {label(m)} | " + " | ".join(fmt(summary[n]["normalized"][m]) for n in names) + " |"
        )
    lines += ["", "| set | task | expert accuracy % | router accuracy % |", "|---|---|---|---|"]
    for n in names:
        for task in summary[n]["tasks"]:
            lines.append(
                f"| {n} | {task} | {fmt(summary[n]['expert_accuracy'][task])} | "
                f"{fmt(summary[n]['router_accuracy'][task])} |"
            )
    lines += ["", "| set | " + " | ".join(f"rank {r * 100:g}%" for r in RANKS) + " |"]
    lines.append("|---|" + "---|" * len(RANKS))
    for n in names:
        cells = [f"{100 * mean_std(summary[n]['size_ratio'][f'{r:g}'])[0]:.1f}%" for r in RANKS]
        lines.append(f"| {n}: per-task bytes / dense experts | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_lines(summary: dict) -> str:
    lines = []
    for n, s in summary.items():
        t = s["targets"]
        lines.append(
            f"{n:8s} best static {t['best_static']} {t['best_static_normalized']:.1f} "
            f"(<= 85: {t['best_static_le_85']}); Twin 10% router "
            f"{t['twin10_router_normalized']:.1f} (>= 95: {t['twin10_ge_95']}; "
            f"{t['twin10_minus_best_static']:+.1f} over best static, >= 10: "
            f"{t['twin10_ge_best_static_plus_10']}); bytes at 10% "
            f"{100 * t['size_ratio_at_10']:.1f}% (<= 20%: {t['size_ratio_at_10_le_0.2']})"
        )
    return "\n".join(lines)


def run_all(
    seeds, sets, epochs: dict[str, int], log: Optional[Callable[[str], None]] = print
) -> dict[str, list[dict]]:
    digits = load_digits_split()
    runs: dict[str, list[dict]] = {n: [] for n in sets}
    for name in sets:
        for seed in seeds:
            t0 = time.perf_counter()
            result = Experiment(name, digits, seed, epochs).run()
            result["seconds"] = time.perf_counter() - t0
            runs[name].append(result)
            if log:
                s = result["normalized"]
                log(
                    f"{name:8s} seed {seed}: TA {s['task_arithmetic']:.1f} TIES {s['ties']:.1f} "
                    f"DARE {s['dare']:.1f} avg {s['average']:.1f} | Twin 10% {s['twin@0.1']:.1f} "
                    f"(oracle {s['twin@0.1-oracle']:.1f}) | router "
                    + " ".join(f"{a:.1f}" for a in result["router_accuracy"])
                    + f" ({result['seconds']:.1f}s)"
                )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer epochs (smoke run)")
    parser.add_argument("--seeds", type=int, default=len(SEEDS))
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no contention)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    seeds = SEEDS[: 1 if args.quick else args.seeds]
    epochs = QUICK_EPOCHS if args.quick else EPOCHS
    runs = run_all(seeds, args.sets, epochs, lambda s: print(s, flush=True))
    summary = summarize(runs)
    print()
    print(tables(summary))
    print()
    print(target_lines(summary))
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "twin_digits",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s)",
        "torch": torch.__version__,
        "seeds": list(seeds),
        "epochs": epochs,
        "widths": list(WIDTHS),
        "ranks": list(RANKS),
        "split": "test (knobs tuned on val)",
        "summary": summary,
        "runs": runs,
        "seconds": time.perf_counter() - start,
    }
    path = args.out / ("twin_digits-quick.json" if args.quick else "twin_digits.json")
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {path}")
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
