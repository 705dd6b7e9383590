"""WSA quality study: does Weight Scope Alignment help mode connectivity and federated learning?

The WSA regularizer (``fastmerge.wsa.WeightScopeRegularizer``) is a reconstruction from
METHODS.md (the paper's text is not available to us), so this benchmark is a study, not a
target to hit: it measures where WSA changes anything, in settings built so that the
models' weight scopes really differ (the paper's premise).

Task: **augmented digits**, harder than plain digits so that barriers are not zero.
scikit-learn's 8x8 digits are placed on a 12x12 canvas and each copy gets a random affine
transform (rotation +-20 degrees, scale 0.85-1.15, shift +-1.5 px) and Gaussian pixel noise
(std 2 on the 0-16 pixel scale); inputs are standardized with the training mean and std.
Fixed stratified 60/20/20 split of the 1,797 images (seed 0), 2 augmented copies of each
image (fixed seeds): 2,156 training, 718 validation, 720 test samples.

Models: ``mlp`` (144 -> 128 -> 128 -> 10, ReLU) and ``cnn`` (three 3x3 convs at 8, 16, 32
channels, the last two with stride 2, each followed by BatchNorm and ReLU, then a Linear head
on the flattened 32x3x3 map). Training: SGD with momentum 0.9, cross-entropy.

Part 1, **mode connectivity**. Pairs of models A, B trained side by side (batch 128; 20
epochs for the MLP, 12 for the CNN):

* ``seeds``: different initializations, same hyperparameters (lr 0.05, weight decay 5e-4);
* ``hparams``: different initializations, A with lr 0.05 and no weight decay, B with lr 0.02
  and weight decay 5e-3 (scopes differ);
* ``hparams-same-init``: the same, from one initialization;
* ``data-same-init``: one initialization, A and B each trained on one part of the training
  set split non-IID (Dirichlet(0.5) over the labels, two parts).

The MLP runs all four; the CNN (about 4x the cost per step) ``seeds`` and ``hparams``.

Each pair is trained plain and with WSA for every ``lambda`` in LAMBDAS and both targets:
``init`` (the scope of A's initialization, for both models) and ``fused`` (the fused scope
of A's and B's current weights, ``fastmerge.wsa.fuse_scopes`` rule "mean", refreshed every
epoch). For every pair: the scope gap (per layer |mu_A - mu_B| and sigma ratio
max/min), and the interpolation curve ``fastmerge.wsa.interpolation_curve`` at 11 alphas
with and without permutation alignment (PLeaS matching), BatchNorm statistics re-estimated
at each alpha; loss and accuracy barriers (METHODS.md) and the midpoint (alpha 0.5)
accuracy, on the validation and the test split.

Part 2, **federated learning** (``fastmerge.wsa.fl.simulate``): 10 clients, Dirichlet(alpha)
label split with alpha 0.1 and 0.5, all clients every round, 2 local epochs of batch 64
(20 rounds for the MLP, 15 for the CNN; the CNN only at alpha 0.1); clients either
homogeneous (lr 0.05, weight decay 5e-4) or heterogeneous (half the clients lr 0.05 and no
weight decay, half lr 0.02 and weight decay 5e-3). FedAvg, FedProx (mu in MUS) and FedAvg +
WSA (lambda in LAMBDAS, targets ``init`` and ``fused``, the server's fused scope each round).

**Model selection on the validation split only**: for each cell, the WSA lambda (per
target) and FedProx's mu with the best mean validation accuracy are the ones whose *test*
figures are reported: for connectivity the validation accuracy of the midpoint model
(alpha 0.5), chosen separately for the raw and the aligned path; for FL the final validation
accuracy. The validation figures of the whole sweep are printed and kept in the JSON.

Run (about 45 minutes on 2 busy, shared CPU cores; ``--part`` runs one part)::

    pip install -e ".[quality]"  # scikit-learn, matplotlib
    python bench/quality/wsa.py            # both parts; table, JSON and PNGs
    python bench/quality/wsa.py --quick    # smoke run: 1 seed, tiny sweep, few epochs
    python bench/quality/wsa.py --report bench/results/wsa_quality.json  # redo tables, PNGs

Writes ``bench/results/wsa_quality.json``, ``bench/results/wsa_quality_connectivity.png``
(test loss along the interpolation paths) and ``bench/results/wsa_quality_fl.png`` (test
accuracy per round); ``--quick`` writes ``wsa_quality_quick*`` instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import fastmerge.wsa as wsa

RESULTS = Path(__file__).resolve().parent.parent / "results"
SEEDS = (0, 1, 2)
ARCHS = ("mlp", "cnn")
PAIRS = ("seeds", "hparams", "hparams-same-init", "data-same-init")
LAMBDAS = (0.01, 0.1, 1.0)
TARGETS = ("init", "fused")
MUS = (0.01, 0.1)
FL_ALPHAS = (0.1, 0.5)
FL_CLIENTS = ("homogeneous", "heterogeneous")
PATHS = ("raw", "aligned")
ALPHAS = 11
EPOCHS = {"mlp": 20, "cnn": 12}
ROUNDS = {"mlp": 20, "cnn": 15}
CLIENTS = 10
FL_BATCH, LOCAL_EPOCHS = 64, 2
BATCH = 128
CANVAS = 12
ROTATE, SCALE, SHIFT, NOISE = 20, 0.15, 1.5, 2.0  # degrees, +-fraction, pixels, 0-16 scale


@dataclass(frozen=True)
class Hyper:
    lr: float = 0.05
    weight_decay: float = 5e-4


DEFAULT = Hyper()
# Scopes differ: no weight decay lets the weights grow, strong decay shrinks them.
FREE, DECAYED = Hyper(0.05, 0.0), Hyper(0.02, 5e-3)


# --------------------------------------------------------------------------------------------
# Data


def augment(x: torch.Tensor, copies: int, seed: int) -> torch.Tensor:
    """`copies` random affine copies (rotation, scale, shift) of 8x8 images, plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = x.repeat(copies, 1, 1, 1)
    pad = (CANVAS - 8) // 2
    x = F.pad(x, (pad, pad, pad, pad))
    n = len(x)
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(ROTATE)
    scale = 1 - SCALE + 2 * SCALE * torch.rand(n, generator=g)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (
        2 * SHIFT / CANVAS
    )  # +-SHIFT px in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    return x + NOISE * torch.randn(x.shape, generator=g)


