"""PEFT LoRA adapters: load_adapter's validation and deltas against PEFT's own merge, and
``model: base+adapter`` as a ``fastmerge merge`` input (against plain W + scale B A and
against mergekit 0.1.5 on the same configuration)."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fastmerge import engine
from fastmerge.engine.errors import ConfigError
from fastmerge.io import CheckpointError, open_checkpoint
from fastmerge.lora import LoraError, adapt_checkpoint, extract_lora, load_adapter

from .conftest import build_base


def _write(d: Path, config: dict, tensors: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def _factors(out=6, inp=5, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)


def test_delta_is_scale_b_a_with_patterns_and_rslora(tmp_path):
    a, b = _factors()
    a2, b2 = _factors(r=3, seed=1)
    keys = {
        "base_model.model.x.fc.lora_A.weight": a,
        "base_model.model.x.fc.lora_B.weight": b,
        "base_model.model.x.up.lora_A.weight": a2,
        "base_model.model.x.up.lora_B.weight": b2,
    }
    cfg = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 8,
        "rank_pattern": {"up": 3},
        "alpha_pattern": {"up": 6},
    }
    adapter = load_adapter(_write(tmp_path / "plain", cfg, keys))
    torch.testing.assert_close(adapter.delta("x.fc"), 4.0 * b @ a)
    torch.testing.assert_close(adapter.delta("x.up"), 2.0 * b2 @ a2)
    rs = load_adapter(_write(tmp_path / "rs", {**cfg, "use_rslora": True}, keys))
    torch.testing.assert_close(rs.delta("x.fc"), 8.0 / 2**0.5 * b @ a)
    w = torch.randn(6, 5)
    torch.testing.assert_close(adapter.apply("x.fc.weight", w), w + 4.0 * b @ a)
    torch.testing.assert_close(
        adapter.apply_rows("x.fc.weight", w[2:4], 2, 4), (w + 4 * b @ a)[2:4]
    )
    assert adapter.apply("x.other.weight", w) is w


def test_embedding_and_fan_in_fan_out_layouts(tmp_path):
    a, b = _factors(out=4, inp=7)  # embedding: A (r, vocab 7), B (dim 4, r)
    keys = {"base_model.model.emb.lora_embedding_A": a, "base_model.model.emb.lora_embedding_B": b}
    adapter = load_adapter(
        _write(tmp_path / "e", {"peft_type": "LORA", "r": 2, "lora_alpha": 2}, keys)
    )
    torch.testing.assert_close(adapter.delta("emb"), (b @ a).T)
    w = torch.randn(7, 4)
    torch.testing.assert_close(adapter.apply_rows("emb.weight", w[3:6], 3, 6), (w + (b @ a).T)[3:6])


def test_deltas_equal_peft_merge_and_unload(tmp_path):
    peft = pytest.importorskip("peft")
    base = build_base(tmp_path / "base")
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=["q_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"down_proj": 3},
    )
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # PEFT initialises B (or the embedding's A) to zero
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload().state_dict()
    ckpt = adapt_checkpoint(open_checkpoint(tmp_path / "base"), tmp_path / "adapter")
    changed = 0
    for name in ckpt:
        torch.testing.assert_close(ckpt[name], merged[name], rtol=1e-5, atol=1e-6)
        changed += not torch.equal(ckpt[name], base.state_dict()[name])
    assert changed == 2 * 2 + 1  # q_proj, down_proj per layer, embed_tokens


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: (d / "adapter_config.json").unlink(), "not a PEFT adapter directory"),
        (lambda d: _edit_config(d, peft_type="IA3"), "peft_type is 'IA3'; only LoRA"),
        (lambda d: _edit_config(d, use_dora=True), "DoRA"),
        (lambda d: _edit_config(d, r=3), r"module 'm\.fc': the factors have rank 2 but .* r = 3"),
        (lambda d: _edit_tensors(d, drop="lora_B"), r"module 'm\.fc' has .* but no lora_B"),
        (lambda d: _edit_tensors(d, rename="model.fc"), "does not start with 'base_model.model.'"),
        (
            lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"),
            "only the pickle adapter_model.bin",
        ),
        (lambda d: (d / "adapter_config.json").write_text("{nope"), "not valid JSON"),
    ],
)
def test_bad_adapters_are_refused(tmp_path, mutate, match):
    a, b = _factors()
    d = _write(
        tmp_path / "ad",
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2},
        {"base_model.model.m.fc.lora_A.weight": a, "base_model.model.m.fc.lora_B.weight": b},
    )
    mutate(d)
    with pytest.raises(LoraError, match=match):
        load_adapter(d)


def _edit_config(d: Path, **changes) -> None:
    f = d / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def _edit_tensors(d: Path, drop: str = "", rename: str = "") -> None:
    f = d / "adapter_model.safetensors"
    t = load_file(f)
    t = {k: v for k, v in t.items() if drop not in k} if drop else t
    if rename:
        t = {k.replace("base_model.model.m.fc", rename): v for k, v in t.items()}
    save_file(t, str(f))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """base, other (another model of the same architecture), ft, and the rank-8 adapter of
    ft - base, under one directory."""
    root = tmp_path_factory.mktemp("adapter-inputs")
    base = build_base(root / "base")
    build_base(root / "other", seed=5)
    from .conftest import fine_tune

    fine_tune(base, root / "ft")
    extract_lora(root / "base", root / "ft", root / "adapter", rank=8, progress=False)
    return root


def _merged(out: Path) -> dict[str, torch.Tensor]:
    found = {}
    for f in sorted(out.glob("*.safetensors")):
        found.update(load_file(f))
    return found


@pytest.mark.parametrize("block_bytes", [None, 1024])  # whole tensors, and row blocks
def test_base_plus_adapter_as_merge_input_equals_base_plus_delta(inputs, tmp_path, block_bytes):
    cfg = engine.parse_config(
        {
            "merge_method": "linear",
            "models": [
                {
                    "model": f"{inputs / 'base'}+{inputs / 'adapter'}",
                    "parameters": {"weight": 0.75},
                },
                {"model": str(inputs / "other"), "parameters": {"weight": 0.25}},
            ],
            "dtype": "float32",
        }
    )
    kwargs = {} if block_bytes is None else {"block_bytes": block_bytes}
    engine.run(cfg, tmp_path / "out", **kwargs)
    got = _merged(tmp_path / "out")
    base, other = (
        load_file(inputs / "base" / "model.safetensors"),
        load_file(inputs / "other" / "model.safetensors"),
    )
    adapter = load_adapter(inputs / "adapter")
    assert set(got) == set(base)
    for name, w in base.items():
        module = name.removesuffix(".weight")
        expected = w + adapter.delta(module) if module in adapter.modules else w
        torch.testing.assert_close(
            got[name], 0.75 * expected + 0.25 * other[name], rtol=1e-6, atol=1e-6, msg=name
        )


def test_merge_input_that_is_not_an_adapter(inputs, tmp_path):
    cfg = engine.parse_config(
        {
            "merge_method": "linear",
            "models": [
                {"model": f"{inputs / 'base'}+{inputs / 'other'}"},
                {"model": str(inputs / "other")},
            ],
        }
    )
    with pytest.raises(LoraError, match=r"models\[0\]\.model: .*not a PEFT adapter directory"):
        engine.run(cfg, tmp_path / "out")
    bigger = build_base(tmp_path / "bigger", intermediate_size=128)
    del bigger
    cfg = engine.parse_config(
        {
            "merge_method": "linear",
            "models": [
                {"model": f"{tmp_path / 'bigger'}+{inputs / 'adapter'}"},
                {"model": str(inputs / "other")},
            ],
        }
    )
    with pytest.raises(LoraError, match=r"module 'model\.layers\.0\.mlp\.\w+_proj': the adapter's"):
        engine.run(cfg, tmp_path / "out")
    cfg = engine.parse_config(
        {
            "merge_method": "linear",
            "models": [
                {"model": f"{inputs / 'base'}+{tmp_path / 'missing'}"},
                {"model": str(inputs / "other")},
            ],
        }
    )
    with pytest.raises(CheckpointError, match="local model path does not exist"):
        engine.run(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    cfg = engine.parse_config(
        {
            "merge_method": "linear",
            "models": [
                {"model": f"{inputs / 'base'}+{inputs / 'adapter'}"},
                {"model": str(inputs / "other")},
            ],
        }
    )
    with pytest.raises(ConfigError, match="is \\(or holds\\) the input model"):
        engine.run(cfg, inputs / "adapter", overwrite=True)  # would replace the adapter
    assert load_adapter(inputs / "adapter").modules


def test_mergekit_gives_the_same_tensors_for_base_plus_adapter(inputs, tmp_path):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = {
        "merge_method": "linear",
        "models": [
            {"model": "./base+./adapter", "parameters": {"weight": 0.6}},
            {"model": "./other", "parameters": {"weight": 0.4}},
        ],
        "dtype": "float32",
    }
    path = tmp_path / "lora.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(inputs)
    try:
        LoaderCache().loaders.clear()
        options = MergeOptions(
            copy_tokenizer=False, quiet=True, lora_merge_cache=str(tmp_path / "cache")
        )
        run_merge(
            MergeConfiguration.model_validate(config), str(tmp_path / "theirs"), options=options
        )
        engine.run(path, tmp_path / "ours")
    finally:
        os.chdir(cwd)
    ours, theirs = _merged(tmp_path / "ours"), _merged(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        rel = (ours[k].double() - v.double()).abs().max() / v.double().abs().max()
        assert rel <= 1e-6, f"{k}: relative difference {rel.item():.3g}"
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
