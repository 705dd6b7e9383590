"""LoRA extraction (fastmerge.lora.extract_lora) on a tiny LLaMA fine-tune: the planted
low-rank change is recovered, the error matches a plain ``torch.linalg.svd`` truncation,
PEFT loads the adapter and gives the logits of fastmerge's own low-rank model, and bad
input fails naming the module with nothing written."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from fastmerge.io import open_checkpoint
from fastmerge.lora import LoraError, extract_lora, load_adapter, lora_factors

from .conftest import LAYERS, build_base, fine_tune

MODULES = 7 * LAYERS + 2  # q k v o gate up down per layer, embed_tokens, lm_head


def _exact_error(delta: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-`rank` approximation (plain torch)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return float(torch.linalg.norm(delta.double() - approx) / torch.linalg.norm(delta.double()))


def _deltas(root):
    base, ft = open_checkpoint(root / "base"), open_checkpoint(root / "ft")
    return {
        n.removesuffix(".weight"): ft[n] - base[n] for n in ft if ft.info(n).shape.__len__() == 2
    }


def _sibling_leftovers(out):
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_rank16_recovers_the_low_rank_change(pair):
    root, _, planted = pair
    report = extract_lora(root / "base", root / "ft", root / "r16", rank=16, progress=False)
    assert len(report.modules) == MODULES and not report.skipped
    deltas = _deltas(root)
    for m in report.modules:
        assert m.rank == 16
        exact = _exact_error(deltas[m.name], 16)
        # the randomized SVD is as good as the exact truncation, which is the noise floor
        assert m.error <= exact * 1.02 + 1e-6, (m.name, m.error, exact)
        assert m.error < 0.02, m.name
    adapter = load_adapter(root / "r16")
    assert sorted(adapter.modules) == sorted(m.name for m in report.modules)
    for name, low in planted.items():
        module = name.removesuffix(".weight")
        rel = torch.linalg.norm(adapter.delta(module) - low) / torch.linalg.norm(low)
        assert rel < 0.02, (module, float(rel))
    config = json.loads((root / "r16" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 16, 16)
    keys = load_file(root / "r16" / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (16, 64)
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 16)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (16, 96)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (64, 16)
    assert "r=16" in report.text() and "mean relative error" in report.text()


def _own_low_rank_model(base, adapter):
    import copy

    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = name.removesuffix(".weight")
            if module in adapter.modules:
                p.add_(adapter.delta(module))
    return model


@pytest.mark.parametrize("kind", ["rank", "energy"])
def test_peft_loads_the_adapter_with_our_logits(pair, kind, tmp_path):
    peft = pytest.importorskip("peft")
    root, base, _ = pair
    out = tmp_path / "adapter"
    if kind == "rank":
        extract_lora(root / "base", root / "ft", out, rank=16, progress=False)
    else:  # per-module ranks 2, 3, 4: rank_pattern / alpha_pattern in the config
        fine_tune(base, tmp_path / "ft", rank=0, noise=0.0)
        extract_lora(root / "base", tmp_path / "ft", out, energy=0.999999, progress=False)
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == 4 and set(config["rank_pattern"].values()) == {2, 3}
    adapter = load_adapter(out)
    ours = _own_low_rank_model(base, adapter)
    import copy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    keys = [str(w.message) for w in caught if "keys" in str(w.message).lower()]
    assert not keys  # PEFT warns of missing or unexpected adapter keys
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
        plain = base(ids).logits
    assert (a - plain).abs().max() > 1e-3  # the adapter does change the model
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_energy_threshold_picks_the_smallest_rank(tmp_path):
    base = build_base(tmp_path / "base")
    fine_tune(base, tmp_path / "ft", rank=0, noise=0.0)
    report = extract_lora(
        tmp_path / "base", tmp_path / "ft", tmp_path / "out", energy=0.999999, progress=False
    )
    for m in report.modules:
        assert m.rank == (2 if "self_attn" in m.name else 3 if "mlp" in m.name else 4), m.name
        assert m.energy >= 0.999999 and m.error < 1e-3
    deltas = _deltas(tmp_path)
    for m in report.modules[:4]:
        s = torch.linalg.svdvals(deltas[m.name].double())
        kept = s.square().cumsum(0) / s.square().sum()
        energy = float(kept[m.rank - 2]) + 1e-3  # between rank r-1's and rank r's
        _, b, got = lora_factors(deltas[m.name], energy=energy, max_rank=20)
        assert b.shape[1] == m.rank and got >= energy


def test_exact_and_randomized_errors_agree(pair, tmp_path):
    root, _, _ = pair
    fast = extract_lora(root / "base", root / "ft", tmp_path / "a", rank=8, progress=False)
    exact = extract_lora(
        root / "base", root / "ft", tmp_path / "b", rank=8, method="exact", progress=False
    )
    for f, e in zip(fast.modules, exact.modules):
        assert f.name == e.name
        assert abs(f.error - e.error) <= 1e-3 * e.error + 1e-6, f.name


def test_modules_regex_and_skipped_tensors(tmp_path):
    base = build_base(tmp_path / "base")
    fine_tune(base, tmp_path / "ft", change_norm=True)
    with pytest.warns(UserWarning, match="not 2-D weights"):
        report = extract_lora(
            tmp_path / "base",
            tmp_path / "ft",
            tmp_path / "out",
            rank=4,
            modules=r"self_attn\.(q|v)_proj",
            progress=False,
        )
    assert sorted(m.name for m in report.modules) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(LAYERS) for p in "qv"
    )
    assert "model.norm.weight" in report.skipped
    assert "model.layers.0.mlp.up_proj.weight" in report.skipped


def test_rank_larger_than_a_module_names_it_and_writes_nothing(pair):
    root, _, _ = pair
    out = root / "too-big"
    with pytest.raises(
        LoraError,
        match=r"module 'model\.layers\.0\.self_attn\.k_proj': rank 40 "
        r"is larger than its weight \[32, 64\]",
    ):
        extract_lora(root / "base", root / "ft", out, rank=40, progress=False)
    assert not out.exists() and not _sibling_leftovers(out)


def test_different_architectures_are_refused(pair, tmp_path):
    root, _, _ = pair
    build_base(tmp_path / "deeper", num_hidden_layers=LAYERS + 1)
    build_base(tmp_path / "wider", intermediate_size=128)
    out = tmp_path / "out"
    with pytest.raises(LoraError, match=r"'model\.layers\.2\..*' is not in the base model"):
        extract_lora(root / "base", tmp_path / "deeper", out, progress=False)
    with pytest.raises(
        LoraError,
        match=r"'model\.layers\.0\.mlp\.\w+_proj\.weight' is \[\d+, \d+\] "
        r"but \[\d+, \d+\] in the base model",
    ):
        extract_lora(root / "base", tmp_path / "wider", out, progress=False)
    assert not out.exists() and not _sibling_leftovers(out)


def test_bad_arguments(pair, tmp_path):
    root, _, _ = pair
    args = (root / "base", root / "ft")
    with pytest.raises(LoraError, match="not both"):
        extract_lora(*args, tmp_path / "o", rank=4, energy=0.9, progress=False)
    with pytest.raises(LoraError, match=r"energy must be a fraction in \(0, 1\]"):
        extract_lora(*args, tmp_path / "o", energy=1.5, progress=False)
    with pytest.raises(LoraError, match="rank must be an int >= 1"):
        extract_lora(*args, tmp_path / "o", rank=0, progress=False)
    with pytest.raises(LoraError, match="matches no 2-D weight"):
        extract_lora(*args, tmp_path / "o", modules="nothing_like_this", progress=False)
    with pytest.raises(LoraError, match="nothing to extract"):
        extract_lora(root / "base", root / "base", tmp_path / "o", progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ValueError, match="exists"):
        extract_lora(*args, tmp_path / "exists", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]