def load_data(copies: tuple[int, int, int] = (2, 2, 2)) -> dict:
    """Augmented digits: {"train", "val", "test"}: (inputs N x 1 x 12 x 12, labels)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=0)
    x_va, x_te, y_va, y_te = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=0
    )
    out = {}
    for k, (name, xs, ys) in enumerate(
        [("train", x_tr, y_tr), ("val", x_va, y_va), ("test", x_te, y_te)]
    ):
        imgs = augment(torch.from_numpy(xs).view(-1, 1, 8, 8), copies[k], seed=100 + k)
        out[name] = (imgs, torch.from_numpy(ys).repeat(copies[k]))
    mean, std = out["train"][0].mean(), out["train"][0].std()
    return {k: ((xs - mean) / std, ys) for k, (xs, ys) in out.items()}


def batches(x: torch.Tensor, size: int = 512) -> list[torch.Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


# --------------------------------------------------------------------------------------------
# Models


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(CANVAS * CANVAS, 128)
        self.fc2, self.fc3 = nn.Linear(128, 128), nn.Linear(128, 10)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        x = self.relu1(self.fc1(self.flatten(x)))
        return self.fc3(self.relu2(self.fc2(x)))


def conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = conv_block(1, 8, 1)
        self.block2 = conv_block(8, 16, 2)
        self.block3 = conv_block(16, 32, 2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32 * 3 * 3, 10)  # keeps the layout: digits need it

    def forward(self, x):
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(self.flatten(x))


def build(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP() if arch == "mlp" else CNN()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in %)."""
    model.eval()
    logits = torch.cat([model(b) for b in batches(x)])
    loss = F.cross_entropy(logits, y).item()
    return loss, 100.0 * (logits.argmax(1) == y).double().mean().item()


