"""fastmerge.engine.tokenizer: the output vocabulary of mergekit 0.1.5, on tiny LLaMAs.

The parity tests run mergekit itself (in this process) on checkpoints with different
vocabularies and check that :meth:`VocabularyPlan.align` of each model's embedding and LM
head, then mergekit's linear average (float32), gives mergekit's tensors (relative
difference <= 1e-6), and that the saved tokenizer files (vocabulary, chat template) are
mergekit's, byte for byte.

mergekit visits the models through ``MergeConfiguration.referenced_models()``, a Python
``set``, so the order in which a union adds the non-base models' tokens depends on the
hash seed; the tests pin it to fastmerge's order (base first, then the config's order)
by wrapping that method. Within one model, mergekit adds new plain tokens in the order of
``tokenizer.get_vocab()``, a Rust hash map (random on every call; fastmerge uses id
order), so the case with several such tokens compares rows by token.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fastmerge.engine.errors import CheckpointError, ConfigError
from fastmerge.engine.tokenizer import (
    ModelEmbedding,
    ModelTokenEmbedding,
    TokenOverride,
    VocabularyPlan,
    ZeroEmbedding,
    builtin_chat_templates,
    parse_tokenizer_settings,
    plan_vocabulary,
)
from fastmerge.engine.vocab_tensors import (
    RowOverride,
    align_rows,
    embedding_names,
    tensor_source,
    vocab_size_key,
)

HAS_MERGEKIT = importlib.util.find_spec("mergekit") is not None
needs_mergekit = pytest.mark.skipif(
    not HAS_MERGEKIT, reason="mergekit 0.1.5 (the parity oracle) is not installed"
)
HIDDEN = 16
T1 = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
T2 = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
BASE_WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(10)]
C_WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(9, 3, -1)] + ["x1", "y1"]


def make_tokenizer(words, added=(), special=()):
    """A BPE tokenizer of `words` (ids in order), plus added and special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if added:
        tok.add_tokens(list(added))
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    return tok


