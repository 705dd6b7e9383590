"""``fastmerge merge`` end to end on tiny checkpoints, and every bad-input case."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
import yaml

import fastmerge.merge as fm
from fastmerge import io
from fastmerge.cli import main
from fastmerge.engine import ConfigError, parse_config

# 10 x 10 and 4 x 5: density x numel is an integer, so floor and ceil keep the same count
SHAPES = {"embed.weight": (10, 10), "layer.0.w": (4, 5), "layer.0.norm": (10,), "step": ()}


def model_tensors(seed: int, base=None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        if name == "step":
            out[name] = torch.tensor(seed, dtype=torch.int64)
            continue
        noise = torch.randn(shape, generator=gen)
        out[name] = noise if base is None else base[name] + 0.1 * noise
    return out


def save_hf_dir(path, tensors, sharded=False) -> None:
    path.mkdir(parents=True)
    if sharded:
        names = list(tensors)
        files = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
        for f in set(files.values()):
            safetensors.torch.save_file({n: tensors[n] for n in names if files[n] == f}, path / f)
        index = {"metadata": {}, "weight_map": files}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        safetensors.torch.save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    (path / "tokenizer_config.json").write_text("{}")


@pytest.fixture
def models(tmp_path):
    """A base (sharded) and three experts as Hugging Face directories, and the tensors."""
    base = model_tensors(0)
    experts = [model_tensors(i, base) for i in (1, 2, 3)]
    save_hf_dir(tmp_path / "base", base, sharded=True)
    for i, e in enumerate(experts):
        save_hf_dir(tmp_path / f"e{i}", e)
    return tmp_path, base, experts


def write_config(tmp_path, method, params=None, shared=None, extra=None, name="cfg.yaml"):
    experts = []
    for i in range(3):
        entry = {"model": str(tmp_path / f"e{i}")}
        if params is not None:
            entry["parameters"] = params[i]
        experts.append(entry)
    cfg = {"merge_method": method, "base_model": str(tmp_path / "base"), "models": experts}
    if method == "linear":
        del cfg["base_model"]
    if shared:
        cfg["parameters"] = shared
    cfg.update(extra or {})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def merged(out):
    return {k: v for k, v in io.open_checkpoint(out).items()}


def assert_same(got, expected, exact=True):
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        if exact:
            assert torch.equal(got[k], expected[k]), k
        else:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7)


def test_ties_matches_fastmerge_merge_and_writes_a_model_dir(models, capsys):
    tmp, base, experts = models
    cfg = write_config(tmp, "ties", params=[{"weight": 1.0, "density": 0.3}] * 3)
    out = tmp / "out"
    code, stdout, err = run(["merge", str(cfg), "--out", str(out), "--shard-size", "300B"], capsys)
    assert code == 0, err
    assert_same(merged(out), fm.ties(base, experts, density=0.3))
    names = sorted(os.listdir(out))
    assert "config.json" in names and "tokenizer_config.json" in names
    assert "fastmerge_config.yaml" in names and io.INDEX_NAME in names
    assert sum(n.endswith(".safetensors") for n in names) >= 2
    assert yaml.safe_load((out / "fastmerge_config.yaml").read_text())["merge_method"] == "ties"
    assert "merged 4 tensors" in stdout or code == 0


@pytest.mark.parametrize(
    "method, shared, expected",
    [
        ("linear", None, lambda b, es: fm.average(es)),
        ("linear", {"normalize": True}, lambda b, es: fm.average(es, weights=[1, 2, 3])),
        ("task_arithmetic", {"lambda": 0.5}, lambda b, es: fm.task_arithmetic(b, es, scale=0.5)),
    ],
)  # fmt: skip
def test_methods_match_fastmerge_merge(models, capsys, method, shared, expected):
    tmp, base, experts = models
    weights = [1, 2, 3] if shared == {"normalize": True} and method == "linear" else [1, 1, 1]
    params = [{"weight": w} for w in weights]
    if method.startswith("dare"):
        params = [dict(p, density=0.5) for p in params]
    cfg = write_config(tmp, method, params=params, shared=shared, extra={"seed": 7})
    code, _, err = run(["merge", str(cfg), "--out", str(tmp / "out"), "--quiet"], capsys)
    assert code == 0, err
    assert_same(merged(tmp / "out"), expected(base, experts), exact=False)


def weighted_ties_reference(base, experts, weights, densities, normalize, lam):
    """TIES with per-model weights and densities, written independently (float64)."""
    out = {}
    for k, b in base.items():
        if not b.dtype.is_floating_point:
            out[k] = b
            continue
        deltas = []
        for e, w, d in zip(experts, weights, densities):
            tau = (e[k] - b).double()
            keep = max(1, int(d * tau.numel()))
            thr = tau.abs().flatten().sort(descending=True).values[keep - 1]
            deltas.append(w * torch.where(tau.abs() >= thr, tau, 0.0))
        stack = torch.stack(deltas)
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (sign != 0)
        mixed = (stack * agree).sum(0)
        if normalize:
            wsum = (
                torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * b.dim()) * agree
            ).sum(0)
            mixed = mixed / torch.where(wsum == 0, torch.ones_like(wsum), wsum)
        out[k] = (b.double() + lam * mixed).to(b.dtype)
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_weighted_ties_with_per_model_density(models, capsys, normalize):
    tmp, base, experts = models
    weights, densities = [1.0, 0.5, 2.0], [0.3, 0.5, 0.8]
    params = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    cfg = write_config(tmp, "ties", params=params, shared={"normalize": normalize, "lambda": 0.7})
    code, _, err = run(["merge", str(cfg), "--out", str(tmp / "out"), "--quiet"], capsys)
    assert code == 0, err
    expected = weighted_ties_reference(base, experts, weights, densities, normalize, 0.7)
    assert_same(merged(tmp / "out"), expected, exact=False)


def test_output_dtype_and_config_json(models, capsys):
    tmp, base, experts = models
    cfg = write_config(tmp, "task_arithmetic", extra={"dtype": "bfloat16"})
    code, _, err = run(["merge", str(cfg), "--out", str(tmp / "out"), "--quiet"], capsys)
    assert code == 0, err
    got = merged(tmp / "out")
    assert got["embed.weight"].dtype == torch.bfloat16 and got["step"].dtype == torch.int64

    # as mergekit: the inputs are cast to `dtype` first, then merged (in float32 here)
    def half(sd):
        return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}

    b, es = half(base)["embed.weight"].float(), [half(e)["embed.weight"].float() for e in experts]
    expected = (b + sum(e - b for e in es)).to(torch.bfloat16)
    # within one bfloat16 rounding step (the float32 sum's order may differ)
    torch.testing.assert_close(got["embed.weight"], expected, rtol=2**-7, atol=2**-9)
    assert json.loads((tmp / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_include_exclude_copy_the_base(models, capsys):
    tmp, base, experts = models
    cfg = write_config(tmp, "task_arithmetic", extra={"exclude": "^embed"})
    code, _, err = run(["merge", str(cfg), "--out", str(tmp / "out"), "--quiet"], capsys)
    assert code == 0, err
    got = merged(tmp / "out")
    assert torch.equal(got["embed.weight"], base["embed.weight"])
    assert not torch.equal(got["layer.0.w"], base["layer.0.w"])


def corrupt(tmp):
    path = tmp / "e1" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"#" + data[9:])


def truncate(tmp):
    path = tmp / "e1" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-16])


def retype(tmp, dtype=None, shape=None, drop=None):
    t = model_tensors(2, model_tensors(0))
    if dtype is not None:
        t["layer.0.w"] = t["layer.0.w"].to(dtype)
    if shape is not None:
        t["layer.0.w"] = torch.zeros(shape)
    if drop is not None:
        del t[drop]
    safetensors.torch.save_file(t, tmp / "e1" / "model.safetensors")


BAD_INPUTS = {
    "missing model": (lambda tmp: os.remove(tmp / "e1" / "model.safetensors"), "e1"),
    "missing dir": (lambda tmp: os.rename(tmp / "e2", tmp / "gone"), "e2"),
    "corrupt header": (corrupt, "model.safetensors: corrupt header"),
    "truncated": (truncate, "model.safetensors: truncated"),
    "shape differs": (lambda tmp: retype(tmp, shape=(5, 4)), "'layer.0.w' is torch.float32 [5, 4]"),
    "missing key": (lambda tmp: retype(tmp, drop="layer.0.norm"), "no tensor 'layer.0.norm'"),
    "output exists": (lambda tmp: (tmp / "out").mkdir(), "exists (pass --overwrite"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exit_2_one_line_nothing_written(models, capsys, case):
    tmp, _, _ = models
    spoil, message = BAD_INPUTS[case]
    cfg = write_config(tmp, "ties", params=[{"weight": 1.0, "density": 0.3}] * 3)
    spoil(tmp)
    before = sorted(os.listdir(tmp))
    code, out, err = run(["merge", str(cfg), "--out", str(tmp / "out"), "--quiet"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fastmerge merge: error") and message in err, err
    assert sorted(os.listdir(tmp)) == before  # no output, no temporary directory


@pytest.mark.parametrize(
    "config, message",
    [
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}], "colour": 1},
         "unknown key 'colour'; valid keys: merge_method, models"),
        ({"merge_method": "model_soup_v9", "models": [{"model": "x"}]},
         "merge_method 'model_soup_v9' is not supported"),
        ({"merge_method": "slerp", "models": [{"model": "x"}, {"model": "y"}]},
         "merge_method slerp needs a base_model"),
        ({"merge_method": "ties", "base_model": "b",
          "models": [{"model": "x"}], "parameters": {"t": 0.5}}, "unknown key 't'"),
        ({"merge_method": "ties", "models": [{"model": "x"}]}, "needs a base_model"),
        ({"merge_method": "ties", "base_model": "b",
          "models": [{"model": "x", "parameters": {"density": [0.1, float("nan")]}}]},
         "density: gradient entry 1 is not finite"),
        ({"merge_method": "ties", "base_model": "b",
          "models": [{"model": "x", "parameters": {"epsilon": 0.1}}]}, "unknown key 'epsilon'"),
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}],
          "modules": {}}, "multi-module merges"),
        ({"merge_method": "linear", "models": [{"model": "x"}], "dtype": "int3"},
         "unsupported dtype"),
    ],
)  # fmt: skip
def test_config_errors(tmp_path, capsys, config, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _, err = run(["merge", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message.split(";")[0] in err and err.count("\n") == 1


def test_unreadable_yaml_and_missing_config(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("models: [unclosed")
    code, _, err = run(["merge", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "not valid YAML" in err and err.count("\n") == 1
    code, _, err = run(["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no such config file" in err


def test_interrupted_merge_leaves_nothing(models, capsys, monkeypatch):
    tmp, _, _ = models
    cfg = write_config(tmp, "task_arithmetic")
    calls = []
    real = io.ShardedWriter.write

    def failing(self, name, tensor):
        calls.append(name)
        if len(calls) == 2:
            raise OSError("No space left on device")
        real(self, name, tensor)

    monkeypatch.setattr(io.ShardedWriter, "write", failing)
    before = sorted(os.listdir(tmp))
    code, _, err = run(["merge", str(cfg), "--out", str(tmp / "out"), "--quiet"], capsys)
    assert code == 2 and "No space left on device" in err
    assert sorted(os.listdir(tmp)) == before


def test_pickle_models_need_allow_pickle(tmp_path, capsys):
    base = model_tensors(0)
    experts = [model_tensors(i, base) for i in (1, 2, 3)]
    for name, t in [("base", base)] + [(f"e{i}", e) for i, e in enumerate(experts)]:
        (tmp_path / name).mkdir()
        torch.save(t, tmp_path / name / "pytorch_model.bin")
    cfg = write_config(tmp_path, "task_arithmetic")
    code, _, err = run(["merge", str(cfg), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "pickle checkpoint refused" in err and "--allow-pickle" in err
    assert not (tmp_path / "out").exists()
    args = ["merge", str(cfg), "--out", str(tmp_path / "out"), "--allow-pickle", "--quiet"]
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert_same(merged(tmp_path / "out"), fm.task_arithmetic(base, experts), exact=False)


def test_summary_line_reports_size_and_memory(models, capsys):
    tmp, _, _ = models
    cfg = write_config(tmp, "task_arithmetic")
    code, out, err = run(["merge", str(cfg), "--out", str(tmp / "out")], capsys)
    assert code == 0, err
    assert "merged 4 tensors" in out and "GB/s" in out and "peak RSS" in out


@pytest.mark.parametrize(
    "method, params, shared",
    [
        ("ties", [{"weight": 1.0, "density": 0.3}] * 3, None),
        ("ties", [{"weight": w, "density": d} for w, d in [(1, 0.3), (0.5, 0.5), (2, 0.8)]],
         {"normalize": False}),
        ("task_arithmetic", [{"weight": 1.0}] * 3, {"lambda": 0.3}),
        ("linear", [{"weight": w} for w in (1, 2, 3)], None),
        ("dare_ties", [{"weight": 1.0, "density": 0.5}] * 3, None),
    ],
)  # fmt: skip
def test_large_tensors_merged_in_row_blocks_equal_whole_merges(models, method, params, shared):
    from fastmerge.engine import run as run_merge

    tmp, _, _ = models
    cfg = write_config(tmp, method, params=params, shared=shared)
    run_merge(cfg, tmp / "whole")
    run_merge(cfg, tmp / "blocks", block_bytes=50)  # 400-byte embedding: blocks of 1 row
    whole, blocks = merged(tmp / "whole"), merged(tmp / "blocks")
    assert_same(blocks, whole)
    assert not torch.equal(whole["embed.weight"], model_tensors(0)["embed.weight"])


def test_read_rows_and_write_rows(tmp_path):
    t = torch.arange(24.0).reshape(6, 4)
    with io.ShardedWriter(tmp_path / "o", [io.TensorSpec("t", t.dtype, (6, 4))]) as writer:
        writer.write_rows("t", t[:1])
        with pytest.raises(ValueError, match="do not fit"):
            writer.write_rows("t", t[1:3, :2])
        writer.write_rows("t", t[1:5])
        with pytest.raises(ValueError, match="more than 6 rows"):
            writer.write_rows("t", t[:3])
        writer.write_rows("t", t[5:])
    ckpt = io.open_checkpoint(tmp_path / "o")
    assert torch.equal(ckpt["t"], t)
    assert torch.equal(ckpt.read_rows("t", 2, 5), t[2:5])
    assert ckpt.read_rows("t", 3, 3).shape == (0, 4)
    with pytest.raises(IndexError):
        ckpt.read_rows("t", 4, 7)


@pytest.mark.parametrize(
    "method, shared, experts, message",
    [
        ("della", {"density": 0.5, "epsilon": 0.6}, 3,
         "della: epsilon 0.6 with density 0.5 makes a keep probability leave (0, 1)"),
        ("slerp", {"t": [0.0, 1.5]}, 1, "parameters.t: must be in [0, 1], got 1.5"),
        ("slerp", {"t": 0.5}, 2, "merge_method slerp takes exactly 2 model(s) per tensor, got 3"),
        ("nuslerp", None, 3, "nuslerp takes 2 to 3 model(s) per tensor, got 4"),
        ("model_stock", None, 1, "model_stock takes at least 3 model(s) per tensor, got 2"),
        ("nearswap", {"t": -0.1}, 1, "parameters.t: must be in [0, inf), got -0.1"),
        ("ties", {"zero_sum": "nope"}, 3, "zero_sum must be one of positive, drop, got 'nope'"),
    ],
)  # fmt: skip
def test_bad_method_input_is_refused(models, capsys, method, shared, experts, message):
    """One line naming the method, the parameter and the tensor group; exit 2; no output."""
    tmp, _, _ = models
    cfg = yaml.safe_load(write_config(tmp, method, shared=shared).read_text())
    cfg["models"] = cfg["models"][:experts]
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run(["merge", str(path), "--out", str(tmp / "out")], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert "tensor" in err or "slices" in err or "models" in err
    assert not (tmp / "out").exists()


def test_base_listed_among_models_is_not_an_expert(models, capsys, monkeypatch):
    tmp, base, experts = models
    monkeypatch.chdir(tmp)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "./base"}] + [{"model": f"e{i}"} for i in range(3)],
        "parameters": {"normalize": True},
    }
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run(["merge", "cfg.yaml", "--out", "out", "--quiet"], capsys)
    assert code == 0, err
    expected = fm.task_arithmetic(base, experts, scale=1 / 3)
    assert_same(merged(tmp / "out"), expected, exact=False)
