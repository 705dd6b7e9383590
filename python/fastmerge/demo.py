"""A one-minute tour: ``python -m fastmerge.demo``.

Builds two small MLPs from different seeds, shows their weight scopes, fuses them into
one target, and trains one model for a few steps with the WSA regularizer pulling its
scope toward the target.
"""

from __future__ import annotations

import torch
from torch import nn

import fastmerge
from fastmerge.wsa import WeightScopeRegularizer, fuse_scopes, scope_of


def _mlp(seed: int, init_std: float) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.weight, std=init_std)
    return model


def main() -> None:
    """Run the tour and print what happens.

    Example:
        >>> main()  # doctest: +SKIP
    """
    print(fastmerge.cli.info.info_text())
    a, b = _mlp(0, 0.05), _mlp(1, 0.15)
    scope_a, scope_b = scope_of(a), scope_of(b)
    target = fuse_scopes([scope_a, scope_b], rule="mean")
    for name, sa, sb, st in zip(target.names, scope_a.std, scope_b.std, target.std):
        print(f"{name}: std A {sa:.4f}  B {sb:.4f}  fused target {st:.4f}")

    reg = WeightScopeRegularizer(a, target, strength=10.0)
    optimizer = torch.optim.SGD(a.parameters(), lr=0.05)
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    for step in range(31):
        optimizer.zero_grad()
        task = nn.functional.cross_entropy(a(x), y)
        penalty = reg()
        (task + penalty).backward()
        optimizer.step()
        if step % 10 == 0:
            print(f"step {step:2d}: task loss {task.item():.4f}  WSA penalty {penalty.item():.4f}")
    print("std of A after training:", [round(v, 4) for v in scope_of(a).std.tolist()])


if __name__ == "__main__":
    main()