def make_model(path: Path, tok, vocab_size=None, seed=0, tied=False, template=None) -> None:
    """A 1-layer LLaMA checkpoint (random weights, `vocab_size` rows, no lm_head when
    `tied`) with `tok` (None: no tokenizer files)."""
    from transformers import LlamaConfig

    path.mkdir(parents=True)
    rows = vocab_size or len(tok)
    LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=rows, tie_word_embeddings=tied,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(path)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (rows, HIDDEN), "model.norm.weight": (HIDDEN,)}
    layer = "model.layers.0."
    for name in ("input_layernorm", "post_attention_layernorm"):
        shapes[f"{layer}{name}.weight"] = (HIDDEN,)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        shapes[f"{layer}self_attn.{name}.weight"] = (HIDDEN, HIDDEN)
    shapes.update({f"{layer}mlp.gate_proj.weight": (32, HIDDEN), f"{layer}mlp.up_proj.weight":
                   (32, HIDDEN), f"{layer}mlp.down_proj.weight": (HIDDEN, 32)})  # fmt: skip
    if not tied:
        shapes["lm_head.weight"] = (rows, HIDDEN)
    tensors = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tok is not None:
        tok.chat_template = template
        tok.save_pretrained(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Tiny LLaMAs with different vocabularies:

    * base: 13 tokens, 16 rows (3 padding rows), template T2;
    * mb: base + plain x1 + added <a1> + special <|im_start|>, template T1;
    * mc: a subset in another order + x1, y1, <|im_start|>; 17 rows; tied (no lm_head); T1;
    * trim: base + z1 + <extra> but vocab_size 13 (its tokenizer is trimmed as a base);
    * notok: base-sized weights, no tokenizer files;
    * extra: base + x1 (id 13) but vocab_size 13: x1 has no row.
    """
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("vocab")
    special = ["<|im_start|>"]
    make_model(d / "base", make_tokenizer(BASE_WORDS), 16, seed=0, template=T2)
    mb = make_tokenizer(BASE_WORDS + ["x1"], added=["<a1>"], special=special)
    make_model(d / "mb", mb, seed=1, template=T1)
    mc = make_tokenizer(C_WORDS, special=special)
    make_model(d / "mc", mc, 17, seed=2, tied=True, template=T1)
    make_model(d / "trim", make_tokenizer(BASE_WORDS + ["z1"], added=["<extra>"]), 13, seed=3)
    make_model(d / "notok", None, 16, seed=4)
    make_model(d / "extra", make_tokenizer(BASE_WORDS + ["x1"]), 13, seed=5)
    return d


def settings_of(text: str, root: Path):
    return parse_tokenizer_settings(yaml.safe_load(text.replace("@", f"{root}/")), "cfg.yaml")


# ---- parity with mergekit -------------------------------------------------------------------
CASES = {
    # union + every kind of `tokens:` override + padding + auto chat template (T1: 2 of 3)
    "union-tokens-pad": """
base_model: "@base"
models:
  - {model: "@base", parameters: {weight: 1.0}}
  - {model: "@mb", parameters: {weight: 0.5}}
  - {model: "@mc", parameters: {weight: 0.25}}
tokenizer:
  source: union
  pad_to_multiple_of: 8
  tokens:
    "<new>": {source: {kind: model_token, model: "@mb", token: "x1"}}
    w5: {source: "@mc", force: true}
    y1: {source: {kind: zero}}
    "<a1>": {source: {kind: model_token, model: "@base", token_id: 14}}
chat_template: auto
""",
    # the base's tokenizer, trimmed to its vocab_size; a built-in template
    "base-trimmed-chatml": """
base_model: "@trim"
models:
  - {model: "@trim", parameters: {weight: 1.0}}
  - {model: "@mb", parameters: {weight: 0.5}}
tokenizer_source: base
chat_template: chatml
""",
    # a model's tokenizer, no base model (means, not base rows), a token it lacks added
    "model-source-no-base": """
models:
  - {model: "@mb", parameters: {weight: 0.5}}
  - {model: "@mc", parameters: {weight: 0.3}}
  - {model: "@base", parameters: {weight: 0.2}}
tokenizer:
  source: "@mc"
  tokens:
    w0: {source: "@base"}
""",
    # `source: base` with a new token: mergekit gives the base its first padding row
    "base-new-token-padding-row": """
base_model: "@base"
models:
  - {model: "@base", parameters: {weight: 0.5}}
  - {model: "@mb", parameters: {weight: 0.5}}
tokenizer:
  source: base
  tokens:
    "<new>": {source: {kind: zero}}
""",
    # a model without tokenizer files, taken to have the base's vocabulary
    "union-missing-tokenizer": """
base_model: "@base"
models:
  - {model: "@base", parameters: {weight: 0.4}}
  - {model: "@notok", parameters: {weight: 0.3}}
  - {model: "@mb", parameters: {weight: 0.3}}
tokenizer_source: union
""",
    # only a chat template: the tensors as they are, the base's tokenizer reserialized
    "chat-template-only": """
models:
  - {model: "@mb", parameters: {weight: 0.5}}
  - {model: "@base", parameters: {weight: 0.5}}
chat_template: "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
""",
    # union without a base: mc's tokenizer first, several new plain tokens from the base
    "union-no-base": """
models:
  - {model: "@mc", parameters: {weight: 0.5}}
  - {model: "@mb", parameters: {weight: 0.3}}
  - {model: "@base", parameters: {weight: 0.2}}
tokenizer_source: union
""",
}
# mergekit adds these (the base's plain tokens mc lacks) in hash order: compare by token
BY_TOKEN = {"union-no-base": {"w0", "w1", "w2", "w3"}}


@pytest.fixture
def mergekit_order(monkeypatch):
    """Make mergekit visit the models in `rank` order (see the module docstring)."""
    from mergekit.config import MergeConfiguration

    rank: dict[str, int] = {}
    referenced = MergeConfiguration.referenced_models
    monkeypatch.setattr(
        MergeConfiguration,
        "referenced_models",
        lambda self: sorted(referenced(self), key=lambda r: rank[str(r.model)]),
    )
    return rank


def run_mergekit(config: dict, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    options = MergeOptions(device="cpu", lazy_unpickle=False, quiet=True, write_model_card=False)
    run_merge(MergeConfiguration.model_validate(config), str(out), options)


def vocab_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


@needs_mergekit
@pytest.mark.parametrize("case", list(CASES))
def test_matches_mergekit(case, root, tmp_path, mergekit_order):
    from transformers import AutoTokenizer

    text = CASES[case].replace("@", f"{root}/")
    config = {"merge_method": "linear", "dtype": "float32", **yaml.safe_load(text)}
    base = config.get("base_model")
    names = ([base] if base else []) + [m["model"] for m in config["models"] if m["model"] != base]
    weights = {m["model"]: m["parameters"]["weight"] for m in config["models"]}
    mergekit_order.update({n: i for i, n in enumerate(names)})
    theirs = tmp_path / "mergekit"
    run_mergekit(config, theirs)

    missing = "base" if case == "union-missing-tokenizer" else "error"
    settings = parse_tokenizer_settings(config, "cfg.yaml")
    plan = plan_vocabulary(
        [Path(n) for n in names], 0 if base else None, settings, missing_tokenizer=missing
    )
    ours = tmp_path / "fastmerge"
    files = plan.save(ours)
    mk_tok = AutoTokenizer.from_pretrained(str(theirs))
    mk_vocab, our_vocab = mk_tok.get_vocab(), plan.vocab
    assert mk_tok.chat_template == plan.tokenizer.chat_template
    if case in BY_TOKEN:
        shuffled = BY_TOKEN[case]
        assert set(mk_vocab) == set(our_vocab)
        assert {mk_vocab[t] for t in shuffled} == {our_vocab[t] for t in shuffled}
        assert {t: i for t, i in mk_vocab.items() if t not in shuffled} == {
            t: i for t, i in our_vocab.items() if t not in shuffled
        }
    else:
        assert mk_vocab == our_vocab
        assert sorted(f.name for f in files) == sorted(
            f.name for f in theirs.iterdir() if f.name.startswith(("tokenizer", "chat_template"))
        )
        for f in files:  # byte for byte
            assert f.read_bytes() == (theirs / f.name).read_bytes(), f.name

    mk_config = json.loads((theirs / "config.json").read_text())
    base_config = json.loads((Path(names[0]) / "config.json").read_text())
    assert plan.update_config(dict(base_config))["vocab_size"] == mk_config["vocab_size"]
    inputs = [vocab_tensors(Path(n)) for n in names]
    expected = vocab_tensors(theirs)
    heads = embedding_names(set().union(*inputs), base_config)
    assert set(heads) == {"model.embed_tokens.weight", "lm_head.weight"}
    w = torch.tensor([weights[n] for n in names])
    for name, info in heads.items():
        # mc has no lm_head: mergekit (and tensor_source) read its tied embedding instead
        aligned = plan.align([sd[tensor_source(info, sd)] for sd in inputs], info.kind)
        merged = sum(wi * t for wi, t in zip(w, aligned)) / w.sum()
        ref = expected[name]
        if case in BY_TOKEN:  # compare rows by token
            theirs_rows = [mk_vocab[t] for t in our_vocab]
            ref, merged = ref[theirs_rows], merged[list(our_vocab.values())]
        assert merged.shape == ref.shape, name
        assert (merged - ref).abs().max() <= 1e-6 * ref.abs().max(), name


# ---- the plan on its own ----------------------------------------------------------------------
def test_union_order_fills_and_padding(root):
    """The union's ids, each fill rule and the padding rows, on one-hot rows."""
    s = settings_of(
        """
tokenizer:
  pad_to_multiple_of: 4
  tokens: {"<z>": {source: {kind: zero}}, w1: {source: "@mb", force: true}}
""",
        root,
    )
    plan = plan_vocabulary([root / "base", root / "mb", root / "mc"], 0, s)
    v = plan.vocab
    assert [t for t, _ in sorted(v.items(), key=lambda kv: kv[1])][13:] == [
        "x1", "y1", "<a1>", "<|im_start|>", "<z>"
    ]  # fmt: skip
    assert plan.vocab_size == 20 and len(v) == 18
    # model i's row r = i * 100 + r, so each output row says where it came from
    tensors = [torch.arange(n, dtype=torch.float64)[:, None] + 100 * i for i, n in
               enumerate([16, 17, 17])]  # fmt: skip
    base, mb, mc = (t.flatten().tolist() for t in plan.align(tensors))
    assert base[v["w0"]] == 3 and mc[v["w0"]] == 3  # mc lacks w0: the base's row
    assert base[v["x1"]] == (113 + 209) / 2  # not in the base: the mean of the others
    assert (mb[v["x1"]], mc[v["x1"]]) == (113, 209)  # each keeps its own row
    assert base[v["y1"]] == mb[v["y1"]] == mc[v["y1"]] == 210  # only mc has it
    assert base[v["<z>"]] == mc[v["<z>"]] == 0  # in no model, a zero source
    assert base[v["w1"]] == mc[v["w1"]] == 104  # forced: mb's row for every model
    assert base[18] == base[19] == sum(base[:18]) / 18  # padding: the mean row


def test_token_past_vocab_size_has_no_row(root):
    """extra's x1 has id 13 but only 13 rows: it counts as missing (mergekit: KeyError)."""
    plan = plan_vocabulary([root / "base", root / "extra", root / "mb"], 0, settings_of(
        "tokenizer_source: union", root))  # fmt: skip
    x1 = plan.vocab["x1"]
    assert [int(m[x1]) for m in plan.index_maps] == [-1, -1, 13]


def test_trimmed_base_tokenizer(root):
    plan = plan_vocabulary([root / "trim"], 0, settings_of("tokenizer_source: base", root))
    assert sorted(plan.vocab) == sorted(BASE_WORDS) and plan.vocab_size == 13


def test_align_layouts_and_absent_models(root):
    plan = plan_vocabulary([root / "base", root / "mc"], None, settings_of(
        "tokenizer_source: union", root))  # fmt: skip
    n = plan.vocab_size
    bias = plan.align([torch.ones(16), torch.zeros(17)], "lm_head")  # a 1-D head bias
    assert [tuple(b.shape) for b in bias] == [(n,), (n,)]
    cols = plan.align([torch.ones(4, 16, dtype=torch.bfloat16), torch.ones(4, 17)], axis=1)
    assert [(tuple(c.shape), c.dtype) for c in cols] == [((4, n), torch.float32)] * 2
    only = plan.align([None, torch.randn(17, 3)])
    assert only[0] is None and tuple(only[1].shape) == (n, 3)
    assert plan.align([None, None]) == [None, None]
    with pytest.raises(CheckpointError, match="non-vocabulary dimensions"):
        plan.align([torch.ones(16, 3), torch.ones(17, 4)])
    with pytest.raises(CheckpointError, match="rows"):
        plan.align([torch.ones(10, 3), torch.ones(17, 3)])
    with pytest.raises(ValueError, match="3 tensors for 2 models"):
        plan.align([None, None, None])


def test_align_rows_override_errors():
    maps = [torch.tensor([0, 1]), torch.tensor([0, -1])]
    a, b = torch.ones(2, 2), torch.ones(1, 2)
    for ov, message in [
        (RowOverride("t", source=None), "needs a source"),
        (RowOverride("t", source="row", model=1), "does not have"),
        (RowOverride("t", source="index", model=1, row=5), "out of range"),
    ]:
        with pytest.raises((ConfigError, CheckpointError), match=message):
            align_rows([a, b], maps, vocab_size=2, base=None, overrides={1: ov})
    with pytest.raises(CheckpointError, match="lacks"):
        align_rows([a, None], maps, vocab_size=2, base=None,
                   overrides={1: RowOverride("t", True, "row", 1)})  # fmt: skip


def test_save_and_update_config(root, tmp_path):
    s = settings_of("tokenizer: {source: '@mb', pad_to_multiple_of: 32}\nchat_template: auto", root)
    plan = plan_vocabulary([root / "base", root / "mb"], 0, s)
    files = plan.save(tmp_path / "out")
    assert {f.name for f in files} >= {"tokenizer.json", "tokenizer_config.json"}
    assert plan.chat_template == T2.strip()  # a tie: the first model's, as mergekit
    assert plan.update_config({"vocab_size": 1}) == {"vocab_size": 32}
    plan.vocab_size_key = "text_config.vocab_size"
    assert plan.update_config({}) == {"text_config": {"vocab_size": 32}}


def test_nothing_to_do(root):
    assert parse_tokenizer_settings({"merge_method": "linear"}, "c") is None
    assert plan_vocabulary([root / "base"], 0, None) is None
    only_template = plan_vocabulary([root / "base", root / "mb"], None, settings_of(
        "chat_template: auto", root))  # fmt: skip
    assert not only_template.permutes and only_template.vocab_size is None
    assert only_template.chat_template == T2.strip()
    t = [torch.ones(2)]
    assert only_template.align(t + [None]) == t + [None]
    assert only_template.update_config({"vocab_size": 5}) == {"vocab_size": 5}


def test_plan_errors(root):
    models = [root / "base", root / "mb"]
    for text, error, message in [
        ("tokenizer_source: /no/such/model", ConfigError, r"tokenizer_source: '/no/such"),
        ("tokenizer: {source: '@nowhere'}", ConfigError, "tokenizer.source: .* not a model"),
        ("tokenizer: {tokens: {w1: {source: '@nowhere'}}}", ConfigError,
         "tokenizer.tokens.w1.source: .*nowhere' is not a model of this merge"),
        ("tokenizer: {tokens: {x1: {force: true}}}", ConfigError,
         r"tokenizer.tokens.x1.source: needed \(force is set\)"),
        ("tokenizer: {tokens: {x1: {}}}", ConfigError, r"models 0 lack it"),
        ("tokenizer: {tokens: {x1: {source: '@base'}}}", ConfigError, "does not have 'x1'"),
        ("tokenizer: {tokens: {'<q>': {source: {kind: model_token, model: '@mb', token: '<q>'}}}}",
         ConfigError, r"tokens.<q>.source.token: .* does not have '<q>'"),
    ]:  # fmt: skip
        with pytest.raises(error, match=message):
            plan_vocabulary(models, 0, settings_of(text, root))
    union = settings_of("tokenizer_source: union", root)
    with pytest.raises(CheckpointError, match="notok: no usable tokenizer"):
        plan_vocabulary([root / "base", root / "notok"], 0, union)
    with pytest.raises(CheckpointError, match="notok: no usable tokenizer"):
        plan_vocabulary([root / "notok", root / "base"], 0, union, missing_tokenizer="base")
    with pytest.raises(CheckpointError, match="not a model directory"):
        plan_vocabulary([root / "absent"], 0, union)
    with pytest.raises(ValueError, match="base_index"):
        plan_vocabulary(models, 2, union)
    with pytest.raises(ValueError, match="missing_tokenizer"):
        plan_vocabulary(models, 0, union, missing_tokenizer="guess")


def test_references_match_yaml_spellings(root):
    s = parse_tokenizer_settings(
        {"tokenizer": {"source": "org/chat", "tokens": {"<q>": {"source": "org/base"}}}}, "c"
    )
    with pytest.raises(ConfigError, match="does not have '<q>'"):  # matched, but lacks it
        plan_vocabulary([root / "base", root / "mb"], 0, s, references=["org/base", "org/chat"])


# ---- parsing ------------------------------------------------------------------------------
def test_parse_settings():
    s = parse_tokenizer_settings({"tokenizer_source": "union"}, "c")
    assert (s.source, s.key, s.tokens, s.pad_to_multiple_of) == ("union", "tokenizer_source", {},
                                                                 None)  # fmt: skip
    s = parse_tokenizer_settings(
        {
            "tokenizer": {
                "pad_to_multiple_of": 0,
                "tokens": {
                    "a": {"source": "./m"},
                    "b": {"source": {"kind": "zero"}, "force": True},
                    "c": {"source": {"kind": "model_token", "model": "./m", "token_id": 3}},
                    "d": {"source": {"kind": "model_token", "model": "./m", "token": "x"}},
                    "e": {"source": {"model": "./m"}},
                    "f": {},
                },
            },
        },
        "c",
    )
    assert (s.source, s.key, s.pad_to_multiple_of) == ("union", "tokenizer.source", None)
    assert s.tokens == {
        "a": TokenOverride(ModelEmbedding("./m")),
        "b": TokenOverride(ZeroEmbedding(), force=True),
        "c": TokenOverride(ModelTokenEmbedding("./m", token_id=3)),
        "d": TokenOverride(ModelTokenEmbedding("./m", token="x")),
        "e": TokenOverride(ModelEmbedding("./m")),
        "f": TokenOverride(),
    }
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert parse_tokenizer_settings({"chat_template": literal}, "c").chat_template == literal
    assert parse_tokenizer_settings({"chat_template": "auto"}, "c").source is None


@pytest.mark.skipif(not builtin_chat_templates(), reason="mergekit's templates not installed")
def test_builtin_chat_template(root):
    s = parse_tokenizer_settings({"chat_template": "llama3"}, "c")
    plan = plan_vocabulary([root / "base"], 0, s)
    assert plan.chat_template == builtin_chat_templates()["llama3"].read_text()


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"tokenizer_source": "base", "tokenizer": {}}, "give only one"),
        ({"tokenizer_source": 3}, "tokenizer_source: must be a model path"),
        ({"tokenizer_source": ""}, "tokenizer_source: must be a model path"),
        ({"tokenizer_source": "m+lora"}, "LoRA references"),
        ({"tokenizer": "union"}, "tokenizer: must be a mapping"),
        ({"tokenizer": {"sauce": 1}}, "tokenizer: unknown key 'sauce'; valid keys: source, tok"),
        ({"tokenizer": {"source": ["a"]}}, "tokenizer.source: must be a model path"),
        ({"tokenizer": {"tokens": ["a"]}}, "tokenizer.tokens: must be a mapping"),
        ({"tokenizer": {"tokens": {1: {}}}}, "tokenizer.tokens: token 1 is not"),
        ({"tokenizer": {"tokens": {"t": None}}}, "tokenizer.tokens.t: must be a mapping"),
        ({"tokenizer": {"tokens": {"t": {"src": 1}}}}, "tokenizer.tokens.t: unknown key 'src'"),
        ({"tokenizer": {"tokens": {"t": {"force": "yes"}}}}, "tokens.t.force: must be true or"),
        ({"tokenizer": {"tokens": {"t": {"source": 5}}}}, "tokenizer.tokens.t.source: must be"),
        ({"tokenizer": {"tokens": {"t": {"source": {"kind": "one"}}}}}, "t.source.kind: must be"),
        ({"tokenizer": {"tokens": {"t": {"source": {"kind": "zero", "model": "m"}}}}},
         "t.source: unknown key 'model'"),
        ({"tokenizer": {"tokens": {"t": {"source": {"kind": "model_token", "model": "m"}}}}},
         "t.source: give exactly one of token_id and token"),
        ({"tokenizer": {"tokens": {"t": {"source": {"kind": "model_token", "model": "m",
          "token_id": 1, "token": "x"}}}}}, "give exactly one"),
        ({"tokenizer": {"tokens": {"t": {"source": {"kind": "model_token", "model": "m",
          "token_id": True}}}}}, "t.source.token_id: must be an integer"),
        ({"tokenizer": {"tokens": {"t": {"source": {"kind": "model_token", "model": "m",
          "token": 7}}}}}, "t.source.token: must be a string"),
        ({"tokenizer": {"tokens": {"t": {"source": {"kind": "model_token", "token": "x"}}}}},
         "t.source.model: must be a model path"),
        ({"tokenizer": {"pad_to_multiple_of": -8}}, "pad_to_multiple_of: must be an integer"),
        ({"tokenizer": {"pad_to_multiple_of": True}}, "pad_to_multiple_of: must be an integer"),
        ({"tokenizer": {"pad_to_multiple_of": "8"}}, "pad_to_multiple_of: must be an integer"),
        ({"chat_template": 3}, "chat_template: must be a string"),
        ({"chat_template": "chatml2"}, "chat_template: 'chatml2' is neither a built-in"),
        ({"chat_template": "{{ x }}"}, "chat_template: a Jinja template has"),
        ({"chat_template": "line one\nline two, no braces at all"}, "a Jinja template has"),
    ],
)  # fmt: skip
def test_parse_errors(raw, message):
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: .*" + re.escape(message)):
        parse_tokenizer_settings(raw, "cfg.yaml")


