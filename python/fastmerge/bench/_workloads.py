"""Tensor-list workloads of the scope_stats and WSA suites (float32, seeded).

* ``resnet50``: torchvision ResNet-50's 161 trainable parameters, 25,557,032 elements;
* ``transformer70m``: 291 tensors, 73,127,936 elements: a 32,000 x 512 embedding, 18
  pre-norm layers of width 512 (q, k, v, o with biases; MLP 2048 with biases; two
  LayerNorms) and a final LayerNorm;
* ``tiny2000``: 2,000 tensors of 64 elements: the per-tensor overhead.
"""

from __future__ import annotations

import math

import torch

from ._harness import cached

Shape = tuple[int, ...]
SEED = 0


def resnet50_shapes() -> list[tuple[str, Shape]]:
    """Names and shapes of ResNet-50's trainable parameters (torchvision layout).

    Example:
        >>> len(resnet50_shapes())
        161
    """
    shapes: list[tuple[str, Shape]] = [("conv1.weight", (64, 3, 7, 7))]
    shapes += [("bn1.weight", (64,)), ("bn1.bias", (64,))]
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for block in range(blocks):
            p = f"layer{stage}.{block}"
            convs = [(inplanes, planes, 1), (planes, planes, 3), (planes, planes * 4, 1)]
            for i, (cin, cout, k) in enumerate(convs, start=1):
                shapes.append((f"{p}.conv{i}.weight", (cout, cin, k, k)))
                shapes += [(f"{p}.bn{i}.weight", (cout,)), (f"{p}.bn{i}.bias", (cout,))]
            if block == 0:  # projection shortcut
                shapes.append((f"{p}.downsample.0.weight", (planes * 4, inplanes, 1, 1)))
                shapes += [(f"{p}.downsample.1.weight", (planes * 4,))]
                shapes += [(f"{p}.downsample.1.bias", (planes * 4,))]
            inplanes = planes * 4
    return shapes + [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]


def transformer70m_shapes(layers: int = 18, width: int = 512) -> list[tuple[str, Shape]]:
    """Names and shapes of a pre-norm transformer: embedding, `layers` blocks, final norm.

    Example:
        >>> len(transformer70m_shapes())
        291
    """
    mlp, vocab = 4 * width, 32000
    shapes: list[tuple[str, Shape]] = [("embed.weight", (vocab, width))]
    for i in range(layers):
        p = f"layers.{i}"
        shapes += [(f"{p}.ln1.weight", (width,)), (f"{p}.ln1.bias", (width,))]
        for proj in "qkvo":
            shapes += [(f"{p}.attn.{proj}.weight", (width, width))]
            shapes += [(f"{p}.attn.{proj}.bias", (width,))]
        shapes += [(f"{p}.ln2.weight", (width,)), (f"{p}.ln2.bias", (width,))]
        shapes += [(f"{p}.mlp.fc1.weight", (mlp, width)), (f"{p}.mlp.fc1.bias", (mlp,))]
        shapes += [(f"{p}.mlp.fc2.weight", (width, mlp)), (f"{p}.mlp.fc2.bias", (width,))]
    return shapes + [("ln_f.weight", (width,)), ("ln_f.bias", (width,))]


SHAPES = {
    "resnet50": resnet50_shapes,
    "transformer70m": transformer70m_shapes,
    "tiny2000": lambda: [(f"t{i}", (64,)) for i in range(2000)],
}


def _init(name: str, shape: Shape, gen: torch.Generator) -> torch.Tensor:
    """Per-tensor scopes like a network's: fan-in scaled weights, small biases, norm
    weights (the 1-D ``*.weight`` tensors) near one; no tensor is constant."""
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if len(shape) > 1:
        return x.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
    if name.endswith(".weight"):
        return x.mul_(0.02).add_(1.0)
    return x.mul_(0.02)


@cached
def tensors(name: str, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """The workload `name` on `device`, built once per suite.

    Example:
        >>> len(tensors("tiny2000"))
        2000
    """
    if name not in SHAPES:
        raise ValueError(f"unknown workload {name!r}; valid: {', '.join(SHAPES)}")
    gen = torch.Generator().manual_seed(SEED)
    return tuple(_init(n, s, gen).to(device) for n, s in SHAPES[name]())
