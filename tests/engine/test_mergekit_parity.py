"""`fastmerge merge` gives mergekit 0.1.5's tensors on tiny LLaMA checkpoints.

mergekit is the oracle (installed for the tests only). Each case writes one YAML, runs
``mergekit-yaml`` in a subprocess and :func:`fastmerge.engine.run` in this process on the
same files, and compares every tensor (float32, relative difference <= 1e-6) and the
config.json entries the merge changes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fastmerge import engine

MERGEKIT = shutil.which("mergekit-yaml", path=os.path.dirname(sys.executable)) or shutil.which(
    "mergekit-yaml"
)
pytestmark = pytest.mark.skipif(
    MERGEKIT is None, reason="mergekit (the test oracle) is not installed"
)

LAYERS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """base, a, b (float32) and half (bfloat16) LLaMA checkpoints of 4 layers."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False,
    )  # fmt: skip
    for i, name in enumerate(["base", "a", "b", "half"]):
        torch.manual_seed(i)
        model = transformers.LlamaForCausalLM(cfg)
        if name == "half":
            model = model.to(torch.bfloat16)
        model.save_pretrained(root / name, safe_serialization=True)
    return root


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_both(root: Path, config: dict, name: str) -> tuple[Path, Path]:
    """mergekit's and fastmerge's outputs of `config` (model paths relative to `root`)."""
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    ours, theirs = root / f"{name}-fastmerge", root / f"{name}-mergekit"
    for d in (ours, theirs):
        shutil.rmtree(d, ignore_errors=True)
    cwd = os.getcwd()
    os.chdir(root)  # relative model paths, as both tools read them
    try:
        run_mergekit(path, theirs)
        engine.run(path, ours)
    finally:
        os.chdir(cwd)
    return ours, theirs


def run_mergekit(config: Path, out: Path) -> None:
    """mergekit's merge of `config`, in this process when mergekit imports here (it
    is much faster than a subprocess per case), else with its command line."""
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.io.tasks import LoaderCache
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
    except ImportError:
        done = subprocess.run([MERGEKIT, str(config), str(out), "--no-copy-tokenizer"],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return
    LoaderCache().loaders.clear()  # its cache is keyed by the (relative) model paths
    merge_config = MergeConfiguration.model_validate(yaml.safe_load(config.read_text()))
    run_merge(merge_config, str(out), options=MergeOptions(copy_tokenizer=False, quiet=True))


def assert_same_tensors(ours: Path, theirs: Path, tol: float = 1e-6) -> None:
    a, b = _tensors(ours), _tensors(theirs)
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].shape == b[k].shape, k
        assert a[k].dtype == b[k].dtype, k
        x, y = a[k].double(), b[k].double()
        rel = (x - y).abs().max() / y.abs().max().clamp_min(1e-30)
        assert rel <= tol, f"{k}: relative difference {rel.item():.3g}"


def test_linear_with_gradients_and_filters(models):
    config = {
        "merge_method": "linear",
        "models": [
            {"model": "./a", "parameters": {"weight": [0.2, 1.0, 0.4]}},
            {"model": "./b", "parameters": {"weight": [
                {"filter": "mlp", "value": [1.0, 0.0]},
                {"filter": "self_attn", "value": 0.3},
                {"value": 0.7},
            ]}},
            {"model": "./base", "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }  # fmt: skip
    assert_same_tensors(*run_both(models, config, "linear"))


def test_linear_unnormalized_with_top_level_gradient(models):
    config = {
        "merge_method": "linear",
        "models": [{"model": "./a"}, {"model": "./b"}],
        "parameters": {"weight": [0.0, 0.25, 1.0], "normalize": False},
        "dtype": "float32",
    }
    assert_same_tensors(*run_both(models, config, "linear_plain"))


def test_task_arithmetic_with_gradients_and_filters(models):
    config = {
        "merge_method": "task_arithmetic",
        "base_model": "./base",
        "models": [
            {"model": "./a", "parameters": {"weight": [0.2, 0.8]}},
            {"model": "./b", "parameters": {"weight": [
                {"filter": "self_attn", "value": 0.5},
                {"value": [1.0, 0.0, 0.5]},
            ]}},
        ],
        "parameters": {"lambda": [0.9, 1.1], "normalize": True},
        "dtype": "float32",
    }  # fmt: skip
    assert_same_tensors(*run_both(models, config, "task_arithmetic"))


def test_passthrough_slices_stack_layers(models):
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "./a", "layer_range": [0, 4]}]},
            {"sources": [{"model": "./b", "layer_range": [2, 4], "parameters": {"scale": 0.5}}]},
        ],
        "dtype": "float32",
    }
    ours, theirs = run_both(models, config, "passthrough")
    assert_same_tensors(ours, theirs)
    for d in (ours, theirs):
        assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 6
    got = _tensors(ours)
    b = _tensors(models / "b")
    assert torch.equal(
        got["model.layers.4.mlp.up_proj.weight"], 0.5 * b["model.layers.2.mlp.up_proj.weight"]
    )


def test_linear_slices_with_per_slice_gradients(models):
    config = {
        "merge_method": "linear",
        "slices": [
            {"sources": [
                {"model": "./a", "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.0]}},
                {"model": "./b", "layer_range": [1, 3]},
            ], "parameters": {"weight": 0.5}},
            {"sources": [
                {"model": "./b", "layer_range": [1, 4], "parameters": {"weight": [0.1, 0.9]}},
                {"model": "./base", "layer_range": [0, 3]},
            ]},
        ],
        "parameters": {"weight": 1.0},
        "dtype": "float32",
    }  # fmt: skip
    ours, theirs = run_both(models, config, "linear_slices")
    assert_same_tensors(ours, theirs)
    assert json.loads((ours / "config.json").read_text())["num_hidden_layers"] == 5


@pytest.mark.parametrize("out_dtype", [None, "bfloat16"])
def test_mixed_dtype_inputs(models, out_dtype):
    config = {
        "merge_method": "task_arithmetic",
        "base_model": "./base",
        "models": [
            {"model": "./half", "parameters": {"weight": 0.7}},
            {"model": "./b", "parameters": {"weight": 0.3}},
        ],
        "dtype": "float32",
    }
    if out_dtype:
        config["out_dtype"] = out_dtype
    ours, theirs = run_both(models, config, f"mixed_{out_dtype}")
    # float32 agrees within 1e-6; a bfloat16 output may round the other way where the two
    # float32 results (fastmerge sums in float64) straddle a rounding boundary: one ulp
    assert_same_tensors(ours, theirs, tol=1e-6 if out_dtype is None else 2.0**-8)
    want = out_dtype or "float32"
    assert {str(t.dtype) for t in _tensors(ours).values()} == {f"torch.{want}"}


def test_mixed_dtype_linear(models):
    config = {
        "merge_method": "linear",
        "models": [{"model": "./half", "parameters": {"weight": 1.0}}, {"model": "./a"}],
        "parameters": {"weight": 2.0},
        "dtype": "float32",
    }
    assert_same_tensors(*run_both(models, config, "mixed_linear"))