def test_builtin_template_without_mergekit(monkeypatch):
    import fastmerge.engine.tokenizer as tokenizer

    monkeypatch.setattr(tokenizer, "builtin_chat_templates", dict)
    with pytest.raises(ConfigError, match="reads from an installed mergekit"):
        parse_tokenizer_settings({"chat_template": "chatml"}, "c")


# ---- token-indexed tensors ----------------------------------------------------------------
def test_embedding_names():
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    found = embedding_names(names, llama)
    assert list(found) == ["model.embed_tokens.weight"]  # tied in every model: no lm_head
    head = embedding_names(names + ["lm_head.weight"], llama)["lm_head.weight"]
    assert (head.kind, head.optional, head.tied_names) == (
        "lm_head", True, ("model.embed_tokens.weight",))  # fmt: skip
    assert tensor_source(head, names) == "model.embed_tokens.weight"
    gpt2 = embedding_names(["wte.weight", "wpe.weight"], {"architectures": ["GPT2LMHeadModel"]})
    assert list(gpt2) == ["transformer.wte.weight"]  # an alias; never the position table
    assert tensor_source(gpt2["transformer.wte.weight"], ["wte.weight"]) == "wte.weight"
    phi = embedding_names(["model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"],
                          {"architectures": ["PhiForCausalLM"], "model_type": "phi"})  # fmt: skip
    assert {n: v.kind for n, v in phi.items()} == dict.fromkeys(phi, "embed") | {
        "lm_head.weight": "lm_head", "lm_head.bias": "lm_head"}  # fmt: skip
    unknown = embedding_names(
        ["tf.tok_embeddings.weight", "tf.pos_embeddings.weight", "output.weight"],
        {"architectures": ["NewForCausalLM"]},
    )
    assert {n: (v.kind, v.tied_names) for n, v in unknown.items()} == {
        "tf.tok_embeddings.weight": ("embed", ()),
        "output.weight": ("lm_head", ("tf.tok_embeddings.weight",)),
    }
    assert vocab_size_key(llama) == "vocab_size"
    assert vocab_size_key({"architectures": ["Mistral3ForConditionalGeneration"]}) == (
        "text_config.vocab_size"
    )


