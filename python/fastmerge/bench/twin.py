"""twin: Twin-Merging inference (TwinModel) vs the static shared model and per-sample merging.

Model ``mlp<B>x<W>`` (float32, seeded): B residual blocks ``x + fc2(gelu(fc1(x)))``,
W -> 4W -> W with biases (default B = 6, W = 768: BERT-base MLP shapes; ``--quick``: 2 x 64).
T = 8 experts (4 quick): the base plus a rank-32 task vector and a little dense noise;
shared expert: task arithmetic (scale 0.3); exclusive knowledge at rank 10% (randomized
SVD). Batch: 64 samples (8 quick) of L tokens (8 and 1; quick: 1), sample n from task
n mod T; dense gates (router-like logits, +4 on the sample's task) and their top-2.
Providers, group ``mlp<B>x<W>-L<L>``: ``torch-static-shared`` (the shared model alone);
``fastmerge-routed-dense`` / ``-top2`` (:class:`fastmerge.twin.TwinModel`);
``fastmerge-per-batch`` (one merge per batch from the mean gate); ``reference-per-sample``
(materialize every merged weight per sample from stored dense deltas, batch size 1; timed
on 16 samples (4 quick) and scaled to the batch). Set ``OMP_NUM_THREADS=1
FASTMERGE_NUM_THREADS=1`` on a loaded small machine for stable figures.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastmerge.twin import TwinMerger, TwinModel, gates_from_logits

from ._harness import cached
from ._peers import note
from ._suite import Case

PROVIDERS = (
    "torch-static-shared",
    "fastmerge-routed-dense",
    "fastmerge-routed-top2",
    "fastmerge-per-batch",
    "reference-per-sample",
)
#: (blocks, width, tasks, batch, tokens, reference samples)
DEFAULT = (6, 768, 8, 64, (8, 1), 16)
QUICK = (2, 64, 4, 8, (1,), 4)
TASK_VECTOR_RANK = 32


class Block(nn.Module):
    """``x + fc2(gelu(fc1(x)))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


def _experts(base: dict[str, torch.Tensor], tasks: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    experts = []
    for _ in range(tasks):
        expert = {}
        for key, w in base.items():
            if w.dim() == 2:
                m, n = w.shape
                a = torch.randn(m, TASK_VECTOR_RANK, generator=gen) / m**0.5
                b = torch.randn(TASK_VECTOR_RANK, n, generator=gen) / n**0.5
                expert[key] = (
                    w + 0.05 * (a @ b) + torch.randn(m, n, generator=gen) * (1e-3 / n**0.5)
                )
            else:
                expert[key] = w + 0.01 * torch.randn(w.shape, generator=gen)
        experts.append(expert)
    return experts


@cached
def models(blocks: int, width: int, tasks: int) -> dict[str, Any]:
    """The merger, the static shared model, the routed models and the dense deltas."""
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(width) for _ in range(blocks)]).eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merger = TwinMerger(
        base,
        _experts(base, tasks),
        shared_kwargs={"scale": 0.3},
        rank=0.1,
        svd="randomized",
        progress=False,
    )
    static = copy.deepcopy(model)
    static.load_state_dict(merger.shared_state)
    return {
        "merger": merger,
        "static": static,
        "reference": copy.deepcopy(static),
        "routed": TwinModel(model, merger),
        "per_batch": TwinModel(model, merger, mode="per_batch"),
        "dense": {k: torch.bmm(us, vs) for k, (us, vs) in merger.factors.items()},
    }


def reference_per_sample(m: dict[str, Any], x: torch.Tensor, gates: torch.Tensor, samples: int):
    """Materialize each sample's merged weights and run it alone (batch size 1)."""
    model, merger = m["reference"], m["merger"]
    shared, params = merger.shared_state, dict(model.named_parameters())
    outputs = []
    for n in range(samples):
        for key, delta in m["dense"].items():
            params[key].copy_(shared[key] + torch.tensordot(gates[n], delta, dims=1))
        for key, delta in merger.dense_deltas.items():
            params[key].copy_(shared[key] + gates[n] @ delta)
        outputs.append(model(x[n : n + 1]))
    return torch.cat(outputs)


def _setup(provider: str, shape: tuple, tokens: int) -> Callable[[], Callable[[], Any]]:
    blocks, width, tasks, batch, _, ref_samples = shape

    def setup() -> Callable[[], Any]:
        m = models(blocks, width, tasks)
        x = torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(3))
        logits = torch.randn(batch, tasks, generator=torch.Generator().manual_seed(2))
        logits[torch.arange(batch), torch.arange(batch) % tasks] += 4.0
        dense, top2 = gates_from_logits(logits, None), gates_from_logits(logits, 2)
        fns = {
            "torch-static-shared": lambda: m["static"](x),
            "fastmerge-routed-dense": lambda: m["routed"](x, gates=dense),
            "fastmerge-routed-top2": lambda: m["routed"](x, gates=top2),
            "fastmerge-per-batch": lambda: m["per_batch"](x, gates=dense),
            "reference-per-sample": lambda: reference_per_sample(m, x, dense, ref_samples),
        }
        fn = fns[provider]

        def run() -> Any:
            with torch.inference_mode():
                return fn()

        return run

    return setup


def cases(device: str, quick: bool) -> list[Case]:
    """One group per token count; the routed dense model is the ratio's reference.

    Example:
        >>> cases("cpu", True)[0].case
        'mlp2x64-L1'
    """
    if device != "cpu":
        note("twin: CPU only (its models and the reference loop are built on the CPU); skipped")
        return []
    shape = QUICK if quick else DEFAULT
    blocks, width, _, batch, tokens_list, ref_samples = shape
    out = []
    for tokens in tokens_list:
        for p in PROVIDERS:
            ref = p == "reference-per-sample"
            group, setup = f"mlp{blocks}x{width}-L{tokens}", _setup(p, shape, tokens)
            case = Case(group, p, setup, p == "fastmerge-routed-dense", "tokens", tokens)
            if ref:  # batch size 1 on a few samples, scaled to the batch
                case = dataclasses.replace(case, min_rounds=3, scale=batch / ref_samples)
            out.append(case)
    return out