def evaluator(data: dict):
    """evaluate(model) -> {"val_loss", "val_acc", "test_loss", "test_acc"}."""

    def run(model: nn.Module) -> dict[str, float]:
        out = {}
        for split in ("val", "test"):
            out[f"{split}_loss"], out[f"{split}_acc"] = evaluate(model, *data[split])
        return out

    return run


# --------------------------------------------------------------------------------------------
# Part 1: training pairs of models


@dataclass(frozen=True)
class Method:
    """Plain training (strength 0) or WSA with lambda `strength` toward `target`."""

    strength: float = 0.0
    target: str = "init"

    @property
    def name(self) -> str:
        return "plain" if self.strength == 0 else f"wsa-{self.target}-{self.strength:g}"


def methods(lambdas=LAMBDAS, targets=TARGETS) -> list[Method]:
    return [Method()] + [Method(lam, t) for t in targets for lam in lambdas]


def pair_setup(arch: str, pair: str, seed: int, data: dict):
    """The two initial models, their hyperparameters and their training sets."""
    init_a = build(arch, 1000 + 2 * seed)
    init_b = copy.deepcopy(init_a) if pair.endswith("same-init") else build(arch, 1001 + 2 * seed)
    hypers = (FREE, DECAYED) if pair.startswith("hparams") else (DEFAULT, DEFAULT)
    x, y = data["train"]
    sets = [(x, y), (x, y)]
    if pair == "data-same-init":
        from fastmerge.wsa.fl import dirichlet_split

        sets = [(x[i], y[i]) for i in dirichlet_split(y, 2, 0.5, seed=seed, min_size=BATCH)]
    return [init_a, init_b], hypers, sets


def sgd_epoch(model, opt, reg, x, y, g) -> None:
    model.train()
    perm = torch.randperm(len(x), generator=g)
    for i in range(0, len(x), BATCH):
        idx = perm[i : i + BATCH]
        if len(idx) < 2:  # BatchNorm needs two samples
            continue
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if reg is not None:
            loss = loss + reg()
        loss.backward()
        opt.step()


def train_pair(arch: str, pair: str, method: Method, seed: int, data: dict, epochs: int):
    """Train A and B side by side (so the "fused" target can follow both every epoch)."""
    models, hypers, sets = pair_setup(arch, pair, seed, data)
    opts = [
        torch.optim.SGD(m.parameters(), lr=h.lr, momentum=0.9, weight_decay=h.weight_decay)
        for m, h in zip(models, hypers)
    ]
    regs = [None, None]
    if method.strength > 0:
        init_scope = wsa.scope_of(models[0])  # A's initialization: one target for both
        regs = [wsa.WeightScopeRegularizer(m, init_scope, method.strength) for m in models]
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        if method.strength > 0 and method.target == "fused":
            fused = wsa.fuse_scopes([wsa.scope_of(m) for m in models])
            for reg in regs:
                reg.set_target(fused)
        for model, opt, reg, (x, y) in zip(models, opts, regs, sets):
            sgd_epoch(model, opt, reg, x, y, g)
    return [m.eval() for m in models]


def scope_gap(a: nn.Module, b: nn.Module) -> dict:
    """Per layer |mu_A - mu_B| and sigma ratio max/min, plus their means over layers."""
    sa, sb = wsa.scope_of(a), wsa.scope_of(b)
    dmu = (sa.mean - sb.mean).abs()
    ratio = torch.maximum(sa.std, sb.std) / torch.minimum(sa.std, sb.std)
    return {
        "layers": list(sa.names),
        "abs_mean_diff": dmu.tolist(),
        "std_ratio": ratio.tolist(),
        "std_a": sa.std.tolist(),
        "std_b": sb.std.tolist(),
        "mean_abs_mean_diff": dmu.mean().item(),
        "mean_std_ratio": ratio.mean().item(),
    }


