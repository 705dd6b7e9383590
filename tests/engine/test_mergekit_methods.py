"""Every deterministic method of mergekit 0.1.5's table gives mergekit's tensors.

The checkpoints are tiny LLaMA models built here: a base and three "fine-tuned" experts
(base + small noise; one of them sparse, so that RAM's unique and shared entries both
occur). Each case runs mergekit (the test-only oracle) and :func:`fastmerge.engine.run` on
one YAML and compares every tensor (relative difference <= 1e-5 of the tensor's largest
magnitude). Each method runs under a per-layer gradient and a ``filter``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .test_mergekit_parity import MERGEKIT, assert_same_tensors, run_both

pytestmark = pytest.mark.skipif(
    MERGEKIT is None, reason="mergekit (the test oracle) is not installed"
)
TOL = 1e-5


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """base, x, y (dense deltas) and s (sparse deltas) LLaMA checkpoints of 4 layers."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tuned")
    cfg = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for name in ["base", "x", "y", "s"]:
        with torch.no_grad():
            for k, p in model.state_dict().items():
                noise = torch.randn(p.shape, generator=gen) * 0.02
                if name == "s":
                    noise *= torch.rand(p.shape, generator=gen) < 0.4
                p.copy_(base[k] + (noise if name != "base" else 0))
        model.save_pretrained(root / name, safe_serialization=True)
    return root


def _models(names, params=None):
    params = params or {}
    return [{"model": f"./{n}", **({"parameters": params[n]} if n in params else {})}
            for n in names]  # fmt: skip


GRADIENT = [0.2, 0.9, 0.5]
FILTERED = [{"filter": "self_attn", "value": 0.35}, {"value": GRADIENT}]

