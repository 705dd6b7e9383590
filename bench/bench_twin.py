"""Twin-Merging inference: routed mixed-task batches against the reference's per-sample
materialization and against the static shared model.

Model (``mlp6x768``, float32, seeded): 6 residual blocks ``x + fc2(gelu(fc1(x)))`` with
``fc1`` 768 -> 3072 and ``fc2`` 3072 -> 768 (with biases): the linear shapes of a
BERT-base layer's MLP, 12 routed Linear layers. T = 8 experts, each the base plus a
rank-32 task vector and a little dense noise; the shared expert is task arithmetic
(scale 0.3); exclusive knowledge at rank 10% (77 for 768 x 3072), by randomized SVD.

Batch: 64 samples of ``TOKENS`` tokens each (``FASTMERGE_BENCH_TWIN_TOKENS``, default 8,
and 1), sample n from task n mod 8. Dense gates: the softmax of router-like logits (the
sample's task +4); top-2: the two largest of those, renormalised. The gates are given to
the model (the router's own feature pass is not timed: it is one forward of the shared
model, the same in every routed provider and outside the reference's weight merging).

Providers (group ``twin-mlp6x768-L<tokens>``), each timed on the whole batch of 64:

* ``torch-static-shared``: the shared model alone, plain ``nn.Linear``s (the latency
  anchor);
* ``fastmerge-routed-dense`` / ``fastmerge-routed-top2``: :class:`fastmerge.twin.TwinModel`
  with the dense / top-2 gates (``fastmerge.lowrank_mixture`` in every Linear);
* ``fastmerge-per-batch``: ``mode="per_batch"``, one merge per batch from the mean gate;
* ``reference-per-sample``: the reference's way: for each sample, materialize every merged
  weight ``W_s + sum_t g_t Delta~_t`` from the stored dense deltas (the reference stores
  dense products) and run the plain model at batch size 1. Timed on the batch's first
  ``REFERENCE_SAMPLES`` = 16 samples (its time is linear in them); ``samples`` in the
  extra info makes the report compare time per sample.

Threads: on a shared, loaded 2-core machine, multi-threaded BLAS calls wait on each other
and every provider's time swings by several x; the published CPU results were taken with
``OMP_NUM_THREADS=1 FASTMERGE_NUM_THREADS=1`` (the report's header shows the thread
count).

Before timing, the routed output of the first samples is checked against the reference.
Run: ``OMP_NUM_THREADS=1 FASTMERGE_NUM_THREADS=1 python -m pytest bench/bench_twin.py
--benchmark-json bench/results/twin-cpu.raw.json`` then ``python bench/report.py
bench/results/twin-cpu.raw.json``.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import SEED, Workload, devices, label, run_benchmark
from torch import nn

import fastmerge

WIDTH, HIDDEN, BLOCKS = 768, 3072, 6
TASKS, RANK, BATCH = 8, 0.1, 64
TASK_VECTOR_RANK = 32
#: The reference runs samples one at a time, so its time is linear in their number: it
#: is timed on the first 16 of the batch, and the report compares time per sample.
REFERENCE_SAMPLES = 16
TOKENS = tuple(int(t) for t in os.environ.get("FASTMERGE_BENCH_TWIN_TOKENS", "8,1").split(","))
PROVIDERS = (
    "torch-static-shared",
    "fastmerge-routed-dense",
    "fastmerge-routed-top2",
    "fastmerge-per-batch",
    "reference-per-sample",
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


def make_model() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(*[Block() for _ in range(BLOCKS)]).eval()


def make_experts(base: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Each expert: the base plus a rank-32 task vector and dense noise on every matrix."""
    gen = torch.Generator().manual_seed(SEED + 1)
    experts = []
    for _ in range(TASKS):
        expert = {}
        for key, w in base.items():
            if w.dim() == 2:
                m, n = w.shape
                a = torch.randn(m, TASK_VECTOR_RANK, generator=gen) / m**0.5
                b = torch.randn(TASK_VECTOR_RANK, n, generator=gen) / n**0.5
                noise = torch.randn(m, n, generator=gen) * (1e-3 / n**0.5)
                expert[key] = w + 0.05 * (a @ b) + noise
            else:
                expert[key] = w + 0.01 * torch.randn(w.shape, generator=gen)
        experts.append(expert)
    return experts


