"""Token-indexed tensors: which tensors of a checkpoint are indexed by token id (input
embeddings, LM heads and their biases), where a model that lacks one reads it from, which
``config.json`` key holds the vocabulary size (for the architectures mergekit 0.1.5
describes, its ``vocabulary_axis`` weights), and :func:`align_rows`, which re-indexes
them to an output vocabulary with mergekit's rules for the rows a model lacks. The
vocabulary itself is built by :mod:`fastmerge.engine.tokenizer`.

A tied LM head follows mergekit: the head is an *optional* weight whose ``tied_names``
are tried after its own name and aliases (:func:`tensor_source`), so a model whose
checkpoint lacks ``lm_head.weight`` contributes its input embedding; when no input model
has the head (under its name or an alias), there is no output head at all.

Example:
    >>> cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    >>> heads = embedding_names(["model.embed_tokens.weight", "lm_head.weight"], cfg)
    >>> [(v.name, v.kind) for v in heads.values()]
    [('model.embed_tokens.weight', 'embed'), ('lm_head.weight', 'lm_head')]
    >>> tensor_source(heads["lm_head.weight"], {"model.embed_tokens.weight"})
    'model.embed_tokens.weight'
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..io import CheckpointError
from .errors import ConfigError

__all__ = [
    "RowOverride",
    "VocabTensor",
    "align_rows",
    "config_value",
    "embedding_names",
    "tensor_source",
    "vocab_size_key",
]


@dataclass(frozen=True)
class VocabTensor:
    """A tensor indexed by token id along `axis`.

    ``kind`` is ``"embed"`` (an input embedding) or ``"lm_head"`` (an output projection
    or its bias). ``optional``: the output omits it when no input model has it under
    ``name`` or an alias. ``tied_names``: read instead when a model lacks it (a tied head).
    """

    name: str
    kind: str
    axis: int = 0
    optional: bool = False
    aliases: tuple[str, ...] = ()
    tied_names: tuple[str, ...] = ()


_E = "model.embed_tokens.weight"
_H = "lm_head.weight"

# One row per architecture (config.json "architectures"[0]): (name, kind, optional,
# aliases, tied_names) for each token-indexed weight, as in mergekit 0.1.5's JSONs.
_Row = tuple[str, str, bool, tuple[str, ...], tuple[str, ...]]


def _embed(name: str = _E, aliases: tuple[str, ...] = ()) -> _Row:
    return (name, "embed", False, aliases, ())


def _head(name: str = _H, *, optional: bool = True, tied: tuple[str, ...] = (_E,)) -> _Row:
    return (name, "lm_head", optional, (), tied)


_TIED = (_embed(), _head())
_ARCHITECTURES: dict[str, tuple[_Row, ...]] = {
    **dict.fromkeys(
        [
            "LlamaForCausalLM",
            "LLaMaForCausalLM",
            "MistralForCausalLM",
            "MixtralForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
            "Qwen3MoeForCausalLM",
            "Gemma2ForCausalLM",
            "Gemma3ForCausalLM",
            "Glm4ForCausalLM",
            "Glm4MoeForCausalLM",
            "GraniteForCausalLM",
            "GraniteMoeHybridForCausalLM",
            "Olmo2ForCausalLM",
            "Phi3SmallForCausalLM",
            "Starcoder2ForCausalLM",
            "ArceeForCausalLM",
            "ApertusForCausalLM",
            "Qwen2VLForConditionalGeneration",
            "Qwen2_5_VLForConditionalGeneration",
        ],
        _TIED,
    ),
    **dict.fromkeys(
        ["CohereForCausalLM", "Cohere2ForCausalLM", "Lfm2ForCausalLM"],
        (_embed(), _head(tied=())),
    ),
    **dict.fromkeys(
        ["BaichuanForCausalLM", "Phi3ForCausalLM", "StableLmForCausalLM"]
        + ["StableLMEpochForCausalLM"],
        (_embed(), _head(optional=False, tied=())),
    ),
    **dict.fromkeys(
        ["GemmaForCausalLM", "LlamaForSequenceClassification"],
        (_embed(),),
    ),
    **dict.fromkeys(
        ["ExaoneForCausalLM", "QWenLMHeadModel"],
        (_embed("transformer.wte.weight"), _head(optional=False, tied=())),
    ),
    **dict.fromkeys(
        ["GPT2ForSequenceClassification", "JAISLMHeadModel"],
        (_embed("transformer.wte.weight"),),
    ),
    "FalconForCausalLM": (
        _embed("transformer.word_embeddings.weight"),
        _head(optional=False, tied=()),
    ),
    "GPT2LMHeadModel": (
        _embed("transformer.wte.weight", ("wte.weight",)),
        _head(tied=("transformer.wte.weight", "wte.weight")),
    ),
    "GPTBigCodeForCausalLM": (
        _embed("transformer.wte.weight"),
        _head(tied=("transformer.wte.weight",)),
    ),
    "GPTNeoXForCausalLM": (
        _embed("gpt_neox.embed_in.weight"),
        _head("embed_out.weight", optional=False, tied=()),
    ),
    "InternLM2ForCausalLM": (
        _embed("model.tok_embeddings.weight"),
        _head("output.weight", tied=("model.tok_embeddings.weight",)),
    ),
    "MambaForCausalLM": (
        _embed("backbone.embeddings.weight"),
        _head(tied=("backbone.embeddings.weight",)),
    ),
    "ChatGLMModel": (
        _embed("transformer.embedding.word_embeddings.weight"),
        _head("transformer.output_layer.weight", optional=False, tied=()),
    ),
    "SolarForCausalLM": (_embed(), _head(tied=("model.lm_head.weight",))),
    "PhiForCausalLM": (
        _embed(),
        _head("lm_head.bias", optional=False, tied=()),
        _head(optional=False, tied=()),
    ),
    "BertForMaskedLM": (
        _embed("bert.embeddings.word_embeddings.weight"),
        _head("cls.predictions.bias", optional=False, tied=()),
        _head("cls.predictions.decoder.weight", tied=("bert.embeddings.word_embeddings.weight",)),
    ),
    **dict.fromkeys(
        ["BertForSequenceClassification", "BertForMultipleChoice", "BertForTokenClassification"],
        (_embed("bert.embeddings.word_embeddings.weight"),),
    ),
    "BertModel": (
        _embed("embeddings.word_embeddings.weight", ("bert.embeddings.word_embeddings.weight",)),
    ),
    "RobertaForMaskedLM": (
        _embed("roberta.embeddings.word_embeddings.weight"),
        _head("lm_head.bias", optional=False, tied=()),
        _head("lm_head.decoder.weight", tied=("roberta.embeddings.word_embeddings.weight",)),
    ),
    **dict.fromkeys(
        ["RobertaModel", "RobertaForSequenceClassification", "RobertaForTokenClassification"],
        (_embed("roberta.embeddings.word_embeddings.weight"),),
    ),
    "DistilBertForMaskedLM": (
        _embed("distilbert.embeddings.word_embeddings.weight"),
        _head("vocab_projector.weight", tied=("distilbert.embeddings.word_embeddings.weight",)),
        _head("vocab_projector.bias", optional=False, tied=()),
    ),
    **dict.fromkeys(
        [
            "DistilBertModel",
            "DistilBertForSequenceClassification",
            "DistilBertForTokenClassification",
        ],
        (_embed("distilbert.embeddings.word_embeddings.weight"),),
    ),
    "T5ForConditionalGeneration": (
        _embed("shared.weight"),
        (
            "encoder.embed_tokens.weight",
            "embed",
            True,
            (),
            ("shared.weight", "lm_head.weight", "decoder.embed_tokens.weight"),
        ),
        (
            "decoder.embed_tokens.weight",
            "embed",
            True,
            (),
            ("shared.weight", "lm_head.weight", "encoder.embed_tokens.weight"),
        ),
        _head(tied=("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")),
    ),
    **dict.fromkeys(
        [
            "Gemma3ForConditionalGeneration",
            "Llama4ForConditionalGeneration",
            "Mistral3ForConditionalGeneration",
        ],
        (
            _embed("language_model." + _E),
            _head("language_model." + _H, tied=("language_model." + _E,)),
        ),
    ),
    **dict.fromkeys(
        ["Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"],
        (
            _embed("model.language_model.embed_tokens.weight"),
            _head(tied=("model.language_model.embed_tokens.weight",)),
        ),
    ),
}
# mergekit's "phi-msft" PhiForCausalLM (the pre-transformers Phi-2 code) names them otherwise.
_BY_MODEL_TYPE: dict[tuple[str, str], tuple[_Row, ...]] = {
    ("PhiForCausalLM", "phi-msft"): (
        _embed("transformer.embd.wte.weight"),
        _head("lm_head.linear.bias", optional=False, tied=()),
        _head("lm_head.linear.weight", optional=False, tied=()),
    ),
}
#: Architectures whose vocabulary size is not the top-level ``vocab_size``.
_VOCAB_SIZE_KEYS = dict.fromkeys(
    [
        "Gemma3ForConditionalGeneration",
        "Llama4ForConditionalGeneration",
        "Mistral3ForConditionalGeneration",
        "Qwen3VLForConditionalGeneration",
    ],
    "text_config.vocab_size",
)
# Unknown architectures: the usual module names of token embeddings and output heads.
_EMBED_MODULES = ("embed_tokens", "tok_embeddings", "word_embeddings", "wte", "embed_in")
_HEAD_MODULES = ("lm_head", "embed_out", "output_layer")


def _architecture(config: Mapping[str, Any]) -> tuple[str, str]:
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 else ""
    return str(arch), str(config.get("model_type") or "")


def _guess(names: list[str]) -> list[VocabTensor]:
    """Token-indexed tensors of an architecture fastmerge has no table for, by the
    usual module names (the head tied to the first embedding found)."""

    def module(n: str) -> tuple[str, str]:  # ("lm_head", "weight") for "lm_head.weight"
        parts = n.split(".")
        return (parts[-2], parts[-1]) if len(parts) >= 2 else ("", n)

    embeds = [
        n
        for n in names
        if n == "shared.weight" or module(n) in [(m, "weight") for m in _EMBED_MODULES]
    ]
    out = [VocabTensor(n, "embed") for n in embeds]
    for n in names:
        mod, param = module(n)
        if n == "output.weight" or (mod in _HEAD_MODULES and param in ("weight", "bias")):
            weight = param == "weight"  # a bias is never tied
            tied = tuple(embeds[:1]) if weight else ()
            out.append(VocabTensor(n, "lm_head", optional=weight, tied_names=tied))
    return out


def embedding_names(names: Iterable[str], config: Mapping[str, Any]) -> dict[str, VocabTensor]:
    """The token-indexed tensors among `names` (pass the union of the input models'
    tensor names) for a model of `config` (its ``config.json`` as a dict), keyed by the
    output name: those whose name or an alias is in `names`.

    Known architectures use mergekit 0.1.5's tables; others are recognized by the usual
    module names (``embed_tokens``, ``wte``, ``word_embeddings``, ``lm_head``, ...).

    Example:
        >>> cfg = {"architectures": ["GPT2LMHeadModel"]}
        >>> sorted(embedding_names(["wte.weight", "h.0.attn.c_attn.weight"], cfg))
        ['transformer.wte.weight']
    """
    names = list(dict.fromkeys(names))
    present = set(names)
    key = _architecture(config)
    rows = _BY_MODEL_TYPE.get(key) or _ARCHITECTURES.get(key[0])
    if rows is None:
        found = _guess(names)
    else:
        found = [VocabTensor(n, kind, 0, opt, al, tied) for n, kind, opt, al, tied in rows]
    return {v.name: v for v in found if v.name in present or present.intersection(v.aliases)}


def tensor_source(info: VocabTensor, names: Container[str]) -> Optional[str]:
    """The name one model's checkpoint (tensor names `names`) provides `info` under, as
    mergekit resolves it: the name, else an alias, else a tied tensor; None if none.

    Example:
        >>> head = VocabTensor("lm_head.weight", "lm_head", optional=True,
        ...                    tied_names=("model.embed_tokens.weight",))
        >>> tensor_source(head, ["lm_head.weight"]), tensor_source(head, [])
        ('lm_head.weight', None)
    """
    for name in (info.name, *info.aliases, *info.tied_names):
        if name in names:
            return name
    return None


def vocab_size_key(config: Mapping[str, Any]) -> str:
    """The (dotted) ``config.json`` key of the vocabulary size.

    Example:
        >>> vocab_size_key({"architectures": ["Gemma3ForConditionalGeneration"]})
        'text_config.vocab_size'
    """
    return _VOCAB_SIZE_KEYS.get(_architecture(config)[0], "vocab_size")


def config_value(config: Any, key: str) -> Any:
    """``config[key]`` for a dotted key, on a dict or a transformers config (None if
    absent).

    Example:
        >>> config_value({"text_config": {"vocab_size": 7}}, "text_config.vocab_size")
        7
    """
    value = config
    for part in key.split("."):
        if isinstance(value, Mapping):
            value = value.get(part)
        else:
            value = getattr(value, part, None)
        if value is None:
            return None
    return value


LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowOverride:
    """A ``tokenizer: tokens:`` entry resolved against the models: where the row of
    `token` comes from when a model lacks it (or always, with `force`).

    ``source``: ``"zero"``; ``"row"`` (model `model`'s own row of the token); ``"index"``
    (row `row` of model `model`'s tensor, any row, padding included); None (none given).
    ``key`` is the configuration key, for messages.
    """

    token: str
    force: bool = False
    source: Optional[str] = None
    model: Optional[int] = None
    row: Optional[int] = None
    key: str = "tokenizer.tokens"


def _views(tensors: Sequence[Optional[torch.Tensor]], axis: int, name: str) -> dict:
    views = {i: t.movedim(axis, 0) for i, t in enumerate(tensors) if t is not None}
    shapes = {i: tuple(t.shape) for i, t in enumerate(tensors) if t is not None}
    first = next(iter(views.values()))
    for i, v in views.items():
        if v.ndim == 0 or v.shape[0] == 0:
            raise CheckpointError(f"{name} of model {i}: no rows along axis {axis} {shapes[i]}")
        if v.shape[1:] != first.shape[1:]:
            raise CheckpointError(
                f"{name}: the non-vocabulary dimensions differ between the models: {shapes}"
            )
    return views


def align_rows(
    tensors: Sequence[Optional[torch.Tensor]],
    index_maps: Sequence[torch.Tensor],
    *,
    vocab_size: int,
    base: Optional[int],
    overrides: Mapping[int, RowOverride],
    name: str = "embedding",
    axis: int = 0,
) -> list[Optional[torch.Tensor]]:
    """Each model's token-indexed tensor re-indexed to the output vocabulary, with the
    rows a model lacks filled as mergekit 0.1.5's ``PermutedVocabulary`` does.

    `index_maps[i][t]` is the row of output token ``t`` in model i's tensor, -1 where
    model i lacks the token. Models whose tensor is None take no part (as in mergekit,
    where they are absent from the gathered tensors). For a token some models lack (and
    every token of `overrides` with ``force``), the fill row is: the override's source;
    else the only model's row when one model has it; else zeros when none has it; else
    the base's row when the base has it; else the mean of the rows of the models that
    have it. Models having the token keep their own row unless it is forced. Rows past
    the tokens (``vocab_size`` padding) are each model's mean row.

    Example:
        >>> a, b = torch.tensor([[1.0], [2.0]]), torch.tensor([[5.0]])
        >>> maps = [torch.tensor([0, 1]), torch.tensor([0, -1])]
        >>> [t.flatten().tolist() for t in align_rows([a, b], maps, vocab_size=3,
        ...                                           base=None, overrides={})]
        [[1.0, 2.0, 1.5], [5.0, 2.0, 3.5]]
    """
    if all(t is None for t in tensors):
        return list(tensors)
    views = _views(tensors, axis, name)
    present = list(views)
    first = views[present[0]]
    dtype = first.dtype
    for v in views.values():
        dtype = torch.promote_types(dtype, v.dtype)
    device, rest = first.device, tuple(first.shape[1:])
    maps = {i: index_maps[i].to(device) for i in present}
    n = int(maps[present[0]].numel())
    for i in present:
        top = int(maps[i].max()) if n else -1
        if top >= views[i].shape[0]:
            raise CheckpointError(
                f"{name} of model {i}: {views[i].shape[0]} rows, but its vocabulary has "
                f"token ids up to {top}"
            )

    has = torch.stack([maps[i] >= 0 for i in present])  # (models, tokens)
    count = has.sum(0)
    forced = torch.zeros(n, dtype=torch.bool, device=device)
    configured = torch.zeros_like(forced)
    for tid, ov in overrides.items():
        configured[tid] = True
        forced[tid] = ov.force
    need = forced | (count < len(present))
    auto = need & ~configured
    # The fill rows, one per token in `need` (`pos` maps a token id to its fill row).
    need_ids = need.nonzero().flatten()
    pos = torch.full((n,), -1, dtype=torch.long, device=device)
    pos[need_ids] = torch.arange(need_ids.numel(), device=device)
    fill = torch.zeros((need_ids.numel(), *rest), dtype=dtype, device=device)

    def rows(i: int, ids: torch.Tensor) -> torch.Tensor:  # model i's rows of tokens `ids`
        # index_select/index_copy_: several times faster than advanced indexing on CPU
        return views[i].index_select(0, maps[i][ids]).to(dtype)

    def take(i: int, mask: torch.Tensor) -> None:  # fill[mask] = model i's own rows
        ids = (mask & (maps[i] >= 0)).nonzero().flatten()
        fill.index_copy_(0, pos[ids], rows(i, ids))

    single = auto & (count == 1)
    for i in present:  # exactly one model has these: that model's row
        take(i, single)
    average = auto & (count >= 2)
    if base in views:
        base_rows = average & has[present.index(base)]
        take(base, base_rows)
        average &= ~base_rows
    avg_ids = average.nonzero().flatten()
    for i in present:  # summed in model order, then divided, as mergekit does
        ids = avg_ids[maps[i][avg_ids] >= 0]
        fill.index_add_(0, pos[ids], rows(i, ids))
    if avg_ids.numel():
        shape = (-1,) + (1,) * len(rest)
        fill[pos[avg_ids]] = fill[pos[avg_ids]] / count[avg_ids].reshape(shape)
    for tid, ov in overrides.items():
        if bool(need[tid]):
            fill[pos[tid]] = _override_row(ov, views, maps, tid, name)
    missing = auto & (count == 0)  # warned only now: an error above is the only line
    if bool(missing.any()):
        LOG.warning("%s: %d tokens are in no model; their rows are zero", name, int(missing.sum()))

    out = []
    for i, t in enumerate(tensors):
        if t is None:
            out.append(None)
            continue
        res = torch.empty((vocab_size, *rest), dtype=dtype, device=device)  # all written
        keep = (maps[i] >= 0) & ~forced
        ids = keep.nonzero().flatten()
        res.index_copy_(0, ids, rows(i, ids))
        other = (~keep).nonzero().flatten()
        res.index_copy_(0, other, fill.index_select(0, pos[other]))
        if vocab_size > n:  # padding rows: the mean row (mergekit, after J. Hewitt)
            res[n:] = torch.mean(res[:n], dim=0)
        out.append(res.movedim(0, axis))
    return out


def _token(ov: RowOverride) -> str:
    """The override's token for a message, never long."""
    text = repr(ov.token)
    return text if len(text) <= 60 else text[:57] + "..."


def _override_row(ov: RowOverride, views: dict, maps: dict, tid: int, name: str) -> torch.Tensor:
    where = f"{ov.key}.source"
    if ov.source == "zero":
        return torch.zeros(next(iter(views.values())).shape[1:])
    if ov.source is None:
        raise ConfigError(
            f"{where}: token {_token(ov)} is missing from some model's {name} (or force is "
            "set), so it needs a source (a model, {kind: model_token, ...} or {kind: zero})"
        )
    if ov.model not in views:
        raise CheckpointError(
            f"{where}: token {_token(ov)} needs the {name} of model {ov.model}, which it lacks"
        )
    view = views[ov.model]
    if ov.source == "index":
        if not 0 <= ov.row < view.shape[0]:
            raise CheckpointError(
                f"{where}: row {ov.row} is out of range for the {name} of model {ov.model} "
                f"({view.shape[0]} rows)"
            )
        return view[ov.row]
    row = int(maps[ov.model][tid])
    if row < 0:
        raise ConfigError(f"{where}: model {ov.model} does not have token {_token(ov)}")
    return view[row]