CASES = {
    "slerp": dict(base_model="./base", models=_models(["base", "x"]),
                  parameters={"t": FILTERED}),
    "slerp_far": dict(base_model="./base", models=_models(["base", "s"]),
                      parameters={"t": [0.0, 1.0]}),
    "nuslerp": dict(models=_models(["x", "y"], {"x": {"weight": GRADIENT},
                                               "y": {"weight": FILTERED}})),
    "nuslerp_base": dict(base_model="./base",
                         models=_models(["x", "s"], {"x": {"weight": 0.3}, "s": {"weight": 0.6}})),
    "nuslerp_rows": dict(models=_models(["x", "y"], {"y": {"weight": GRADIENT}}),
                         parameters={"nuslerp_flatten": False}),
    "nuslerp_columns": dict(base_model="./base", models=_models(["x", "y"]),
                            parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "multislerp": dict(models=_models(["x", "y", "s"], {"x": {"weight": FILTERED},
                                                       "y": {"weight": 0.5}})),
    "multislerp_base": dict(base_model="./base",
                            models=_models(["x", "y", "s"], {"x": {"weight": GRADIENT}}),
                            parameters={"normalize_weights": False}),
    "karcher": dict(models=_models(["x", "y", "s"]),
                    parameters={"max_iter": [{"filter": "mlp", "value": 2}, {"value": 20}],
                                "tol": [1e-5, 1e-3]}),
    "ties": dict(base_model="./base",
                 models=_models(["x", "y", "s"], {"x": {"weight": 0.7, "density": FILTERED},
                                                  "y": {"weight": GRADIENT, "density": 0.5},
                                                  "s": {"weight": 1.0, "density": 0.9}})),
    "ties_rescaled": dict(base_model="./base", models=_models(["x", "y"]),
                          parameters={"density": 0.3, "rescale": True, "normalize": False,
                                      "lambda": GRADIENT}),
    "breadcrumbs": dict(base_model="./base",
                        models=_models(["x", "y", "s"], {"x": {"density": 0.8, "gamma": 0.05}}),
                        parameters={"density": FILTERED, "weight": GRADIENT}),
    "breadcrumbs_ties": dict(base_model="./base", models=_models(["x", "y", "s"]),
                             parameters={"density": 0.6, "gamma": [0.0, 0.1], "weight": 0.5,
                                         "rescale": True}),
    "sce": dict(base_model="./base", models=_models(["x", "y", "s"]),
                parameters={"select_topk": FILTERED}),
    "sce_all": dict(base_model="./base", models=_models(["x", "y"])),
    "ram": dict(base_model="./base", models=_models(["x", "s"]),
                parameters={"epsilon": [{"filter": "self_attn", "value": 0.02},
                                        {"value": [1e-5, 0.01]}]}),
    "ramplus_tl": dict(base_model="./base", models=_models(["x", "y", "s"]),
                       parameters={"r": 0.5, "alpha": FILTERED, "epsilon": 0.005}),
    "model_stock": dict(base_model="./base", models=_models(["x", "y", "s"])),
    "model_stock_rows": dict(base_model="./base", models=_models(["x", "y"]),
                             parameters={"filter_wise": [{"filter": "mlp", "value": False},
                                                         {"value": True}]}),
    "nearswap": dict(base_model="./base", models=_models(["x"]),
                     parameters={"t": [{"filter": "mlp", "value": 0.001}, {"value": [0.0, 0.02]}]}),
    "arcee_fusion": dict(base_model="./base", models=_models(["s"])),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_matches_mergekit(tuned, case):
    method = case.split("_")[0] if case.split("_")[0] in ("slerp", "karcher") else None
    method = method or next(m for m in sorted(METHODS, key=len, reverse=True)
                            if case == m or case.startswith(m + "_"))  # fmt: skip
    config = {"merge_method": method, **CASES[case], "dtype": "float32"}
    if method in NEEDS_WEIGHT:  # mergekit has no default weight there (fastmerge: 1)
        config["parameters"] = {"weight": 1.0, **config.get("parameters", {})}
    assert_same_tensors(*run_both(tuned, config, case), tol=TOL)


METHODS = ["slerp", "nuslerp", "multislerp", "karcher", "ties", "breadcrumbs",
           "breadcrumbs_ties", "sce", "ram", "ramplus_tl", "model_stock", "nearswap",
           "arcee_fusion"]  # fmt: skip


NEEDS_WEIGHT = {"nuslerp", "multislerp", "ties", "breadcrumbs", "breadcrumbs_ties"}


def test_slerp_inside_slices(tuned):
    config = {
        "merge_method": "slerp",
        "base_model": "./base",
        "slices": [
            {"sources": [{"model": "./base", "layer_range": [0, 2]},
                         {"model": "./x", "layer_range": [0, 2]}],
             "parameters": {"t": [0.0, 1.0]}},
            {"sources": [{"model": "./base", "layer_range": [2, 4]},
                         {"model": "./y", "layer_range": [2, 4]}],
             "parameters": {"t": [{"filter": "mlp", "value": 0.25}, {"value": 0.6}]}},
        ],
        "dtype": "float32",
    }  # fmt: skip
    assert_same_tensors(*run_both(tuned, config, "slerp_slices"), tol=TOL)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_match_mergekit_in_distribution(tuned, method):
    """Keep rate (pooled over the model, within 3σ of density for both tools) and the L1
    rescale (every tensor's delta keeps its L1 norm in both)."""
    from .test_mergekit_parity import _tensors

    density = 0.3
    for rescale in (False, True):
        config = {"merge_method": method, "base_model": "./base", "models": _models(["x"]),
                  "parameters": {"weight": 1.0, "density": density, "rescale": rescale,
                                 "normalize": False},
                  "dtype": "float32"}  # fmt: skip
        if method.startswith("della"):
            config["parameters"]["epsilon"] = 0.1
        ours, theirs = run_both(tuned, config, f"{method}_{rescale}")
        base, x = _tensors(tuned / "base"), _tensors(tuned / "x")
        for out in (_tensors(ours), _tensors(theirs)):
            kept = total = 0
            for k, v in out.items():
                delta, tau = v - base[k], x[k] - base[k]
                kept += (delta != 0).sum().item()
                total += delta.numel()
                if rescale:
                    assert delta.abs().sum().item() == pytest.approx(
                        tau.abs().sum().item(), rel=1e-4
                    ), k
            sigma = (total * density * (1 - density)) ** 0.5
            assert abs(kept - total * density) <= 3 * sigma


@pytest.mark.parametrize("method", ["slerp", "ties", "breadcrumbs", "nearswap"])
def test_row_block_merges_equal_whole_tensor_merges(tuned, tmp_path, method):
    """Tensors above block_bytes are merged in row blocks with whole-tensor statistics:
    the same tensors as merging each tensor at once."""
    from fastmerge import engine

    from .test_mergekit_parity import _tensors

    params = {"t": 0.3} if method in ("slerp", "nearswap") else {"density": 0.4, "weight": 1.0}
    if method == "nearswap":
        params["t"] = 0.01
    models = ["x"] if method in ("slerp", "nearswap") else ["x", "y", "s"]
    config = {"merge_method": method, "base_model": str(tuned / "base"),
              "models": [{"model": str(tuned / m)} for m in models], "parameters": params,
              "dtype": "float32"}  # fmt: skip
    cfg = engine.parse_config(config)
    engine.run(cfg, tmp_path / "whole")
    engine.run(cfg, tmp_path / "blocks", block_bytes=256)  # every matrix in blocks of rows
    whole, blocks = _tensors(tmp_path / "whole"), _tensors(tmp_path / "blocks")
    assert sorted(whole) == sorted(blocks)
    for k in whole:
        assert torch.equal(whole[k], blocks[k]), k
