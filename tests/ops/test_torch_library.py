"""Every fastmerge op is a torch.library custom op: opcheck (schema, fake, autograd
registration, AOT dispatch) on small real inputs, the eager route, and the fallback of
torch without torch.library.register_*."""

from __future__ import annotations

import pytest
import torch

import fastmerge
from fastmerge.ops import _library
from fastmerge.ops.conv_gram import _OP as conv_gram_op
from fastmerge.ops.feature_center import _OP as feature_center_op
from fastmerge.ops.feature_cost import _OP as feature_cost_op
from fastmerge.ops.gram import _OP as gram_op
from fastmerge.ops.gta_combine import _OP as gta_combine_op
from fastmerge.ops.linear_assignment import _OP as linear_assignment_op
from fastmerge.ops.lowrank_mixture import _MERGE_OP as merge_lowrank_op
from fastmerge.ops.lowrank_mixture import _OP as lowrank_mixture_op
from fastmerge.ops.magnitude_threshold import _OP as magnitude_threshold_op
from fastmerge.ops.magprune import _OP as magprune_op
from fastmerge.ops.nearswap import _OP as nearswap_op
from fastmerge.ops.sce_combine import _ENERGIES_OP as sce_energies_op
from fastmerge.ops.sce_combine import _OP as sce_combine_op
from fastmerge.ops.sce_combine import _VARIANCE_OP as sce_variance_op
from fastmerge.ops.scope_grad import scope_grad_op
from fastmerge.ops.scope_stats import scope_stats_op
from fastmerge.ops.ties_combine import _OP as ties_combine_op
from fastmerge.ops.weighted_sum import _OP as weighted_sum_op
from fastmerge.wsa.penalty import penalty_op

from ..conftest import HAS_CUDA

pytestmark = pytest.mark.skipif(not _library.REGISTERED, reason="torch < 2.4")

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")],
    ),
]


def _r(*shape, dtype=torch.float64, device="cpu", grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed + sum(shape))
    t = torch.randn(*shape, generator=gen, dtype=dtype).to(device)
    return t.requires_grad_(grad)


def _cases(device: str) -> dict[str, tuple]:
    """op name -> (Op, args): small real inputs of each op's schema."""
    r = lambda *shape, **kw: _r(*shape, device=device, **kw)  # noqa: E731
    f32 = torch.float32
    base, experts = r(16, dtype=f32), [r(16, dtype=f32, seed=1), r(16, dtype=f32, seed=2)]
    rows, cols = 3, 2
    params = torch.tensor(
        [[1.0, 0.5], [0.0, 0.0], [float("inf")] * 2, [1.0, 1.0]], dtype=f32, device=device
    )
    return {
        "scope_stats": (scope_stats_op, ([r(4, 3, grad=True), r(5, grad=True)], None)),
        "scope_grad": (
            scope_grad_op,
            ([r(4, 3, dtype=f32), r(5)], r(3, 2), None),
        ),
        "wsa_penalty": (
            penalty_op,
            ([r(4, 3, grad=True), r(5, grad=True)], r(2), r(2).abs() + 0.5, "kl", "sum", None),
        ),
        "lowrank_mixture": (
            lowrank_mixture_op,
            (
                r(2, 3, 4, grad=True),
                r(5, 4, grad=True),
                r(5, grad=True),
                r(2, 5, 1, grad=True),
                r(2, 1, 4, grad=True),
                r(2, 2, grad=True),
                None,
            ),
        ),
        "merge_lowrank": (
            merge_lowrank_op,
            (r(5, 4, grad=True), r(2, 5, 1, grad=True), r(2, 1, 4, grad=True), r(2, grad=True)),
        ),
        "ties_combine": (
            ties_combine_op,
            (
                base,
                experts,
                torch.tensor([0.5, 0.5], device=device),
                1.0,
                torch.empty_like(base),
                None,
            ),
        ),
        "magnitude_threshold": (magnitude_threshold_op, (base, experts, 3, None)),
        "gta_combine": (
            gta_combine_op,
            (
                base,
                experts,
                params,
                None,
                None,
                0,
                0,
                True,
                "positive",
                True,
                1.0,
                torch.empty_like(base),
                None,
            ),
        ),  # fmt: skip
        "nearswap": (nearswap_op, (base, experts[0], 0.5, torch.empty_like(base), None)),
        "magprune": (
            magprune_op,
            (base, experts[0], 123, 2**51, 2**47, 0, 4, 2, torch.empty_like(base), None),
        ),
        "sce_variance": (sce_variance_op, (base, experts, torch.empty_like(base), None)),
        "sce_energies": (sce_energies_op, (base, experts, base.new_full((1,), 0.1), None)),
        "sce_combine": (
            sce_combine_op,
            (
                base,
                experts,
                base.new_full((1,), 0.1),
                base.new_tensor([0.25, 0.75]),
                torch.empty_like(base),
                None,
            ),
        ),  # fmt: skip
        "weighted_sum": (
            weighted_sum_op,
            (experts, [0.5, 0.25], torch.float32, torch.empty_like(base), None),
        ),
        "gram": (gram_op, ([r(rows, cols), r(rows, cols, dtype=f32)], None, "rows", None)),
        "conv_gram": (
            conv_gram_op,
            (r(1, 2, 4, 4), r(1, 3, 3, 3), [2, 2], [1, 1], [0, 0], [1, 1], True, None),
        ),
        "feature_cost": (
            feature_cost_op,
            (r(3, 2), r(3), r(2), r(3).abs(), r(2).abs(), r(3), r(2), 5.0, "correlation", None),
        ),
        "linear_assignment": (linear_assignment_op, (r(2, 3, 4), False, None)),
        "feature_center": (
            feature_center_op,
            (r(4, 3), r(3), torch.empty(4, 3, dtype=torch.float64, device=device), None),
        ),
    }


