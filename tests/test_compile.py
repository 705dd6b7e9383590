"""fastmerge under torch.compile(fullgraph=True) and torch.export: the WSA regularizer in a
training step, a routed TwinModel, scope_stats on parameters; each equals eager (values and
gradients)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastmerge
from fastmerge.ops import _library
from fastmerge.twin import TwinMerger, TwinModel
from fastmerge.wsa import WeightScopeRegularizer

from .twin.conftest import perturbed_experts, tiny_net

pytestmark = pytest.mark.skipif(not _library.REGISTERED, reason="torch < 2.4")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _mlp(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return model


def _train(model, reg, loss_fn, steps=3):
    """`steps` SGD steps; returns the losses, the last gradients and the final weights."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)
        loss = loss_fn(x, y)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), grads, [p.detach().clone() for p in model.parameters()]


def _regularized_training(backend):
    eager_model = _mlp()
    compiled_model = copy.deepcopy(eager_model)
    results = []
    for model, compile_it in ((eager_model, False), (compiled_model, True)):
        reg = WeightScopeRegularizer(model)  # target: the scope at construction
        with torch.no_grad():  # move away from the target so that the penalty acts
            for p in model.parameters():
                p.mul_(1.5).add_(0.01)

        def loss_fn(x, y, model=model, reg=reg):
            return nn.functional.mse_loss(model(x), y) + reg()

        if compile_it:
            loss_fn = torch.compile(loss_fn, fullgraph=True, backend=backend)
        results.append(_train(model, reg, loss_fn))
    return results


def _assert_same(eager, compiled, tol):
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_wsa_regularizer_training_step_compiles_fullgraph():
    eager, compiled = _regularized_training("aot_eager")
    assert float(eager[0][0]) > float(eager[0][-1])  # it trains
    _assert_same(eager, compiled, 1e-6)


def test_wsa_regularizer_training_step_with_inductor():
    eager, compiled = _regularized_training("inductor")
    _assert_same(eager, compiled, 1e-5)


def test_wsa_penalty_with_a_pair_target_compiles_fullgraph():
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)

    def penalty(w):
        return fastmerge.wsa_penalty([w, 2 * w], (0.0, 0.5), divergence="w2")

    compiled = torch.compile(penalty, fullgraph=True, backend="aot_eager")
    value = compiled(w)
    (grad,) = torch.autograd.grad(value, w)
    expected_value = penalty(w)
    (expected,) = torch.autograd.grad(expected_value, w)
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)


def test_a_bad_target_raises_when_compiled():
    w = torch.randn(3)

    def penalty(w, std):
        return fastmerge.wsa_penalty([w], (0.0, std))

    compiled = torch.compile(penalty, fullgraph=True, backend="aot_eager")
    compiled(w, torch.tensor([0.5], dtype=torch.float64))
    with pytest.raises(RuntimeError, match="target std must be positive"):
        compiled(w, torch.tensor([-0.5], dtype=torch.float64))


def test_scope_stats_on_parameters_compiles_fullgraph():
    model = _mlp()
    params = list(model.parameters())

    def moments(params):
        stats = fastmerge.scope_stats(params)
        return stats.mean, stats.std, stats.count

    compiled = torch.compile(moments, fullgraph=True, backend="aot_eager")
    got, want = compiled(params), moments(params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    weights = torch.arange(1.0, len(params) + 1, dtype=torch.float64)
    grads = torch.autograd.grad(((got[0] + got[1]) * weights).sum(), params)
    expected = torch.autograd.grad(((want[0] + want[1]) * weights).sum(), params)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def _twin(mode="routed"):
    net = tiny_net()
    merger = TwinMerger(net, perturbed_experts(net, 3), rank=0.5, progress=False)
    return TwinModel(net, merger, mode=mode)


def _batch():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64)
    gates = torch.softmax(torch.randn(4, 3, generator=gen, dtype=torch.float64), -1)
    gates[1, 0] = 0.0  # a zero gate: the routed path skips it
    return x, gates


