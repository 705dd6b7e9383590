"""The merge engine: parameter semantics, the planner, the registry, bad input, the CLI."""

from __future__ import annotations

import json
import time

import pytest
import safetensors.torch
import torch
import yaml

from fastmerge import engine
from fastmerge.cli import main
from fastmerge.engine.params import check_setting, evaluate
from fastmerge.engine.plan import layer_of, with_layer
from fastmerge.engine.registry import MergeMethod, register, unregister

LAYERS = 3


def tiny_model(path, seed, layers=LAYERS, vocab=8, tied=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(vocab, 4, generator=gen),
         "model.norm.weight": torch.randn(4, generator=gen)}  # fmt: skip
    if not tied:
        t["lm_head.weight"] = torch.randn(vocab, 4, generator=gen)
    for i in range(layers):
        t[f"model.layers.{i}.mlp.w"] = torch.randn(6, 4, generator=gen)
        t[f"model.layers.{i}.self_attn.q"] = torch.randn(4, 4, generator=gen)
    path.mkdir(parents=True)
    t = {k: v.to(dtype) for k, v in t.items()}
    safetensors.torch.save_file(t, path / "model.safetensors")
    config = {
        "model_type": "llama", "num_hidden_layers": layers, "vocab_size": vocab,
        "torch_dtype": str(dtype).removeprefix("torch."), "tie_word_embeddings": tied,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return t


@pytest.fixture
def three(tmp_path):
    models = {n: tiny_model(tmp_path / n, i) for i, n in enumerate(["base", "a", "b"])}
    return tmp_path, models


def write(tmp_path, config, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def output(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(f))
    return out


# ---- parameter semantics -------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, t, want",
    [
        (0.5, 0.3, 0.5),
        ([0.0, 1.0], 0.25, 0.25),
        ([0.0, 1.0, 0.0], 0.5, 1.0),
        ([0.0, 1.0, 0.0], 0.75, 0.5),
        ([2.0, 4.0], 1.0, 4.0),
        ("1e-1", 0.0, 0.1),
    ],
)
def test_gradients_interpolate_as_mergekit(setting, t, want):
    assert evaluate(setting, "model.layers.0.mlp.w", t, float) == pytest.approx(want)


def test_non_numeric_gradients_pick_an_element():
    assert evaluate([True, False, True], "x", 0.49, lambda v: v) is True
    assert evaluate([True, False, True], "x", 0.5, lambda v: v) is False


def test_filters_first_match_wins_then_default():
    setting = [{"filter": "mlp", "value": 1.0}, {"filter": "*", "value": 2.0}]
    assert evaluate(setting, "model.layers.0.mlp.w", 0, float) == 1.0
    assert evaluate(setting, "model.norm.weight", 0, float) == 2.0
    assert evaluate([{"filter": "mlp", "value": 1.0}], "lm_head", 0, float) is None
    assert evaluate({"filter": "q", "value": [0.0, 2.0]}, "self_attn.q", 0.5, float) == 1.0


@pytest.mark.parametrize(
    "setting, message",
    [
        ([], "empty list"),
        ([1.0, float("inf")], "gradient entry 1 is not finite"),
        ([{"value": 1.0, "colour": 2}], "unknown key 'colour'"),
        ([{"filter": 3, "value": 1.0}], "must be a string"),
        ([{"filter": "mlp"}], "needs a 'value'"),
        ([1.0, {"value": 1.0}], "mixing values"),
        ({"a": 1}, "unknown key 'a'"),
        (object(), "must be a value"),
    ],
)
def test_bad_settings_are_named(setting, message):
    with pytest.raises(engine.ConfigError, match=message) as info:
        check_setting(setting, "parameters.weight")
    assert str(info.value).startswith("parameters.weight")


def test_layer_names():
    assert layer_of("transformer.h.11.attn.c_attn.weight") == ("transformer.h", 11)
    assert layer_of("model.norm.weight") is None
    assert with_layer("model.layers.10.mlp.w", 2) == "model.layers.2.mlp.w"


# ---- planner ---------------------------------------------------------------------------


def test_plan_resolves_gradients_filters_and_precedence(three):
    tmp, _ = three
    cfg = engine.parse_config({
        "merge_method": "task_arithmetic",
        "base_model": str(tmp / "base"),
        "models": [
            {"model": str(tmp / "a"), "parameters": {"weight": [0.0, 1.0]}},
            {"model": str(tmp / "b")},
        ],
        "parameters": {"weight": [{"filter": "self_attn", "value": 0.5}, {"value": 2.0}],
                       "lambda": [1.0, 3.0]},
    })  # fmt: skip
    p = engine.plan(cfg)
    tasks = {t.name: t for t in p.tasks}
    mlp1 = tasks["model.layers.1.mlp.w"]
    assert mlp1.t == 0.5 and mlp1.shared["lambda"] == 2.0
    assert [q.get("weight") for q in mlp1.per_input] == [None, 0.5, 2.0]  # base: no weight
    assert tasks["model.layers.2.self_attn.q"].per_input[2]["weight"] == 0.5
    # outside the layers t = 0
    assert tasks["lm_head.weight"].shared["lambda"] == 1.0
    assert tasks["lm_head.weight"].per_input[1]["weight"] == 0.0
    text = p.describe()
    assert "weight[1]=0..1" in text and "lambda=1..3" in text and "x3" in text
    for c in p.checkpoints:
        c.close()


def test_blockwise_merge_equals_whole_tensor(three):
    tmp, _ = three
    for method in ("ties", "linear", "task_arithmetic"):
        raw = {"merge_method": method, "base_model": str(tmp / "base"),
               "models": [{"model": str(tmp / "a"), "parameters": {"weight": [0.3, 1.0]}},
                          {"model": str(tmp / "b"), "parameters": {"weight": 0.7}}],
               "parameters": {"density": 0.5} if method == "ties" else {}}  # fmt: skip
        engine.run(engine.parse_config(raw), tmp / f"{method}-whole")
        engine.run(engine.parse_config(raw), tmp / f"{method}-blocks", block_bytes=16)
        whole, blocks = output(tmp / f"{method}-whole"), output(tmp / f"{method}-blocks")
        assert sorted(whole) == sorted(blocks)
        for k in whole:
            assert torch.equal(whole[k], blocks[k]), (method, k)


def test_linear_includes_the_base_model(three):
    tmp, m = three
    raw = {"merge_method": "linear", "base_model": str(tmp / "base"),
           "models": [str(tmp / "a")], "parameters": {"weight": 1.0}}  # fmt: skip
    engine.run(engine.parse_config(raw), tmp / "out")
    got = output(tmp / "out")["model.norm.weight"]
    assert torch.allclose(got, (m["base"]["model.norm.weight"] + m["a"]["model.norm.weight"]) / 2)


def test_tied_lm_head_falls_back_to_the_embedding(tmp_path):
    a = tiny_model(tmp_path / "a", 1)
    t = tiny_model(tmp_path / "tied", 2, tied=True)
    raw = {"merge_method": "linear", "models": [str(tmp_path / "a"), str(tmp_path / "tied")]}
    engine.run(engine.parse_config(raw), tmp_path / "out")
    got = output(tmp_path / "out")["lm_head.weight"]
    assert torch.allclose(got, (a["lm_head.weight"] + t["model.embed_tokens.weight"]) / 2)


def test_slices_renumber_layers_and_update_config(three):
    tmp, m = three
    raw = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tmp / "a"), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(tmp / "b"), "layer_range": [1, 3]}]},
    ]}  # fmt: skip
    engine.run(engine.parse_config(raw), tmp / "out")
    got = output(tmp / "out")
    assert sorted(n for n in got if ".mlp." in n) == [f"model.layers.{i}.mlp.w" for i in range(4)]
    assert torch.equal(got["model.layers.2.mlp.w"], m["b"]["model.layers.1.mlp.w"])
    assert torch.equal(got["model.embed_tokens.weight"], m["a"]["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], m["b"]["lm_head.weight"])  # post: the last slice
    assert json.loads((tmp / "out" / "config.json").read_text())["num_hidden_layers"] == 4


def test_mixed_dtypes_are_merged_in_float32(tmp_path):
    a = tiny_model(tmp_path / "a", 1)
    h = tiny_model(tmp_path / "h", 2, dtype=torch.bfloat16)
    raw = {"merge_method": "linear", "models": [str(tmp_path / "a"), str(tmp_path / "h")],
           "out_dtype": "float32"}  # fmt: skip
    engine.run(engine.parse_config(raw), tmp_path / "out")
    got = output(tmp_path / "out")["model.layers.0.mlp.w"]
    want = (a["model.layers.0.mlp.w"] + h["model.layers.0.mlp.w"].float()) / 2
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-6, atol=0)


def test_model_card_and_extra_files(three, capsys):
    tmp, _ = three
    cfg = write(tmp, {"merge_method": "task_arithmetic", "base_model": str(tmp / "base"),
                      "models": [str(tmp / "a"), str(tmp / "b")]})  # fmt: skip
    code, out, err = cli(["merge", cfg, "--out", tmp / "out", "--write-model-card"], capsys)
    assert code == 0, err
    card = (tmp / "out" / "README.md").read_text()
    assert "task_arithmetic" in card and "merge_method: task_arithmetic" in card
    assert "read 0.00 GB at" in out  # the rate counts input bytes


def test_registered_method_plugs_in(three):
    tmp, m = three
    register(MergeMethod("first_input", "the first input", merge=lambda task, ts, s: ts[0]))
    try:
        raw = {"merge_method": "first_input", "models": [str(tmp / "b"), str(tmp / "a")]}
        engine.run(engine.parse_config(raw), tmp / "out")
        assert torch.equal(output(tmp / "out")["model.norm.weight"], m["b"]["model.norm.weight"])
    finally:
        unregister("first_input")
    with pytest.raises(ValueError, match="already registered"):
        register(engine.get_method("linear"))


# ---- the command line ------------------------------------------------------------------


def test_list_methods(capsys):
    code, out, _ = cli(["merge", "--list-methods"], capsys)
    assert code == 0
    for name in ("linear", "task_arithmetic", "ties", "dare_ties", "passthrough", "twin"):
        assert f"| `{name}` |" in out
    assert "`density` (non_base, float in (0, 1], default 1.0)" in out


def test_dry_run_prints_the_plan_and_writes_nothing(three, capsys):
    tmp, _ = three
    cfg = write(tmp, {"merge_method": "ties", "base_model": str(tmp / "base"),
                      "models": [{"model": str(tmp / "a"), "parameters": {"density": [0.2, 0.6]}},
                                 str(tmp / "b")]})  # fmt: skip
    before = sorted(p.name for p in tmp.iterdir())
    code, out, err = cli(["merge", cfg, "--dry-run"], capsys)
    assert code == 0, err
    assert "merge_method: ties" in out and "density[1]=0.2..0.6" in out
    assert sorted(p.name for p in tmp.iterdir()) == before


BAD = {
    "density out of range": ({"parameters": {"density": 1.5}},
                             "parameters.density: must be in (0, 1], got 1.5"),
    "gradient NaN": ({"parameters": {"weight": [0.1, float("nan")]}}, "not finite"),
    "global under a model": ({"models": [{"model": "A", "parameters": {"lambda": 2}}, "B"]},
                             "lambda is a global parameter"),
    "unknown parameter": ({"parameters": {"epsilon": 0.1}}, "unknown key 'epsilon'"),
    "dtype a list": ({"dtype": ["float32"]}, "unsupported dtype"),
    "method a list": ({"merge_method": ["ties"]}, "merge_method must be a method name"),
    "include a number": ({"include": 5}, "include must be a regex"),
    "models and slices": ({"slices": []}, "exactly one of 'models' and 'slices'"),
    "modules": ({"modules": {}}, "multi-module merges"),
    "layer range": ({"models": None, "slices": [{"sources": [
        {"model": "A", "layer_range": [0, 9]}, {"model": "BASE", "layer_range": [0, 9]}]}]},
        "beyond its 3 layers"),
    "uneven slice": ({"models": None, "slices": [{"sources": [
        {"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 3]}]}]},
        "same number of layers"),
    "base not in slice": ({"models": None, "slices": [{"sources": [
        {"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 2]}]}]},
        "is not among the sources of a slice"),
    "seed": ({"seed": "x"}, "seed must be an integer"),
    "not a mapping": (None, "must be a YAML mapping"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exit_2_one_line_nothing_written(three, capsys, case):
    tmp, _ = three
    changes, message = BAD[case]
    raw = {"merge_method": "ties", "base_model": "BASE", "models": ["A", "B"]}
    if changes is None:
        raw = ["not", "a", "mapping"]
    else:
        raw.update(changes)
        raw = {k: v for k, v in raw.items() if v is not None}
    text = yaml.safe_dump(raw, sort_keys=False)
    for key, name in (("BASE", "base"), ("A", "a"), ("B", "b")):
        text = text.replace(f" {key}\n", f" {tmp / name}\n")
    cfg = tmp / "bad.yaml"
    cfg.write_text(text)
    before = sorted(p.name for p in tmp.iterdir())
    code, _, err = cli(["merge", cfg, "--out", tmp / "out"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fastmerge merge: error"), err
    assert message in err, err
    assert sorted(p.name for p in tmp.iterdir()) == before


def test_vocabulary_mismatch_without_tokenizer_source_is_named(tmp_path, capsys):
    tiny_model(tmp_path / "a", 1, vocab=8)
    tiny_model(tmp_path / "b", 2, vocab=10)
    cfg = write(tmp_path, {"merge_method": "linear", "models": [str(tmp_path / "a"),
                                                                 str(tmp_path / "b")]})  # fmt: skip
    code, _, err = cli(["merge", cfg, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "vocabularies differ: set tokenizer_source" in err, err


def test_wrong_model_count_for_the_method(three, capsys):
    tmp, _ = three
    cfg = write(tmp, {"merge_method": "passthrough", "models": [str(tmp / "a"), str(tmp / "b")]})
    code, _, err = cli(["merge", cfg, "--out", tmp / "out"], capsys)
    assert code == 2 and "takes exactly 1 model(s) per tensor, got 2" in err, err


@pytest.mark.parametrize(
    "key",
    ["seed", "base_model", "merge_method", "dtype", "include", "tokenizer_source", "tokenizer",
     "chat_template"],
)  # fmt: skip
def test_yaml_alias_bomb_is_one_line_and_fast(tmp_path, capsys, key):
    # nine levels of nine aliases: 9^9 strings if anything expanded the value
    levels = ["&l0 [" + ", ".join(["x"] * 9) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    text = f"merge_method: linear\nmodels: [x, y]\n{key}: [{', '.join(levels)}]\n"
    if key == "merge_method":
        text = f"models: [x, y]\nmerge_method: [{', '.join(levels)}]\n"
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(text)
    start = time.perf_counter()
    code, _, err = cli(["merge", cfg, "--out", tmp_path / "out"], capsys)
    assert time.perf_counter() - start < 10  # no expansion of the 9^9-entry value
    assert code == 2 and err.count("\n") == 1 and len(err) < 500, err


@pytest.mark.parametrize(
    "device, message",
    [("cuda", "--device cuda: "), ("cuda:7", "--device cuda:7: "), ("mps", "is not supported"),
     ("gpu!", "is not a device")],
)  # fmt: skip
def test_bad_device_is_one_line(three, capsys, device, message):
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    tmp, _ = three
    cfg = write(tmp, {"merge_method": "linear", "models": [str(tmp / "a"), str(tmp / "b")]})
    code, _, err = cli(["merge", cfg, "--out", tmp / "out", "--device", device], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp / "out").exists()


def test_output_that_is_an_input_is_refused(three, capsys):
    tmp, m = three
    cfg = write(tmp, {"merge_method": "linear", "models": [str(tmp / "a"), str(tmp / "b")]})
    for out in (tmp / "a", tmp):
        code, _, err = cli(["merge", cfg, "--out", out, "--overwrite"], capsys)
        assert code == 2 and "is (or holds) the input model" in err, err
    assert torch.equal(output(tmp / "a")["model.norm.weight"], m["a"]["model.norm.weight"])


def test_tokenizer_source_that_does_not_exist(three, capsys):
    tmp, _ = three
    cfg = write(tmp, {"merge_method": "linear", "models": [str(tmp / "a"), str(tmp / "b")],
                      "tokenizer_source": "/nonexistent/tokenizer"})  # fmt: skip
    code, _, err = cli(["merge", cfg, "--out", tmp / "out"], capsys)
    assert code == 2 and "tokenizer_source: '/nonexistent/tokenizer' is neither" in err, err


@pytest.mark.parametrize("size", ["inf", "1e400", "nan", "-5", "0", "lots"])
def test_bad_shard_size_is_one_line(three, capsys, size):
    tmp, _ = three
    cfg = write(tmp, {"merge_method": "linear", "models": [str(tmp / "a"), str(tmp / "b")]})
    code, _, err = cli(["merge", cfg, "--out", tmp / "out", "--shard-size", size], capsys)
    assert code == 2 and "--shard-size" in err and err.count("\n") == 1, err


def test_python_dash_m_fastmerge(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fastmerge", "merge", "--list-methods"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0 and "| `linear` |" in done.stdout, done.stderr