OPS = sorted(_cases("cpu"))


def test_every_public_op_is_registered():
    names = {n for n in fastmerge.ops.__all__ if n not in ("clear_lowrank_cache",)}
    names.add("wsa_penalty")
    assert names <= set(OPS)
    for name in OPS:
        assert hasattr(torch.ops.fastmerge, name), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, device):
    op, args = _cases(device)[name]
    torch.library.opcheck(op.overload, args)


@pytest.mark.parametrize("name", OPS)
def test_dispatcher_and_kernel_agree(name):
    op, args = _cases("cpu")[name]
    kernel_args, dispatcher_args = _clone(args), _clone(args)
    with torch.no_grad():
        via_kernel = op.kernel(*kernel_args)
        via_dispatcher = op.dispatch(*dispatcher_args)
    torch.testing.assert_close(via_dispatcher, via_kernel, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(dispatcher_args, kernel_args):  # the outputs that mutated args hold
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _clone(args):
    return [
        [t.clone() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
        else a.clone() if isinstance(a, torch.Tensor) else a
        for a in args
    ]  # fmt: skip


def test_a_wrong_fake_fails_opcheck():
    """The opcheck tests are not vacuous: a fake with the wrong dtype or shape fails."""

    def kernel(x):
        return x.sum(0)

    wrong_dtype = _library.define(
        "test_wrong_fake_dtype",
        "(Tensor x) -> Tensor",
        kernel,
        lambda x: x.new_empty(x.shape[1:], dtype=torch.float32),
    )
    wrong_shape = _library.define(
        "test_wrong_fake_shape", "(Tensor x) -> Tensor", kernel, lambda x: x.new_empty(x.shape)
    )
    right = _library.define(
        "test_right_fake", "(Tensor x) -> Tensor", kernel, lambda x: x.new_empty(x.shape[1:])
    )
    x = torch.randn(3, 2, dtype=torch.float64)
    torch.library.opcheck(right.overload, (x,))
    for op, what in ((wrong_dtype, "Dtypes"), (wrong_shape, "Shapes")):
        with pytest.raises(Exception, match=f"test_faketensor failed.*{what}"):
            torch.library.opcheck(op.overload, (x,))


def test_eager_calls_skip_the_dispatcher(monkeypatch):
    """Plain tensors without autograd go to the kernel; a tensor that needs grad, or a
    traced call, goes through torch.ops.fastmerge."""
    calls = []
    op = scope_stats_op
    monkeypatch.setattr(op, "overload", lambda *a: calls.append("dispatcher") or op.kernel(*a))
    x = torch.randn(5)
    fastmerge.scope_stats([x])
    assert calls == []
    fastmerge.scope_stats([x.requires_grad_()])
    assert calls == ["dispatcher"]
    with torch.no_grad():
        fastmerge.scope_stats([x])
    assert calls == ["dispatcher"]  # no autograd needed: the kernel


def test_backend_argument_travels_through_the_dispatcher():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    for backend in ("reference", "cpu"):
        stats = fastmerge.scope_stats([x], backend=backend)
        assert stats.mean.requires_grad
    with pytest.raises(fastmerge.BackendUnavailableError, match="cuda"):
        if HAS_CUDA:
            raise fastmerge.BackendUnavailableError("cuda (a GPU is present: nothing to check)")
        fastmerge.scope_stats([x], backend="cuda")


def test_fallback_without_register_autograd_gives_the_same_gradients():
    """torch < 2.4: the op runs through an autograd.Function built from the same backward."""
    from fastmerge.ops.scope_stats import _backward, _kernel, _setup_context

    fallback = _library._autograd_fallback("scope_stats", _kernel, _backward, _setup_context, (0,))
    xs = [_r(4, 3, grad=True), _r(7, grad=True, seed=3)]
    table = fallback(xs, None)
    (table[0].sum() + 2 * table[1].sum()).backward()
    expected = [x.grad.clone() for x in xs]
    for x in xs:
        x.grad = None
    table = scope_stats_op(xs, None)
    (table[0].sum() + 2 * table[1].sum()).backward()
    for x, grad in zip(xs, expected):
        torch.testing.assert_close(x.grad, grad, rtol=0, atol=0)
    # gradcheck runs backward several times on one graph
    assert torch.autograd.gradcheck(lambda *t: fallback(list(t), None)[1], xs)


def test_scope_stats_gradients_match_torch():
    xs = [_r(6, 5, grad=True), _r(9, grad=True, seed=4), _r(3, grad=True, seed=5)]
    stats = fastmerge.scope_stats(xs)
    loss = (stats.mean * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum()
    loss = loss + (stats.std**2).sum()
    grads = torch.autograd.grad(loss, xs)
    means = torch.stack([x.mean() for x in xs])
    stds = torch.stack([x.std(unbiased=False) for x in xs])
    expected_loss = (means * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum()
    expected = torch.autograd.grad(expected_loss + (stds**2).sum(), xs)
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: fastmerge.scope_stats(list(t)).std, xs)


def test_define_refuses_half_an_autograd_registration():
    with pytest.raises(ValueError, match="both backward and setup_context"):
        _library.define(
            "test_half_autograd", "(Tensor x) -> Tensor", lambda x: x, lambda x: x,
            backward=lambda ctx, g: g,
        )  # fmt: skip


def test_merge_lowrank_gradients():
    """Its backward is written by hand (it used to be torch's): gradcheck in float64, and
    float32 against torch's autograd of the reference formula."""
    args = [_r(5, 4, grad=True), _r(3, 5, 2, grad=True), _r(3, 2, 4, grad=True), _r(3, grad=True)]
    assert torch.autograd.gradcheck(fastmerge.merge_lowrank, args)
    w, us, vs, row = (a.detach().float().requires_grad_() for a in args)
    g = torch.randn(5, 4)
    got = torch.autograd.grad(fastmerge.merge_lowrank(w, us, vs, row), (w, us, vs, row), g)
    expected_out = w + torch.einsum("t,tor,trd->od", row, us, vs)
    expected = torch.autograd.grad(expected_out, (w, us, vs, row), g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