@pytest.mark.parametrize("mode", ["routed", "per_batch"])
def test_twin_model_forward_compiles_fullgraph(mode):
    twin = _twin(mode)
    x, gates = _batch()
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    outputs = [twin(xs[0], gates=gates), compiled(xs[1], gates=gates)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12)
    params = list(twin.parameters())
    grads = [torch.autograd.grad(out.square().sum(), [x_, *params]) for out, x_ in zip(outputs, xs)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_twin_model_exports_and_the_program_equals_eager():
    twin = _twin().eval()
    x, gates = _batch()
    program = torch.export.export(twin, (x,), {"gates": gates})
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "fastmerge.lowrank_mixture.default" in targets
    with torch.no_grad():
        expected = twin(x, gates=gates)
        got = program.module()(x, gates=gates)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        x2, g2 = torch.randn_like(x), gates.flip(0)  # new values, same shapes
        torch.testing.assert_close(program.module()(x2, gates=g2), twin(x2, gates=g2))


@pytest.mark.parametrize("batched", [False, True])
def test_linear_assignment_compiles_fullgraph(batched):
    gen = torch.Generator().manual_seed(5)
    shape = (3, 5, 7) if batched else (6, 4)
    cost = torch.rand(shape, generator=gen, dtype=torch.float32)

    def matched_cost(c):
        rows, cols = fastmerge.linear_assignment(c, maximize=True)
        picked = c[..., rows, cols] if not batched else torch.gather(c, 2, cols[..., None])
        return rows, cols, picked.sum()

    compiled = torch.compile(matched_cost, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(cost), matched_cost(cost)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_linear_assignment_failure_is_asserted_when_compiled():
    cost = torch.tensor([[float("nan"), 1.0], [2.0, 3.0]])
    compiled = torch.compile(fastmerge.linear_assignment, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="invalid numeric entries"):
        compiled(cost)


@pytest.mark.parametrize(
    "options",
    [{}, {"keep_probability": [0.5, 0.7], "seed": 3}, {"lower": [0.1, 0.2], "consensus": True}],
)
def test_merge_ops_compile_fullgraph(options):
    # The ops a merge composes, with per-expert arguments given as Python lists: their
    # checks read the numbers, never a tensor, so nothing breaks the graph.
    gen = torch.Generator().manual_seed(9)
    base, b, c = (torch.randn(16, generator=gen) for _ in range(3))

    def merge(base, b, c):
        trimmed = fastmerge.ops.magnitude_threshold(base, [b, c], 4)
        combined = fastmerge.ops.gta_combine(base, [b, c], [0.5, 0.5], **options)
        tied = fastmerge.ops.ties_combine(base, [b, c], trimmed)
        mixed = fastmerge.ops.weighted_sum([combined, tied], [0.5, 0.5])
        return mixed, fastmerge.ops.nearswap(base, b, 0.5), fastmerge.ops.gram([b.view(4, 4)])

    compiled = torch.compile(merge, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(base, b, c), merge(base, b, c)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gta_combine_bad_weights_tensor_is_asserted_when_compiled():
    base, b = torch.zeros(4), torch.ones(4)
    compiled = torch.compile(
        lambda w: fastmerge.ops.gta_combine(base, [b], w), fullgraph=True, backend="aot_eager"
    )
    with pytest.raises(RuntimeError, match="weights must be finite"):
        compiled(torch.tensor([float("nan")], dtype=torch.float64))


def _direct_calls():
    gen = torch.Generator().manual_seed(11)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    ops = fastmerge.ops
    return {
        "conv_gram": (lambda x, y: ops.conv_gram(x, y, 3), (r(1, 2, 4, 4), r(1, 3, 2, 2))),
        "feature_center": (ops.feature_center, (r(4, 3), r(3))),
        "feature_cost": (
            lambda c, sa, sb, qa, qb, ha, hb: ops.feature_cost(c, sa, sb, qa, qb, ha, hb, 10),
            (r(3, 2), r(3), r(2), r(3).abs() + 5, r(2).abs() + 5, r(3), r(2)),
        ),
        "scope_grad": (
            lambda x, t, m, a, b: ops.scope_grad([x, t], m, a, b),
            (r(4, 3), r(5), r(2), r(2), r(2)),
        ),
        "lowrank_mixture": (
            ops.lowrank_mixture,
            (r(3, 4), r(5, 4), r(5), r(2, 5, 1), r(2, 1, 4), r(3, 2)),
        ),
        "merge_lowrank": (ops.merge_lowrank, (r(5, 4), r(2, 5, 1), r(2, 1, 4), r(2))),
        "magprune": (lambda b, e: ops.magprune(b, e, 0.5, 0.2, seed=3), (r(4, 5), r(4, 5))),
        "sce_variance": (lambda b, e, f: ops.sce_variance(b, [e, f]), (r(4, 5), r(4, 5), r(4, 5))),
        "sce_combine": (
            lambda b, e, f, t: ops.sce_combine(b, [e, f], threshold=t),
            (r(4, 5), r(4, 5), r(4, 5), r(1).abs()),
        ),
    }


@pytest.mark.parametrize("name", sorted(_direct_calls()))
def test_every_other_op_compiles_fullgraph(name):
    # With the merge ops, linear_assignment and scope_stats above: every public op.
    function, args = _direct_calls()[name]
    compiled = torch.compile(function, fullgraph=True, backend="aot_eager")
    got, want = compiled(*args), function(*args)
    got = got if isinstance(got, (list, tuple)) else [got]
    want = want if isinstance(want, (list, tuple)) else [want]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