@functools.cache
def setup() -> dict[str, Any]:
    """The model, merger, routed models and the reference's dense deltas (built once)."""
    model = make_model()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the untimed set-up: one thread is faster on a busy machine
    merger = fastmerge.twin.TwinMerger(
        base,
        make_experts(base),
        shared_kwargs={"scale": 0.3},
        rank=RANK,
        svd="randomized",
        progress=False,
    )
    static = copy.deepcopy(model)
    static.load_state_dict(merger.shared_state)
    dense = {  # what the reference stores: the dense products U S V^T, (T, m, n)
        key: torch.bmm(us, vs) for key, (us, vs) in merger.factors.items()
    }
    torch.set_num_threads(threads)
    return {
        "model": model,
        "merger": merger,
        "static": static,
        "reference_model": copy.deepcopy(static),
        "routed": fastmerge.twin.TwinModel(model, merger),
        "per_batch": fastmerge.twin.TwinModel(model, merger, mode="per_batch"),
        "dense_deltas": dense,
    }


def make_gates(top_k: int | None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED + 2)
    logits = torch.randn(BATCH, TASKS, generator=gen)
    logits[torch.arange(BATCH), torch.arange(BATCH) % TASKS] += 4.0
    return fastmerge.twin.gates_from_logits(logits, top_k)


def reference_per_sample(
    setup_: dict[str, Any], x: torch.Tensor, gates: torch.Tensor, samples: int = BATCH
) -> torch.Tensor:
    """Materialize the merged weights of each sample and run it alone (batch size 1)."""
    model, merger, dense = setup_["reference_model"], setup_["merger"], setup_["dense_deltas"]
    shared = merger.shared_state
    params = dict(model.named_parameters())
    outputs = []
    with torch.no_grad():
        for n in range(samples):
            g = gates[n]
            for key, delta in dense.items():
                params[key].copy_(shared[key] + torch.tensordot(g, delta, dims=1))
            for key, delta in merger.dense_deltas.items():
                params[key].copy_(shared[key] + g @ delta)
            outputs.append(model(x[n : n + 1]))
    return torch.cat(outputs)


def peer(provider: str, tokens: int) -> Callable[[], torch.Tensor]:
    s = setup()
    x = torch.randn(BATCH, tokens, WIDTH, generator=torch.Generator().manual_seed(SEED + 3))
    dense, top2 = make_gates(None), make_gates(2)
    if provider == "torch-static-shared":
        return lambda: s["static"](x)
    if provider == "fastmerge-routed-dense":
        return lambda: s["routed"](x, gates=dense)
    if provider == "fastmerge-routed-top2":
        return lambda: s["routed"](x, gates=top2)
    if provider == "fastmerge-per-batch":
        return lambda: s["per_batch"](x, gates=dense)
    if provider == "reference-per-sample":
        return lambda: reference_per_sample(s, x, dense, samples=REFERENCE_SAMPLES)
    raise ValueError(provider)


def check_against_reference(tokens: int) -> None:
    """The routed model and the reference agree on the first samples (dense and top-2)."""
    s = setup()
    x = torch.randn(4, tokens, WIDTH, generator=torch.Generator().manual_seed(SEED + 4))
    for gates in (make_gates(None)[:4], make_gates(2)[:4]):
        routed = s["routed"](x, gates=gates)
        expected = reference_per_sample(s, x, gates, samples=4)
        torch.testing.assert_close(routed, expected, rtol=1e-4, atol=1e-4)


CASES = [
    pytest.param(tokens, provider, id=f"L{tokens}-{provider}")
    for tokens in TOKENS
    for provider in PROVIDERS
]


@pytest.mark.parametrize(("tokens", "provider"), CASES)
def bench_twin(benchmark: Any, tokens: int, provider: str) -> None:
    # Built outside inference mode: the routed layers' factors must be ordinary tensors
    # (the cpu backend of lowrank_mixture reads their version counter).
    layers = [t for k, t in setup()["static"].state_dict().items() if t.dim() == 2]
    wl = Workload(f"mlp6x768-L{tokens}", ("layers",), tuple(layers))
    label(benchmark, "twin", wl, "cpu", provider)
    samples = REFERENCE_SAMPLES if provider == "reference-per-sample" else BATCH
    benchmark.extra_info.update(samples=samples, tokens=tokens, tasks=TASKS, rank=RANK)
    min_rounds = 3 if provider == "reference-per-sample" else 10
    with torch.inference_mode():
        if provider == PROVIDERS[0]:
            check_against_reference(tokens)
        run_benchmark(benchmark, peer(provider, tokens), "cpu", min_rounds=min_rounds)


if __name__ == "__main__":
    print(setup()["merger"], devices())