def curve_summary(curve) -> dict:
    """Barriers (loss and accuracy) and the midpoint accuracy of one interpolation curve."""
    mid = curve.alphas.index(0.5)
    out = {"curve": curve.to_dict()}
    for split in ("val", "test"):
        out[f"{split}_loss_barrier"] = curve.barrier(f"{split}_loss", higher_is_better=False)
        out[f"{split}_acc_barrier"] = curve.barrier(f"{split}_acc", higher_is_better=True)
        out[f"{split}_mid_acc"] = curve.metrics[f"{split}_acc"][mid]
        out[f"{split}_end_acc"] = statistics.fmean(curve.endpoints(f"{split}_acc"))
    return out


def connectivity_pair(arch, pair, method, seed, data, epochs) -> dict:
    a, b = train_pair(arch, pair, method, seed, data, epochs)
    train_batches = batches(data["train"][0])
    bn = train_batches if arch == "cnn" else None  # re-estimate BatchNorm at every alpha
    ev = evaluator(data)
    raw = wsa.interpolation_curve(a, b, ev, alphas=ALPHAS, bn_data=bn, progress=False)
    aligned = wsa.interpolation_curve(
        a, b, ev, alphas=ALPHAS, bn_data=bn, align="permute", align_data=train_batches,
        progress=False,
    )  # fmt: skip
    return {
        "seed": seed,
        "scope_gap": scope_gap(a, b),
        "raw": curve_summary(raw),
        "aligned": curve_summary(aligned),
    }


def run_connectivity(cfg, data, log) -> dict:
    """{arch: {pair: {method name: [record per seed]}}}."""
    out: dict = {}
    for arch in cfg.archs:
        for pair in cfg.pairs[arch]:
            for method in methods(cfg.lambdas, cfg.targets):
                cell = out.setdefault(arch, {}).setdefault(pair, {}).setdefault(method.name, [])
                for seed in cfg.seeds:
                    t0 = time.perf_counter()
                    rec = connectivity_pair(arch, pair, method, seed, data, cfg.epochs[arch])
                    cell.append(rec)
                    log(
                        f"[{time.perf_counter() - START:6.1f}s] {arch} {pair:17s} "
                        f"{method.name:16s} seed {seed}: sigma ratio "
                        f"{rec['scope_gap']['mean_std_ratio']:.2f}, test loss barrier raw "
                        f"{rec['raw']['test_loss_barrier']:.3f} aligned "
                        f"{rec['aligned']['test_loss_barrier']:.3f}, mid acc raw "
                        f"{rec['raw']['test_mid_acc']:.1f} aligned "
                        f"{rec['aligned']['test_mid_acc']:.1f} ({time.perf_counter() - t0:.1f}s)"
                    )
    return out


# --------------------------------------------------------------------------------------------
# Part 2: federated learning


def fl_methods(lambdas=LAMBDAS, targets=TARGETS, mus=MUS) -> list[tuple[str, dict]]:
    """(name, ClientConfig fields) of FedAvg, FedProx for every mu, FedAvg + WSA."""
    out = [("fedavg", {"mode": "plain"})]
    out += [(f"fedprox-{mu:g}", {"mode": "fedprox", "mu": mu}) for mu in mus]
    out += [
        (Method(lam, t).name, {"mode": "wsa", "strength": lam, "target": t})
        for t in targets
        for lam in lambdas
    ]
    return out