def test_vocabulary_plan_alone():
    plan = VocabularyPlan([Path("a")], None, True, 2, [torch.tensor([1, 0])])
    (out,) = plan.align([torch.tensor([[1.0], [2.0]])])
    assert out.flatten().tolist() == [2.0, 1.0]


# ---- end to end through the engine ------------------------------------------------------------
ENGINE_CASES = [
    "union-tokens-pad",
    "base-trimmed-chatml",
    "model-source-no-base",
    "base-new-token-padding-row",
    "chat-template-only",
]


@needs_mergekit
@pytest.mark.parametrize("case", ENGINE_CASES)
def test_fastmerge_merge_matches_mergekit(case, root, tmp_path, mergekit_order):
    """`fastmerge.engine.run` on the same YAML as mergekit: every tensor (the aligned
    embeddings and heads, and the rest), the vocabulary, the chat template, config.json."""
    from transformers import AutoTokenizer

    from fastmerge import engine

    text = CASES[case].replace("@", f"{root}/")
    config = {"merge_method": "linear", "dtype": "float32", **yaml.safe_load(text)}
    base = config.get("base_model")
    names = ([base] if base else []) + [m["model"] for m in config["models"] if m["model"] != base]
    mergekit_order.update({n: i for i, n in enumerate(names)})
    theirs, ours = tmp_path / "mergekit", tmp_path / "fastmerge"
    run_mergekit(config, theirs)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    engine.run(tmp_path / "cfg.yaml", ours)
    got = {}
    for f in ours.glob("*.safetensors"):
        got.update(load_file(f))
    expected = vocab_tensors(theirs)
    assert sorted(got) == sorted(expected)
    for name, ref in expected.items():
        assert got[name].shape == ref.shape, name
        assert (got[name] - ref).abs().max() <= 1e-6 * ref.abs().max(), name
    mine, mk = AutoTokenizer.from_pretrained(str(ours)), AutoTokenizer.from_pretrained(str(theirs))
    assert mine.get_vocab() == mk.get_vocab()
    assert mine.chat_template == mk.chat_template
    mk_config = json.loads((theirs / "config.json").read_text())
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == mk_config["vocab_size"]
