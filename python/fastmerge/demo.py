"""A two-minute tour: ``python -m fastmerge.demo [--quick]``.

Five steps on small MLPs trained for a few seconds on scikit-learn's digits (when
scikit-learn is importable) or on generated clusters (otherwise), each printing what it did:

1. the backends this installation uses;
2. WSA: two models' weight scopes, their fused target, and a few training steps with the
   WSA penalty pulling a model's scope toward it;
3. PLeaS: two models from different seeds merged at 1.0x and 1.5x FLOPs, with accuracies;
4. Twin-Merging: two task experts merged into a shared model plus low-rank task knowledge,
   a router fitted on the shared model's features, and the routed model's accuracy;
5. the ``fastmerge merge`` engine: a TIES merge of three checkpoints (the base and the two
   experts) written as safetensors to a temporary folder.

``--quick`` trains for fewer steps (the test runs it).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Optional

import safetensors.torch
import torch
from torch import nn

from . import backends, engine, pleas, twin
from ._version import __version__
from .wsa import WeightScopeRegularizer, fuse_scopes, scope_of

__all__ = ["load_data", "main"]

Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def load_data(seed: int = 0) -> tuple[Data, str]:
    """(train x, train y, test x, test y) of a 10-class, 64-feature problem, and its name:
    scikit-learn's digits when importable, else generated Gaussian clusters.

    Example:
        >>> (x, y, tx, ty), name = load_data()
        >>> x.shape[1], int(y.max()) + 1
        (64, 10)
    """
    gen = torch.Generator().manual_seed(seed)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        centers = 0.6 * torch.randn(10, 64, generator=gen)
        y = torch.arange(1800) % 10
        x = centers[y] + 2.0 * torch.randn(1800, 64, generator=gen)
        name = "generated clusters (10 classes, 64 features)"
    else:
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 8.0 - 1.0
        y = torch.tensor(digits.target, dtype=torch.int64)
        name = "scikit-learn digits (8x8 images, 10 classes)"
    order = torch.randperm(len(y), generator=gen)
    x, y = x[order], y[order]
    cut = int(0.75 * len(y))
    return (x[:cut], y[:cut], x[cut:], y[cut:]), name


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = torch.randint(0, len(y), (128,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    return model


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return 100.0 * float((model(x).argmax(-1) == y).float().mean())


def step_backends() -> None:
    """Step 1: the installation."""
    lines = [f"fastmerge {__version__} (torch {torch.__version__})"]
    for name, loader in (
        ("fastmerge._C (cpu)", backends.cpu_extension),
        ("fastmerge._cuda (cuda)", backends.cuda_extension),
    ):
        try:
            loader()
            lines.append(f"{name}: built")
        except backends.BackendUnavailableError:
            lines.append(f"{name}: not available (reference or Triton backends are used)")
    print("[1/5] backends: " + "; ".join(lines))


def step_wsa(data: Data, steps: int) -> None:
    """Step 2: fused scope statistics and the WSA penalty."""
    x, y = data[0], data[1]
    a, b = _mlp(0), _mlp(1)
    for layer in (b[0], b[2], b[4]):
        nn.init.normal_(layer.weight, std=0.15)
    scope_a, scope_b = scope_of(a), scope_of(b)
    target = fuse_scopes([scope_a, scope_b], rule="mean")
    print("[2/5] WSA: weight scopes (std) of two models and their fused target:")
    for name, sa, sb, st in zip(target.names, scope_a.std, scope_b.std, target.std):
        print(f"      {name}: A {sa:.4f}  B {sb:.4f}  fused {st:.4f}")
    reg = WeightScopeRegularizer(a, target, strength=10.0)
    optimizer = torch.optim.SGD(a.parameters(), lr=0.05)
    first = last = 0.0
    for step in range(steps):
        optimizer.zero_grad()
        penalty = reg()
        (nn.functional.cross_entropy(a(x), y) + penalty).backward()
        optimizer.step()
        first, last = (penalty.item() if step == 0 else first), penalty.item()
    print(f"      WSA penalty over {steps} training steps of A: {first:.4f} -> {last:.4f}")


def step_pleas(data: Data, steps: int) -> None:
    """Step 3: PLeaS merges of two models from different seeds at 1.0x and 1.5x FLOPs."""
    x, y, tx, ty = data
    a, b = _train(_mlp(10), x, y, steps, 0), _train(_mlp(11), x, y, steps, 1)
    batches = list(x.split(256))
    print(
        f"[3/5] PLeaS: two models (seeds 10, 11), test accuracy {_accuracy(a, tx, ty):.1f}% "
        f"and {_accuracy(b, tx, ty):.1f}%"
    )
    avg = pleas.merge(a, b, batches, method="average")
    print(f"      plain weight average: {_accuracy(avg, tx, ty):.1f}%")
    for budget in (1.0, 1.5):
        merged = pleas.merge(a, b, batches, budget=budget)
        flops = merged.fastmerge_info["relative_flops"]
        print(
            f"      PLeaS at {budget}x FLOPs (realized {flops:.2f}x): "
            f"{_accuracy(merged, tx, ty):.1f}%"
        )


def _experts(data: Data, steps: int) -> tuple[nn.Module, list[nn.Module], torch.Tensor]:
    """A base trained briefly on everything, and experts fine-tuned on classes 0-4 / 5-9."""
    x, y = data[0], data[1]
    base = _train(_mlp(20), x, y, max(steps // 4, 1), 2)
    task = (y >= 5).long()
    experts = []
    for t in (0, 1):
        expert = _mlp(20)
        expert.load_state_dict(base.state_dict())
        experts.append(_train(expert, x[task == t], y[task == t], steps, 3 + t))
    return base, experts, task


def step_twin(
    data: Data, steps: int, base: nn.Module, experts: list[nn.Module], task: torch.Tensor
) -> None:
    """Step 4: a Twin merge of the two experts with a fitted router."""
    x, _, tx, ty = data
    tt = (ty >= 5).long()
    for t, expert in enumerate(experts):
        mask = tt == t
        print(
            ("[4/5] Twin-Merging: " if t == 0 else "      ")
            + f"expert {t} (classes {'0-4' if t == 0 else '5-9'}): "
            f"{_accuracy(expert, tx[mask], ty[mask]):.1f}% on its task, "
            f"{_accuracy(expert, tx, ty):.1f}% on all"
        )
    merger = twin.TwinMerger(base, experts, shared_kwargs={"scale": 1.0}, rank=8, progress=False)
    model = twin.TwinModel(base, merger)
    with torch.no_grad():
        features = model.features(x)
    router = twin.fit_router(features, task, epochs=max(steps // 5, 10), lr=1e-2)
    model = twin.TwinModel(base, merger, router)
    shared = _mlp(20)
    shared.load_state_dict(merger.shared_state)
    with torch.no_grad():
        routed = 100.0 * float((model(tx).argmax(-1) == ty).float().mean())
        gate_acc = 100.0 * float((model.gates(tx).argmax(-1) == tt).float().mean())
    print(f"      shared model (task arithmetic) alone: {_accuracy(shared, tx, ty):.1f}% on all")
    print(
        f"      router picks the right task for {gate_acc:.1f}% of test inputs; "
        f"routed Twin model (rank 8): {routed:.1f}% on all"
    )


def step_engine(data: Data, base: nn.Module, experts: list[nn.Module]) -> None:
    """Step 5: ``fastmerge merge`` (the engine in-process) of three safetensors checkpoints."""
    tx, ty = data[2], data[3]
    with tempfile.TemporaryDirectory(prefix="fastmerge-demo-") as tmp:
        paths = []
        for name, model in zip(("base", "expert0", "expert1"), [base, *experts]):
            path = Path(tmp) / f"{name}.safetensors"
            safetensors.torch.save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()}, path
            )
            paths.append(str(path))
        config = engine.parse_config(
            {
                "merge_method": "ties",
                "base_model": paths[0],
                "models": [
                    {"model": p, "parameters": {"weight": 1.0, "density": 0.5}} for p in paths[1:]
                ],
            }
        )
        summary = engine.run(config, Path(tmp) / "merged")
        merged = {}
        for shard in sorted((Path(tmp) / "merged").glob("*.safetensors")):
            merged.update(safetensors.torch.load_file(shard))
    model = _mlp(20)
    model.load_state_dict(merged)
    print("[5/5] fastmerge merge: TIES (density 0.5) of base + 2 experts, three safetensors files")
    print(
        f"      {summary.tensors} tensors, read {summary.bytes_read / 1e3:.0f} kB, "
        f"wrote {summary.bytes_written / 1e3:.0f} kB in {summary.seconds:.2f} s"
    )
    print(f"      merged model: {_accuracy(model, tx, ty):.1f}% on all classes")


def main(argv: Optional[list[str]] = None) -> None:
    """Run the tour and print what each step did.

    Example:
        >>> main(["--quick"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(
        prog="python -m fastmerge.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer training steps (for tests)")
    args = parser.parse_args(argv)
    steps = 60 if args.quick else 400
    start = time.perf_counter()
    torch.manual_seed(0)
    data, name = load_data()
    step_backends()
    print(f"      data: {name}, {len(data[1])} train / {len(data[3])} test samples")
    step_wsa(data, 31)
    step_pleas(data, steps)
    base, experts, task = _experts(data, steps)
    step_twin(data, steps, base, experts, task)
    step_engine(data, base, experts)
    print(f"tour done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
