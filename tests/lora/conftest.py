"""Shared builders for the LoRA tests: a tiny LLaMA and a "fine-tune" of it whose change
of every 2-D weight is low-rank plus small noise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

LAYERS = 2
#: Rank of each weight's planted change (embeddings and LM head included).
DELTA_RANK = 4
NOISE = 1e-5


def llama_config(**overrides):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def build_base(path: Path, seed: int = 0, **overrides):
    """Save a random tiny LLaMA at `path`; return the model."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config(**overrides)).float().eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def fine_tune(
    base,
    path: Path,
    seed: int = 1,
    rank: int = DELTA_RANK,
    noise: float = NOISE,
    change_norm: bool = False,
) -> dict[str, torch.Tensor]:
    """Save base + (rank-`rank` change + `noise` * randn) of every 2-D weight at `path`
    (`rank` 0: 2 for attention, 3 for the MLP, 4 for the rest); return the planted
    low-rank changes."""
    import copy

    gen = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(base)
    planted = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                r = rank or (2 if "self_attn" in name else 3 if "mlp" in name else 4)
                u = torch.randn(p.shape[0], r, generator=gen)
                v = torch.randn(r, p.shape[1], generator=gen)
                scales = torch.linspace(1.0, 0.3, r)
                low = (u * scales) @ v * (0.05 / r**0.5)
                planted[name] = low
                p.add_(low + noise * torch.randn(p.shape, generator=gen))
            elif change_norm and name.endswith("norm.weight"):
                p.add_(0.01)
    model.save_pretrained(path, safe_serialization=True)
    return planted


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(root, base model, planted changes): ``root/base`` and ``root/ft`` on disk."""
    root = tmp_path_factory.mktemp("lora")
    base = build_base(root / "base")
    planted = fine_tune(base, root / "ft")
    return root, base, planted
