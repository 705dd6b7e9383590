"""TwinMerger: shared expert, factors, dense deltas, sizes, bad input, save/load."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fastmerge import merge
from fastmerge.twin import TwinMerger, load_router, load_twin
from fastmerge.twin.router import Router


def make_models(t_count=3, dtype=torch.float64, seed=0, shapes=None):
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes or {"a.weight": (12, 9), "a.bias": (12,), "b.weight": (4, 12), "norm": (9,)}
    base = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}
    base["steps"] = torch.tensor(7)  # an integer buffer
    experts = []
    for _ in range(t_count):
        e = {
            k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=dtype)
            for k, v in base.items()
            if v.is_floating_point()
        }
        e["steps"] = torch.tensor(7)
        experts.append(e)
    return base, experts


def test_layout_of_factors_and_deltas():
    base, experts = make_models()
    twin = TwinMerger(base, experts, rank=0.5, progress=False)
    assert set(twin.factors) == {"a.weight", "b.weight"}
    assert set(twin.dense_deltas) == {"a.bias", "norm"}
    us, vs = twin.factors["a.weight"]
    assert us.shape == (3, 12, 5) and vs.shape == (3, 5, 9)  # ceil(0.5 * 9) = 5
    assert twin.ranks == {"a.weight": 5, "b.weight": 2}
    assert twin.dense_deltas["norm"].shape == (3, 9)
    assert twin.shared_state["steps"].item() == 7 and "steps" not in twin.dense_deltas
    assert us.dtype == torch.float64 and twin.task_names == ("task0", "task1", "task2")


def test_full_rank_reconstructs_every_expert():
    base, experts = make_models()
    twin = TwinMerger(base, experts, shared_kwargs={"scale": 0.3}, rank=1.0, progress=False)
    for t, expert in enumerate(experts):
        state = twin.task_state(t)
        for key, value in expert.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=1e-12, msg=key)


def test_shared_expert_is_the_chosen_merge():
    base, experts = make_models()
    twin = TwinMerger(base, experts, shared_kwargs={"scale": 0.29}, progress=False)
    expected = merge.task_arithmetic(base, experts, scale=0.29)
    for key in base:
        assert torch.equal(twin.shared_state[key], expected[key]), key
    avg = TwinMerger(base, experts, shared="average", progress=False)
    torch.testing.assert_close(avg.shared_state["a.weight"], merge.average(experts)["a.weight"])
    ties = TwinMerger(base, experts, shared="ties", shared_kwargs={"density": 0.5}, progress=False)
    torch.testing.assert_close(
        ties.shared_state["a.weight"], merge.ties(base, experts, density=0.5)["a.weight"]
    )
    custom = TwinMerger(base, experts, shared=lambda b, e: dict(b), progress=False)
    assert torch.equal(custom.shared_state["a.weight"], base["a.weight"])
    assert custom.shared_method == "<lambda>"


def test_truncated_factors_are_the_best_rank_r_approximation():
    base, experts = make_models()
    twin = TwinMerger(base, experts, rank=3, progress=False)
    for t, expert in enumerate(experts):
        delta = expert["a.weight"] - twin.shared_state["a.weight"]
        us, vs = (f[t] for f in twin.factors["a.weight"])
        s = torch.linalg.svdvals(delta)
        error = float(torch.linalg.matrix_norm(delta - us @ vs))
        assert error == pytest.approx(float(s[3:].square().sum().sqrt()), rel=1e-9)


def test_include_exclude_and_unchanged_tensors():
    base, experts = make_models()
    for e in experts:
        e["b.weight"] = base["b.weight"].clone()  # no task changes b: nothing stored
    twin = TwinMerger(base, experts, exclude=r"^a\.", progress=False)
    assert twin.factors == {}
    assert "a.weight" in twin.dense_deltas and "b.weight" not in twin.dense_deltas
    only_b = TwinMerger(base, experts, include=lambda k, t: k.startswith("a"), progress=False)
    assert set(only_b.factors) == {"a.weight"}


def test_merged_state_mixes_the_deltas():
    base, experts = make_models()
    twin = TwinMerger(base, experts, rank=1.0, progress=False)
    g = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    state = twin.merged_state(g)
    expected = sum(g[t] * experts[t]["a.weight"] for t in range(3))  # gates sum to 1
    torch.testing.assert_close(state["a.weight"], expected, rtol=0, atol=1e-12)
    only = twin.merged_state(g, keys=["norm"])
    assert torch.equal(only["a.weight"], twin.shared_state["a.weight"])
    with pytest.raises(ValueError, match=r"one weight per task \(T = 3\)"):
        twin.merged_state([0.5, 0.5])


def test_sizes_at_rank_ten_percent():
    shapes = {"fc1.weight": (256, 1024), "fc1.bias": (256,), "fc2.weight": (1024, 256)}
    base, experts = make_models(t_count=4, dtype=torch.float32, shapes=shapes)
    sizes = TwinMerger(base, experts, rank=0.1, progress=False).nbytes()
    assert sizes.factors == 4 * 2 * (256 + 1024) * 26 * 4
    assert sizes.dense_deltas == 4 * 256 * 4
    assert sizes.experts == 4 * (2 * 256 * 1024 + 256) * 4
    assert sizes.ratio <= 0.2


def test_rank_above_min_shape_is_clamped_with_a_warning():
    base, experts = make_models()
    with pytest.warns(UserWarning) as record:
        twin = TwinMerger(base, experts, rank=10, progress=False)
    messages = sorted(str(w.message) for w in record)
    assert messages == [
        "rank 10 is larger than min(shape) = 4 of b.weight (4, 12); clamped to 4",
        "rank 10 is larger than min(shape) = 9 of a.weight (12, 9); clamped to 9",
    ]
    assert twin.ranks == {"a.weight": 9, "b.weight": 4}


def test_bad_experts_name_the_key():
    base, experts = make_models()
    bad = dict(experts[1])
    bad["a.weight"] = torch.zeros(12, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"expert 1 key 'a.weight' has shape \(12, 8\)"):
        TwinMerger(base, [experts[0], bad], progress=False)
    missing = {k: v for k, v in experts[0].items() if k != "norm"}
    with pytest.raises(ValueError, match=r"expert 0 has no key 'norm'"):
        TwinMerger(base, [missing], progress=False)
    extra = dict(experts[0], extra=torch.zeros(1))
    with pytest.raises(ValueError, match=r"expert 0 has key 'extra'"):
        TwinMerger(base, [extra], progress=False)
    with pytest.raises(ValueError, match="empty"):
        TwinMerger(base, [], progress=False)
    with pytest.raises(ValueError, match="shared='nope'"):
        TwinMerger(base, experts, shared="nope", progress=False)
    with pytest.raises(ValueError, match="rank"):
        TwinMerger(base, experts, rank=0.0, progress=False)


def test_named_experts_and_modules():
    net = torch.nn.Linear(3, 2)
    other = torch.nn.Linear(3, 2)
    twin = TwinMerger(net, {"qa": other, "nli": net.state_dict()}, progress=False)
    assert twin.task_names == ("qa", "nli")


# ---- save / load --------------------------------------------------------------------------


def assert_same_merger(a: TwinMerger, b: TwinMerger) -> None:
    assert a.task_names == b.task_names and a.rank == b.rank
    assert list(a.shared_state) == list(b.shared_state)
    for key in a.shared_state:
        assert torch.equal(a.shared_state[key], b.shared_state[key])
        assert a.shared_state[key].dtype == b.shared_state[key].dtype
    assert set(a.factors) == set(b.factors) and set(a.dense_deltas) == set(b.dense_deltas)
    for key, (us, vs) in a.factors.items():
        assert torch.equal(us, b.factors[key][0]) and torch.equal(vs, b.factors[key][1])
    for key, d in a.dense_deltas.items():
        assert torch.equal(d, b.dense_deltas[key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    base, experts = make_models(dtype=dtype)
    twin = TwinMerger(base, {"x": experts[0], "y": experts[1]}, rank=0.3, progress=False)
    twin.save(tmp_path / "twin")
    loaded = TwinMerger.load(tmp_path / "twin")
    assert_same_merger(twin, loaded)
    manifest = json.loads((tmp_path / "twin" / "manifest.json").read_text())
    assert manifest["task_names"] == ["x", "y"] and manifest["rank"] == 0.3
    assert manifest["tensors"]["a.weight"] == {
        "shape": [12, 9],
        "dtype": str(dtype)[6:],
        "kind": "factors",
        "rank": 3,
    }
    assert manifest["tensors"]["steps"]["kind"] == "shared"
    assert load_router(tmp_path / "twin") is None


def test_save_handles_tied_weights_and_a_router(tmp_path):
    w = torch.randn(4, 4)
    base = {"emb": w, "head": w}  # one storage, two keys (tied weights)
    experts = [{"emb": w + 1, "head": w + 1}, {"emb": w - 1, "head": w - 1}]
    twin = TwinMerger(base, experts, progress=False)
    router = Router(6, 2).eval()
    twin.save(tmp_path / "t", router=router)
    assert_same_merger(twin, load_twin(tmp_path / "t"))
    loaded = load_router(tmp_path / "t")
    x = torch.randn(3, 6)
    torch.testing.assert_close(loaded(x), router(x), rtol=0, atol=0)


def test_interrupted_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    base, experts = make_models()
    twin = TwinMerger(base, experts, progress=False)
    real = safetensors.torch.save_file
    calls = []

    def failing(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        twin.save(tmp_path / "twin")
    assert os.listdir(tmp_path) == []

    # an existing save survives a failed overwrite untouched
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    twin.save(tmp_path / "twin")
    before = {p: (tmp_path / "twin" / p).read_bytes() for p in os.listdir(tmp_path / "twin")}
    calls.clear()
    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    other = TwinMerger(*make_models(seed=1), progress=False)
    with pytest.raises(OSError, match="disk full"):
        other.save(tmp_path / "twin")
    assert os.listdir(tmp_path) == ["twin"]
    assert {
        p: (tmp_path / "twin" / p).read_bytes() for p in os.listdir(tmp_path / "twin")
    } == before

    # a successful overwrite replaces it, and leaves no temporary directory
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    other.save(tmp_path / "twin")
    assert os.listdir(tmp_path) == ["twin"]
    assert_same_merger(other, TwinMerger.load(tmp_path / "twin"))


def test_save_refuses_to_replace_foreign_directories(tmp_path):
    twin = TwinMerger(*make_models(), progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="without a manifest.json"):
        twin.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="not a TwinMerger save"):
        TwinMerger.load(tmp_path / "mine")