def client_configs(fields: dict, clients: str) -> list:
    """One ClientConfig per client: all alike, or half FREE and half DECAYED."""
    from fastmerge.wsa.fl import ClientConfig

    hypers = [DEFAULT] * CLIENTS if clients == "homogeneous" else [FREE, DECAYED] * (CLIENTS // 2)
    return [
        ClientConfig(
            **fields,
            lr=h.lr,
            weight_decay=h.weight_decay,
            momentum=0.9,
            batch_size=FL_BATCH,
            local_epochs=LOCAL_EPOCHS,
        )
        for h in hypers
    ]


def fl_splits(labels: torch.Tensor, alpha: float, seed: int) -> list[torch.Tensor]:
    """The Dirichlet split, minus one sample where a client's last batch would hold a single
    sample: ``simulate`` keeps every batch, and a one-sample batch gives BatchNorm
    statistics of one image (BatchNorm1d refuses it outright)."""
    from fastmerge.wsa.fl import dirichlet_split

    parts = dirichlet_split(labels, CLIENTS, alpha, seed=seed, min_size=2)
    return [p[:-1] if len(p) % FL_BATCH == 1 else p for p in parts]


def run_fl(cfg, data, log) -> dict:
    """{arch: {"alpha=a, clients": {method name: [record per seed]}}}."""
    from fastmerge.wsa.fl import simulate

    ev = evaluator(data)

    def scores(model):  # simulate's "accuracy"/"loss" are the validation split's
        m = ev(model)
        return {"accuracy": m["val_acc"], "loss": m["val_loss"], "test_acc": m["test_acc"]}

    out: dict = {}
    for arch in cfg.archs:
        for alpha, clients in cfg.fl_cells[arch]:
            key = f"alpha={alpha:g}, {clients}"
            for name, fields in fl_methods(cfg.lambdas, cfg.targets, cfg.mus):
                cell = out.setdefault(arch, {}).setdefault(key, {}).setdefault(name, [])
                for seed in cfg.seeds:
                    t0 = time.perf_counter()
                    hist = simulate(
                        lambda arch=arch, seed=seed: build(arch, 1000 + seed),
                        data["train"],
                        data["val"],
                        clients=CLIENTS,
                        rounds=cfg.rounds[arch],
                        seed=seed,
                        progress=False,
                        evaluate=scores,
                        client_configs=client_configs(fields, clients),
                        splits=fl_splits(data["train"][1], alpha, seed),
                    )
                    rec = {
                        "seed": seed,
                        "val_acc": hist.accuracy,
                        "test_acc": hist.extra["test_acc"],
                        "val_loss": hist.loss,
                        "final_val_acc": hist.accuracy[-1],
                        "final_test_acc": hist.extra["test_acc"][-1],
                    }
                    cell.append(rec)
                    log(
                        f"[{time.perf_counter() - START:6.1f}s] FL {arch} {key:26s} {name:16s} "
                        f"seed {seed}: val {rec['final_val_acc']:.1f} test "
                        f"{rec['final_test_acc']:.1f} ({time.perf_counter() - t0:.1f}s)"
                    )
    return out


# --------------------------------------------------------------------------------------------
# Configurations


@dataclass(frozen=True)
class Config:
    seeds: tuple = SEEDS
    archs: tuple = ARCHS
    pairs: dict = None  # arch -> pair settings
    lambdas: tuple = LAMBDAS
    targets: tuple = TARGETS
    mus: tuple = MUS
    epochs: dict = None
    rounds: dict = None
    fl_cells: dict = None  # arch -> [(alpha, "homogeneous" | "heterogeneous")]
    parts: tuple = ("connectivity", "fl")


FULL = Config(
    # The CNN costs about 4x the MLP per step: its grid is the part where scopes differ most.
    pairs={"mlp": PAIRS, "cnn": ("seeds", "hparams")},
    epochs=EPOCHS,
    rounds=ROUNDS,
    fl_cells={
        "mlp": [(a, c) for a in FL_ALPHAS for c in FL_CLIENTS],
        "cnn": [(0.1, c) for c in FL_CLIENTS],
    },
)
QUICK = replace(
    FULL,
    seeds=(0,),
    pairs={"mlp": ("hparams",), "cnn": ("hparams",)},
    lambdas=(0.1,),
    mus=(0.01,),
    epochs={"mlp": 2, "cnn": 1},
    rounds={"mlp": 2, "cnn": 2},
    fl_cells={"mlp": [(0.1, "heterogeneous")], "cnn": [(0.1, "heterogeneous")]},
)


# --------------------------------------------------------------------------------------------
# Selection on the validation split, and reporting


def mean_std(v) -> tuple[float, float]:
    v = list(v)
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def fmt(v, digits: int = 1) -> str:
    m, s = mean_std(v)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def conn_values(recs, path: str, key: str) -> list[float]:
    return [r[path][key] for r in recs]


def select_connectivity(cell: dict, target: str, path: str = "raw") -> str:
    """The WSA method (lambda) for `target` with the best mean *validation* accuracy of the
    midpoint model on `path` ("raw" or "aligned")."""
    names = [n for n in cell if n.startswith(f"wsa-{target}-")]
    return max(names, key=lambda n: mean_std(conn_values(cell[n], path, "val_mid_acc"))[0])


def select_fl(cell: dict, prefix: str) -> str:
    """The method starting with `prefix` with the best mean final validation accuracy."""
    names = [n for n in cell if n.startswith(prefix)]
    return max(names, key=lambda n: mean_std(r["final_val_acc"] for r in cell[n])[0])


def connectivity_rows(conn: dict, targets) -> list[dict]:
    """Test figures of plain and, per target, the WSA lambda chosen on validation, for the
    raw and the aligned path separately (each path has its own choice)."""
    rows = []
    for arch, pairs in conn.items():
        for pair, cell in pairs.items():
            for path in ("raw", "aligned"):
                chosen = ["plain"] + [select_connectivity(cell, t, path) for t in targets]
                for name in chosen:
                    recs = cell[name]
                    row = {"arch": arch, "pair": pair, "path": path, "method": name}
                    row["std_ratio"] = [r["scope_gap"]["mean_std_ratio"] for r in recs]
                    row["abs_mean_diff"] = [r["scope_gap"]["mean_abs_mean_diff"] for r in recs]
                    for key in ("test_end_acc", "test_loss_barrier", "test_acc_barrier"):
                        row[key] = conn_values(recs, path, key)
                    row["test_mid_acc"] = conn_values(recs, path, "test_mid_acc")
                    rows.append(row)
    return rows


def connectivity_table(rows: list[dict]) -> str:
    head = (
        "| arch | pair | path | method (lambda chosen on val) | sigma ratio | end acc | "
        "loss barrier | acc barrier | midpoint acc |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['pair']} | {r['path']} | {r['method']} | "
            f"{fmt(r['std_ratio'], 2)} | {fmt(r['test_end_acc'])} | "
            f"{fmt(r['test_loss_barrier'], 2)} | {fmt(r['test_acc_barrier'])} | "
            f"{fmt(r['test_mid_acc'])} |"
        )
    return "\n".join(lines)


def connectivity_sweep_table(conn: dict) -> str:
    """Every method on the validation split (the numbers the selection looked at)."""
    head = (
        "| arch | pair | method | sigma ratio | |mu_A-mu_B| | val loss barrier raw | aligned | "
        "val mid acc raw | aligned |"
    )
    lines = [head, "|" + "---|" * 9]
    for arch, pairs in conn.items():
        for pair, cell in pairs.items():
            for name, recs in cell.items():
                lines.append(
                    f"| {arch} | {pair} | {name} | "
                    f"{fmt([r['scope_gap']['mean_std_ratio'] for r in recs], 2)} | "
                    f"{fmt([r['scope_gap']['mean_abs_mean_diff'] for r in recs], 4)} | "
                    f"{fmt(conn_values(recs, 'raw', 'val_loss_barrier'), 2)} | "
                    f"{fmt(conn_values(recs, 'aligned', 'val_loss_barrier'), 2)} | "
                    f"{fmt(conn_values(recs, 'raw', 'val_mid_acc'))} | "
                    f"{fmt(conn_values(recs, 'aligned', 'val_mid_acc'))} |"
                )
    return "\n".join(lines)


def fl_choices(cell: dict, targets) -> list[str]:
    return ["fedavg", select_fl(cell, "fedprox-")] + [select_fl(cell, f"wsa-{t}-") for t in targets]


def fl_table(fl: dict, targets) -> str:
    head = "| arch | clients | FedAvg | FedProx | " + " | ".join(
        f"FedAvg + WSA ({t})" for t in targets
    )
    lines = [head + " |", "|" + "---|" * (4 + len(targets))]
    for arch, cells in fl.items():
        for key, cell in cells.items():
            vals = []
            for name in fl_choices(cell, targets):
                acc = fmt(r["final_test_acc"] for r in cell[name])
                vals.append(acc if name == "fedavg" else f"{acc} ({name.rsplit('-', 1)[1]})")
            lines.append(f"| {arch} | {key} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def fl_sweep_table(fl: dict) -> str:
    names = list(next(iter(next(iter(fl.values())).values())))
    lines = ["| arch | clients | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(names))]
    for arch, cells in fl.items():
        for key, cell in cells.items():
            vals = [fmt(r["final_val_acc"] for r in cell[n]) for n in names]
            lines.append(f"| {arch} | {key} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def default_scores(conn: dict, fl: dict) -> dict:
    """Per WSA setting, the mean *validation* gain over the plain baseline across cells:
    connectivity (midpoint accuracy minus plain's, per path) and FL (final accuracy minus
    FedAvg's)."""
    gains: dict = {}
    for pairs in conn.values():
        for cell in pairs.values():
            for path in ("raw", "aligned"):
                base = mean_std(conn_values(cell["plain"], path, "val_mid_acc"))[0]
                for name, recs in cell.items():
                    if name != "plain":
                        v = mean_std(conn_values(recs, path, "val_mid_acc"))[0] - base
                        g = gains.setdefault(name, {f"connectivity_{p}": [] for p in PATHS})
                        g.setdefault("fl", [])
                        g[f"connectivity_{path}"].append(v)
    for cells in fl.values():
        for cell in cells.values():
            base = mean_std(r["final_val_acc"] for r in cell["fedavg"])[0]
            for name, recs in cell.items():
                if name.startswith("wsa-"):
                    v = mean_std(r["final_val_acc"] for r in recs)[0] - base
                    g = gains.setdefault(name, {f"connectivity_{p}": [] for p in PATHS})
                    g.setdefault("fl", []).append(v)
    return {
        name: {k: (statistics.fmean(v) if v else None) for k, v in g.items()}
        for name, g in gains.items()
    }


def rounded(obj, digits: int = 5):
    """`obj` with every float rounded (keeps the JSON small)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {str(k): rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int):
    plt = _pyplot()
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def plot_connectivity(conn: dict, targets, path: Path) -> None:
    """Test loss along the path, mean ± std over seeds: plain and the chosen WSA, raw and
    aligned, one panel per (arch, pair)."""
    cells = [(arch, pair, cell) for arch, pairs in conn.items() for pair, cell in pairs.items()]
    fig, axes = _grid(len(cells))
    colors = {"plain": "tab:gray", "init": "tab:blue", "fused": "tab:orange"}
    for ax, (arch, pair, cell) in zip(axes, cells):
        for path_kind, style in (("raw", "-"), ("aligned", "--")):
            chosen = [("plain", "plain")]
            chosen += [(t, select_connectivity(cell, t, path_kind)) for t in targets]
            for key, name in chosen:
                curves = [r[path_kind]["curve"] for r in cell[name]]
                alphas = curves[0]["alphas"]
                ys = np.array([c["metrics"]["test_loss"] for c in curves])
                ax.plot(alphas, ys.mean(0), style, color=colors[key], label=f"{name} {path_kind}")
                ax.fill_between(
                    alphas, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=colors[key],
                    alpha=0.12,
                )  # fmt: skip
        ax.set_title(f"{arch}, {pair}", fontsize=10)
        ax.set_xlabel("alpha (0 = A, 1 = B)")
        ax.set_ylabel("test loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(
        "Interpolation A -> B (dashed: B permuted to A first); WSA lambda chosen on val per "
        "path; mean ± std over seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_fl(fl: dict, targets, path: Path) -> None:
    """Test accuracy per round, mean ± std over seeds, one panel per (arch, cell)."""
    cells = [(arch, key, cell) for arch, c in fl.items() for key, cell in c.items()]
    fig, axes = _grid(len(cells))
    for ax, (arch, key, cell) in zip(axes, cells):
        for name in fl_choices(cell, targets):
            ys = np.array([r["test_acc"] for r in cell[name]])
            xs = np.arange(1, ys.shape[1] + 1)
            line = ax.plot(xs, ys.mean(0), label=name)[0]
            ax.fill_between(
                xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=line.get_color(),
                alpha=0.12,
            )  # fmt: skip
        ax.set_title(f"{arch}, {key}", fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Federated learning, 10 clients: mean ± std over seeds (settings chosen on val)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------
# Main


def report(doc: dict, out: Path, stem: str) -> None:
    """Print the tables, draw the PNGs and write the JSON of a study's results `doc`."""
    conn, fl = doc.get("connectivity", {}), doc.get("fl", {})
    targets = tuple(doc["config"]["targets"])
    out.mkdir(parents=True, exist_ok=True)
    if conn:
        doc["connectivity_table"] = rows = connectivity_rows(conn, targets)
        print("\n== Mode connectivity, test split (WSA lambda chosen on validation, per path)\n")
        print(connectivity_table(rows))
        print("\n== Mode connectivity sweep, validation split\n")
        print(connectivity_sweep_table(conn))
        plot_connectivity(conn, targets, out / f"{stem}_connectivity.png")
    if fl:
        print("\n== Federated learning, final test accuracy (setting chosen on validation)\n")
        print(fl_table(fl, targets))
        print("\n== Federated learning sweep, final validation accuracy\n")
        print(fl_sweep_table(fl))
        plot_fl(fl, targets, out / f"{stem}_fl.png")
    if conn or fl:
        doc["validation_gain_over_plain"] = gains = default_scores(conn, fl)
        print("\n== Mean validation gain over plain / FedAvg (accuracy points), per WSA setting\n")
        for name, g in sorted(gains.items()):
            parts = [f"{k} {v:+.2f}" for k, v in g.items() if v is not None]
            print(f"  {name:16s} " + ", ".join(parts))
    (out / f"{stem}.json").write_text(json.dumps(rounded(doc), separators=(",", ":")) + "\n")
    print(f"\nwrote {out / stem}.json and PNGs")


def main() -> None:
    global START
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, tiny grid")
    parser.add_argument("--part", choices=("all", "connectivity", "fl"), default="all")
    parser.add_argument("--seeds", type=int, default=len(SEEDS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no contention)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--report", type=Path, help="only redo the tables and PNGs from this results JSON"
    )
    args = parser.parse_args()
    if args.report is not None:
        doc = json.loads(args.report.read_text())
        report(doc, args.out, args.report.stem)
        return
    torch.set_num_threads(args.threads)
    START = time.perf_counter()
    cfg = QUICK if args.quick else replace(FULL, seeds=SEEDS[: args.seeds])
    if args.part != "all":
        cfg = replace(cfg, parts=(args.part,))
    data = load_data()

    def log(line: str) -> None:
        print(line, flush=True)

    conn = run_connectivity(cfg, data, log) if "connectivity" in cfg.parts else {}
    fl = run_fl(cfg, data, log) if "fl" in cfg.parts else {}
    doc = {
        "benchmark": "wsa_quality",
        "quick": args.quick,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s)",
        "torch": torch.__version__,
        "config": dict(cfg.__dict__),
        "data": {
            "canvas": CANVAS,
            "rotate_deg": ROTATE,
            "scale": SCALE,
            "shift_px": SHIFT,
            "noise": NOISE,
            "sizes": {k: len(v[1]) for k, v in data.items()},
        },
        "hyper": {"default": DEFAULT.__dict__, "free": FREE.__dict__, "decayed": DECAYED.__dict__},
        "selection": "validation split: connectivity by the midpoint accuracy of each path "
        "(raw, aligned), FL by the final accuracy; test figures are reported for the choices",
        "seconds": time.perf_counter() - START,
        "connectivity": conn,
        "fl": fl,
    }
    report(doc, args.out, "wsa_quality_quick" if args.quick else "wsa_quality")
    print(f"total {doc['seconds']:.0f}s")


START = 0.0

if __name__ == "__main__":
    main()
