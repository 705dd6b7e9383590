"""Twin-Merging on tiny, randomly initialised Hugging Face models (no download): a BERT
encoder and a LLaMA causal LM. Routed outputs equal the per-sample materialized models."""

from __future__ import annotations

import pytest
import torch

from fastmerge.twin import Router, TwinMerger, TwinModel

from .conftest import naive_outputs, perturbed_experts

transformers = pytest.importorskip("transformers")

T = 3


def tiny_bert(dtype):
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=24, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(config).to(dtype).eval()


def tiny_llama(dtype):
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=24,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def batch(n=4, length=7, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 5:] = 0  # a padded sample
    return ids, mask


def gates(n, dtype):
    gen = torch.Generator().manual_seed(4)
    return torch.softmax(2 * torch.randn(n, T, generator=gen, dtype=dtype), -1)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_bert(dtype, tol):
    model = tiny_bert(dtype)
    experts = perturbed_experts(model, T, scale=0.02)
    merger = TwinMerger(model, experts, shared_kwargs={"scale": 0.4}, rank=0.25, progress=False)
    twin = TwinModel(model, merger).eval()
    assert "encoder.layer.0.attention.self.query.weight" in twin.routed_keys
    assert "encoder.layer.0.attention.self.query.bias" in twin.routed_keys
    assert "embeddings.word_embeddings.weight" in twin.unrouted_keys  # factored, not routed
    ids, mask = batch()
    g = gates(4, dtype)
    out = twin(ids, gates=g, attention_mask=mask)
    rows = naive_outputs(model, twin, [ids], g, attention_mask=mask)
    for name in ("last_hidden_state", "pooler_output"):
        expected = torch.cat([getattr(r, name) for r in rows])
        torch.testing.assert_close(getattr(out, name), expected, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_llama(dtype, tol):
    model = tiny_llama(dtype)
    experts = perturbed_experts(model, T, scale=0.02)
    merger = TwinMerger(model, experts, rank=0.25, progress=False)
    twin = TwinModel(model, merger, top_k=2).eval()
    assert "model.layers.1.mlp.down_proj.weight" in twin.routed_keys
    assert "lm_head.weight" in twin.routed_keys
    ids, _ = batch()
    g = gates(4, dtype)
    g[g < g.max(1, keepdim=True).values] = 0.0  # one-hot-like rows with zeros
    g = g / g.sum(1, keepdim=True)
    out = twin(ids, gates=g).logits
    expected = torch.cat([r.logits for r in naive_outputs(model, twin, [ids], g)])
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_router_features_from_a_hugging_face_model():
    model = tiny_bert(torch.float32)
    merger = TwinMerger(model, perturbed_experts(model, T, scale=0.02), progress=False)
    torch.manual_seed(0)
    twin = TwinModel(model, merger, Router(16, T)).eval()
    ids, mask = batch()
    feats = twin.features(ids, attention_mask=mask)
    assert feats.shape == (4, 16)
    hidden = twin.model(ids, attention_mask=mask).last_hidden_state  # gates off: shared model
    torch.testing.assert_close(feats[1], hidden[1, :5].mean(0))
    out = twin(ids, attention_mask=mask)  # gates from the router
    g = twin.gates(ids, attention_mask=mask)
    torch.testing.assert_close(
        out.last_hidden_state, twin(ids, gates=g, attention_mask=mask).last_hidden_state
    )


def test_task_heads_on_a_hugging_face_encoder():
    model = tiny_bert(torch.float64)
    merger = TwinMerger(model, perturbed_experts(model, T, scale=0.02), progress=False)
    heads = [torch.nn.Linear(16, 2, dtype=torch.float64) for _ in range(T)]
    twin = TwinModel(model, merger, heads=heads).eval()
    ids, mask = batch()
    g = torch.eye(T, dtype=torch.float64)[[0, 1, 2, 0]]
    out = twin(ids, gates=g, attention_mask=mask)  # heads see last_hidden_state
    hidden = TwinModel(model, merger).eval()(ids, gates=g, attention_mask=mask)
    assert out.shape == (4, 7, 2)
    torch.testing.assert_close(out[2], heads[2](hidden.last_hidden_state[2]))
