"""The output vocabulary: mergekit 0.1.5's ``tokenizer_source``, ``tokenizer:`` block and
``chat_template``, and the re-indexing of each model's embeddings and LM heads to it.

The YAML keys (:func:`parse_tokenizer_settings`)::

    tokenizer_source: union          # or base, or a model; the legacy form of:
    tokenizer:
      source: union                  # default union
      pad_to_multiple_of: 64         # output rows rounded up; the extra rows: the mean row
      tokens:
        <|im_start|>:                # added to the vocabulary when no source has it
          source: ./chat-model       # that model's row for this token
        <|im_end|>:
          source: {kind: model_token, model: ./chat-model, token: </s>}  # or token_id: 2
          force: true                # this row for every model, even those having the token
        <pad>: {source: {kind: zero}}
    chat_template: chatml            # mergekit's built-in name, auto, or a Jinja template

:func:`plan_vocabulary` loads the models' tokenizers (local files only) and builds the
output tokenizer: the base's (its tokens past the model's ``vocab_size`` stripped), a
named model's, or the union: the base's tokens, then the other models' plain tokens it
lacks (model order, then id order), then every model's added tokens it lacks (same
order). :meth:`VocabularyPlan.align` re-indexes each model's token-indexed tensors; a
token a model lacks gets the override's row, else the only model's row, else the base's
row, else the mean of the models having it (:func:`.vocab_tensors.align_rows`).
:meth:`VocabularyPlan.save` writes the tokenizer and the chat template.

Example:
    >>> s = parse_tokenizer_settings({"tokenizer": {"pad_to_multiple_of": 8}}, "cfg.yaml")
    >>> s.source, s.pad_to_multiple_of, s.aligns_vocabulary
    ('union', 8, True)
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..io import CheckpointError
from .errors import ConfigError
from .vocab_tensors import (
    RowOverride,
    VocabTensor,
    align_rows,
    config_value,
    embedding_names,
    tensor_source,
    vocab_size_key,
)

__all__ = [
    "ModelEmbedding",
    "ModelTokenEmbedding",
    "TokenOverride",
    "TokenizerSettings",
    "VocabTensor",
    "VocabularyPlan",
    "ZeroEmbedding",
    "builtin_chat_templates",
    "embedding_names",
    "parse_tokenizer_settings",
    "plan_vocabulary",
    "tensor_source",
]

LOG = logging.getLogger(__name__)

#: mergekit 0.1.5's built-in chat templates (read from an installed mergekit's data).
BUILTIN_CHAT_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
#: The largest ``pad_to_multiple_of``: every embedding and LM head gets up to this many
#: rows more (mergekit has no bound; 10**9 would make gigabytes of padding rows).
MAX_PAD_TO_MULTIPLE_OF = 65536


@dataclass(frozen=True)
class ZeroEmbedding:
    """``source: {kind: zero}``: a row of zeros."""


@dataclass(frozen=True)
class ModelEmbedding:
    """``source: <model>``: that model's own row of the token."""

    model: str


@dataclass(frozen=True)
class ModelTokenEmbedding:
    """``source: {kind: model_token, model: <model>, token: <t> | token_id: <i>}``: the
    row of another token (or any row, padding included) of that model."""

    model: str
    token_id: Optional[int] = None
    token: Optional[str] = None


TokenSource = Union[ZeroEmbedding, ModelEmbedding, ModelTokenEmbedding, None]


@dataclass(frozen=True)
class TokenOverride:
    """A ``tokenizer: tokens:`` entry: where the token's row comes from when a model
    lacks it, and with `force`, for every model."""

    source: TokenSource = None
    force: bool = False


@dataclass
class TokenizerSettings:
    """What the YAML says about the vocabulary.

    ``source``: None (keep the models' vocabulary, no re-indexing), ``"base"``,
    ``"union"`` or a model reference. ``key``: the key it came from (``tokenizer_source``
    or ``tokenizer.source``), ``where``: the configuration's name, both for messages.
    """

    source: Optional[str] = None
    tokens: dict[str, TokenOverride] = field(default_factory=dict)
    pad_to_multiple_of: Optional[int] = None
    chat_template: Optional[str] = None
    key: str = "tokenizer_source"
    where: str = "config"

    @property
    def aligns_vocabulary(self) -> bool:
        """Whether the embeddings are re-indexed to a built vocabulary."""
        return self.source is not None


# ---- parsing -----------------------------------------------------------------------------
def _shown(value: Any) -> str:
    """A value for an error message, never long (a YAML alias can expand to gigabytes)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 192:
        return f"an integer of {value.bit_length()} bits"  # repr is refused past 4300 digits
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else None
    text = text if text is not None else f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(where: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {key}: {message}")


def _unicode(text: str) -> bool:
    """Whether `text` can be written (YAML's "\\ud800" makes a lone surrogate, which
    no file, tokenizer or path takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _model_ref(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, key, f"must be a model path or hub id (a string), got {_shown(value)}")
    if "+" in value:
        raise _fail(where, key, f"LoRA references (model+lora) are not supported: {_shown(value)}")
    # what cannot be a path or a hub id (and makes os.stat raise): the checks of
    # fastmerge.engine.config.model_reference
    if "\0" in value or len(value) > 4096:
        raise _fail(where, key, f"{_shown(value)} is not a possible model path or hub id")
    if not _unicode(value) or any(len(p) > 255 for p in value.encode("utf-8").split(b"/")):
        raise _fail(where, key, f"{_shown(value)} is not a possible model path or hub id")
    return value


def _source(value: Any, where: str, key: str) -> str:
    if value in ("base", "union"):
        return value
    return _model_ref(value, where, key)


def _token_source(value: Any, where: str, key: str) -> TokenSource:
    if value is None:
        return None
    if isinstance(value, str):
        return ModelEmbedding(_model_ref(value, where, key))
    if not isinstance(value, Mapping):
        raise _fail(where, key, "must be a model, {kind: zero} or {kind: model_token, ...}")
    kind = value.get("kind")
    valid = {None: ("model",), "zero": ("kind",), "model_token": ("kind", "model", "token_id")}
    valid["model_token"] += ("token",)
    if not isinstance(kind, (str, type(None))) or kind not in valid:  # a list is unhashable
        raise _fail(where, key + ".kind", f"must be zero or model_token, got {_shown(kind)}")
    bad = [k for k in value if k not in valid[kind]]
    if bad:
        raise _fail(
            where, key, f"unknown key {_shown(bad[0])}; valid keys: {', '.join(valid[kind])}"
        )
    if kind == "zero":
        return ZeroEmbedding()
    model = _model_ref(value.get("model"), where, key + ".model")
    if kind is None:
        return ModelEmbedding(model)
    token_id, token = value.get("token_id"), value.get("token")
    if (token_id is None) == (token is None):
        raise _fail(where, key, "give exactly one of token_id and token")
    if token_id is not None and (type(token_id) is not int or not 0 <= token_id < 2**63):
        raise _fail(where, key + ".token_id", f"must be an integer >= 0, got {_shown(token_id)}")
    if token is not None and not isinstance(token, str):
        raise _fail(where, key + ".token", f"must be a string, got {_shown(token)}")
    return ModelTokenEmbedding(model, token_id, token)


def _tokens(value: Any, where: str) -> dict[str, TokenOverride]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(where, "tokenizer.tokens", "must be a mapping of token -> {source, force}")
    out = {}
    for tok, entry in value.items():
        if not isinstance(tok, str) or not tok:
            raise _fail(where, "tokenizer.tokens", f"token {_shown(tok)} is not a non-empty string")
        if not _unicode(tok):
            raise _fail(where, "tokenizer.tokens", f"token {_shown(tok)} is not valid Unicode text")
        key = f"tokenizer.tokens.{tok if len(tok) <= 60 else tok[:57] + '...'}"
        if not isinstance(entry, Mapping):
            raise _fail(where, key, "must be a mapping with source and/or force")
        bad = [k for k in entry if k not in ("source", "force")]
        if bad:
            raise _fail(where, key, f"unknown key {_shown(bad[0])}; valid keys: source, force")
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise _fail(where, key + ".force", f"must be true or false, got {_shown(force)}")
        out[tok] = TokenOverride(_token_source(entry.get("source"), where, key + ".source"), force)
    return out


def builtin_chat_templates() -> dict[str, Path]:
    """mergekit's built-in chat templates by name, from an installed mergekit (fastmerge
    does not ship them); empty without mergekit.

    Example:
        >>> sorted(builtin_chat_templates())  # doctest: +SKIP
        ['alpaca', 'chatml', 'exaone', 'llama3', 'mistral']
    """
    try:
        spec = importlib.util.find_spec("mergekit")
    except (ImportError, ValueError):
        return {}
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(list(spec.submodule_search_locations)[0]) / "_data" / "chat_templates"
    return {p.stem: p for p in sorted(folder.glob("*.jinja"))} if folder.is_dir() else {}


def _chat_template(value: Any, where: str) -> Optional[str]:
    # mergekit's rule: a short one-line string without "{" names a built-in template; a
    # literal template must contain "{" and be at least 20 characters.
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _fail(where, "chat_template", f"must be a string, got {type(value).__name__}")
    if not _unicode(value):
        raise _fail(where, "chat_template", "must be valid Unicode text (it has a lone surrogate)")
    if value == "auto":
        return value
    if len(value) < 256 and "\n" not in value and "{" not in value:
        builtins = builtin_chat_templates()
        if value in builtins:
            return value
        if value in BUILTIN_CHAT_TEMPLATES:
            raise _fail(
                where,
                "chat_template",
                f"{value!r} is one of mergekit's built-in templates, which fastmerge reads "
                "from an installed mergekit (pip install mergekit); or give the Jinja text",
            )
        names = ", ".join(sorted(builtins) or BUILTIN_CHAT_TEMPLATES)
        raise _fail(
            where,
            "chat_template",
            f"{value!r} is neither a built-in template ({names}, auto) nor a Jinja template",
        )
    if len(value) < 20 or "{" not in value:
        raise _fail(where, "chat_template", "a Jinja template has '{' and 20 characters or more")
    return value


def parse_tokenizer_settings(raw: Mapping[str, Any], where: str) -> Optional[TokenizerSettings]:
    """The vocabulary settings of a merge configuration (top-level ``tokenizer_source``,
    ``tokenizer`` and ``chat_template``); None when it has none of them. Other keys of
    `raw` are left to the caller.

    Raises:
        ConfigError: naming the key (``cfg.yaml: tokenizer.tokens.<tok>.source: ...``):
            both ``tokenizer_source`` and ``tokenizer``, a bad type or value, an unknown
            key, an unknown built-in chat template.

    Example:
        >>> s = parse_tokenizer_settings({"tokenizer_source": "./m", "chat_template": "auto"}, "c")
        >>> s.source, s.key, s.chat_template
        ('./m', 'tokenizer_source', 'auto')
        >>> parse_tokenizer_settings({"tokenizer": {"pad_to_multiple_of": -8}}, "c")
        Traceback (most recent call last):
        ...
        fastmerge.engine.errors.ConfigError: c: tokenizer.pad_to_multiple_of: must be ...
    """
    legacy, block = raw.get("tokenizer_source"), raw.get("tokenizer")
    chat = _chat_template(raw.get("chat_template"), where)
    if legacy is None and block is None and chat is None:
        return None
    if legacy is not None and block is not None:
        raise ConfigError(
            f"{where}: tokenizer_source and tokenizer: give only one (tokenizer.source "
            "replaces tokenizer_source)"
        )
    settings = TokenizerSettings(chat_template=chat, where=where)
    if legacy is not None:
        settings.source = _source(legacy, where, "tokenizer_source")
        return settings
    if block is None:
        return settings
    if not isinstance(block, Mapping):
        raise _fail(where, "tokenizer", "must be a mapping (source, tokens, pad_to_multiple_of)")
    valid = ("source", "tokens", "pad_to_multiple_of")
    bad = [k for k in block if k not in valid]
    if bad:
        raise _fail(
            where, "tokenizer", f"unknown key {_shown(bad[0])}; valid keys: {', '.join(valid)}"
        )
    settings.key = "tokenizer.source"
    settings.source = _source(block.get("source", "union"), where, "tokenizer.source")
    settings.tokens = _tokens(block.get("tokens"), where)
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (type(pad) is not int or not 0 <= pad <= MAX_PAD_TO_MULTIPLE_OF):
        raise _fail(
            where,
            "tokenizer.pad_to_multiple_of",
            f"must be an integer in [0, {MAX_PAD_TO_MULTIPLE_OF}] (0: none), got {_shown(pad)}",
        )
    settings.pad_to_multiple_of = pad or None  # 0: no padding, as in mergekit
    return settings


# ---- tokenizers ---------------------------------------------------------------------------
def _load_tokenizer(path: Path, trust_remote_code: bool) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # an optional dependency of fastmerge
        raise ConfigError(
            "tokenizer_source/tokenizer/chat_template need the transformers package"
        ) from exc
    if not path.is_dir():  # never let transformers take a missing path for a hub id
        raise CheckpointError(f"{path}: not a model directory (its tokenizer is needed)")
    try:  # a local directory: nothing is downloaded (local_files_only would be saved too)
        return AutoTokenizer.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, use_fast=True
        )
    except Exception as exc:  # transformers raises many kinds (OSError, ValueError, ...)
        msg = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"{path}: no usable tokenizer ({type(exc).__name__}: {msg})"
        ) from None


def _model_config(path: Path, trust_remote_code: bool) -> tuple[Optional[int], str]:
    """The model's vocabulary size (``vocab_size``, or its architecture's key) from its
    config as transformers reads it (with its class defaults), and that key."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, local_files_only=True
        )
        key = vocab_size_key({"architectures": cfg.architectures, "model_type": cfg.model_type})
        size = config_value(cfg, key)
    except Exception:  # mergekit falls back to the tokenizer's size too
        try:
            raw = json.loads((path / "config.json").read_text())
            key = vocab_size_key(raw)
            size = config_value(raw, key)
        except (OSError, ValueError):
            return None, "vocab_size"
    return (size if type(size) is int and size > 0 else None), key


def _strip(tok: Any, limit: int, path: Path) -> Any:
    """`tok` without the tokens whose id is >= `limit` (the model's ``vocab_size``), as
    mergekit does for the base: only a BPE fast tokenizer can be edited."""
    unused = {t for t, i in tok.get_vocab().items() if i >= limit}
    if not unused:
        return tok
    if not tok.is_fast:
        raise CheckpointError(f"{path}: tokens past vocab_size {limit} need a fast tokenizer")
    from tokenizers import Tokenizer

    data = json.loads(tok.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise CheckpointError(
            f"{path}: the tokenizer has tokens past vocab_size {limit}; only a BPE tokenizer "
            f"can be trimmed, not {data['model']['type']}"
        )
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < limit]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(parts, list) or len(parts) != 2:
            raise CheckpointError(f"{path}: unexpected BPE merge {merge!r}")
        return not unused.intersection(parts)

    data["model"]["merges"] = [m for m in data["model"].get("merges", []) if keep(m)]
    # transformers has no public way to swap the backend; mergekit sets it the same way.
    tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tok


def _copy_tokenizer(tok: Any, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:  # a copy as it will be saved and reloaded
        tok.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(
            tmp, use_fast=True, trust_remote_code=trust_remote_code
        )


def _union(base: Any, members: list[tuple[Any, int]], trust_remote_code: bool) -> Any:
    """The base tokenizer plus every token of `members` (tokenizer, vocabulary size;
    the base first) it lacks: plain tokens in member order and id order, then the added
    tokens (the first member's settings win) in member order and id order."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, limit in members:
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < limit:
                plain.setdefault(t)
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i >= limit:
                continue
            if info.content in added and added[info.content] != info:
                LOG.warning("token %r is added with different settings; the first is used", info)
            added.setdefault(info.content, info)
    out = _copy_tokenizer(base, trust_remote_code)
    base_vocab = base.get_vocab()
    new = [t for t in plain if t not in added and t not in base_vocab]
    if new:
        out.add_tokens(new)
    if added:
        out.add_tokens(list(added.values()))
    return out


def _same(a: Any, b: Any) -> bool:
    if str(a) == str(b):
        return True
    try:
        return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def _template_of(tok: Any) -> Optional[str]:
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def _resolve_chat_template(value: Optional[str], tokenizers: Sequence[Any]) -> Optional[str]:
    """The template text: a built-in's file, a literal, or with ``auto`` the most common
    template of `tokenizers` (the first among equals; None when none has one)."""
    if value is None:
        return None
    if value == "auto":
        found = [t for t in map(_template_of, tokenizers) if t is not None]
        return Counter(found).most_common(1)[0][0] if found else None
    builtins = builtin_chat_templates()
    return builtins[value].read_text() if value in builtins else value


# ---- the plan ---------------------------------------------------------------------------
@dataclass
class VocabularyPlan:
    """The output tokenizer and, per model, where each output token's row is.

    ``vocab``: the output vocabulary, token -> id (in id order). ``index_maps[i][t]``: the
    row of output token ``t`` in model i's tensors (-1: model i lacks it).
    ``vocab_size``: output rows (``pad_to_multiple_of`` applied); None when ``permutes``
    is False (only a chat template is set: tensors are merged as they are and only the
    tokenizer is written). ``base_index``: the model whose row fills a token others lack
    (mergekit's ``base_model``; None without one).
    """

    models: list[Path]
    tokenizer: Any
    permutes: bool
    vocab_size: Optional[int] = None
    index_maps: list[torch.Tensor] = field(default_factory=list)
    base_index: Optional[int] = None
    overrides: dict[int, RowOverride] = field(default_factory=dict)
    chat_template: Optional[str] = None
    vocab_size_key: str = "vocab_size"
    vocab: dict[str, int] = field(default_factory=dict)

    def align(
        self, tensors: Sequence[Optional[torch.Tensor]], kind: str = "embed", *, axis: int = 0
    ) -> list[Optional[torch.Tensor]]:
        """Each model's token-indexed tensor (``tensors[i]``: model i's, in the order of
        ``models``; None where a model lacks it) re-indexed to the output vocabulary,
        ``vocab_size`` along `axis`; merge the results row by row. The fill rules are
        the same for every `kind` (``"embed"``, ``"lm_head"``: used in messages).

        Example:
            >>> plan = VocabularyPlan([Path("a"), Path("b")], None, True, 3,
            ...                       [torch.tensor([0, 1]), torch.tensor([0, -1])])
            >>> a, b = torch.ones(2, 4), torch.zeros(1, 4)
            >>> [tuple(t.shape) for t in plan.align([a, b])]
            [(3, 4), (3, 4)]
        """
        if len(tensors) != len(self.models):
            raise ValueError(f"{len(tensors)} tensors for {len(self.models)} models")
        if not self.permutes:
            return list(tensors)
        return align_rows(
            tensors,
            self.index_maps,
            vocab_size=self.vocab_size,
            base=self.base_index,
            overrides=self.overrides,
            name=kind,
            axis=axis,
        )

    def save(self, directory: Union[str, Path]) -> list[Path]:
        """Write the output tokenizer (with its chat template) into `directory` and
        return the files written (``tokenizer.json``, ``tokenizer_config.json``,
        ``chat_template.jinja``, ... as transformers saves them).

        Example:
            >>> files = plan.save(out_dir)  # doctest: +SKIP
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = self.tokenizer.save_pretrained(str(directory))
        return sorted({Path(f) for f in written if Path(f).is_file()})

    def update_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """`config` (a ``config.json`` dict) with the output vocabulary size set (under
        ``text_config`` for the architectures keeping it there); unchanged when the plan
        does not re-index.

        Example:
            >>> VocabularyPlan([], None, True, 64).update_config({"vocab_size": 50})
            {'vocab_size': 64}
        """
        if not self.permutes:
            return config
        node = config
        *parents, last = self.vocab_size_key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = self.vocab_size
        return config


def plan_vocabulary(
    models: Sequence[Union[str, Path]],
    base_index: Optional[int],
    settings: Optional[TokenizerSettings],
    *,
    references: Optional[Sequence[Optional[str]]] = None,
    trust_remote_code: bool = False,
    missing_tokenizer: str = "error",
) -> Optional[VocabularyPlan]:
    """Build the output vocabulary of a merge of `models` (model directories, the
    engine's order; `base_index`: the configuration's ``base_model`` among them, or None).

    None when `settings` ask for nothing (no tokenizer source, no chat template). Model
    references in `settings` are matched against `references` (each model's spelling in
    the YAML, when it differs from its directory) and the directories; a
    ``tokenizer_source`` naming another local directory takes its tokenizer from there,
    as mergekit does. `missing_tokenizer`: ``"error"`` when a model (not the base) has no
    tokenizer, or ``"base"`` to take it to have the base's vocabulary (mergekit's way).

    Raises:
        CheckpointError: a tokenizer that cannot be read (naming the model directory).
        ConfigError: a model reference of `settings` that is no model of the merge, an
            override without the source it needs.

    Example:
        >>> plan = plan_vocabulary(["./base", "./chat"], 0,
        ...                        parse_tokenizer_settings({"tokenizer_source": "union"}, "c"))
        ... # doctest: +SKIP
        >>> merged = sum(w * t for w, t in zip([0.5, 0.5], plan.align([emb_a, emb_b])))
        ... # doctest: +SKIP
    """
    if settings is None or (settings.source is None and settings.chat_template is None):
        return None
    if missing_tokenizer not in ("error", "base"):
        raise ValueError(f"missing_tokenizer must be 'error' or 'base', not {missing_tokenizer!r}")
    paths = [Path(m) for m in models]
    if not paths:
        raise ConfigError(f"{settings.where}: no models")
    if base_index is not None and not 0 <= base_index < len(paths):
        raise ValueError(f"base_index {base_index} is not in range for {len(paths)} models")
    refs = list(references) if references is not None else [None] * len(paths)
    where, donor = settings.where, base_index if base_index is not None else 0

    def find(ref: str) -> Optional[int]:
        return next(
            (i for i, p in enumerate(paths) if _same(ref, p) or (refs[i] and _same(ref, refs[i]))),
            None,
        )

    if settings.source is None:  # a chat template only: the donor's tokenizer, reserialized
        out = _load_tokenizer(paths[donor], trust_remote_code)
        plan = VocabularyPlan(paths, out, False, base_index=base_index, vocab=_by_id(out))
        auto = settings.chat_template == "auto"
        _apply_template(plan, settings, _soft_load(paths, trust_remote_code) if auto else [])
        return plan

    sizes = [_model_config(p, trust_remote_code) for p in paths]
    base_tok = _load_tokenizer(paths[donor], trust_remote_code)
    base_tok = _strip(base_tok, sizes[donor][0] or len(base_tok.get_vocab()), paths[donor])
    toks: list[Optional[Any]] = []
    for i, p in enumerate(paths):
        if i == donor:
            toks.append(base_tok)
            continue
        try:
            toks.append(_load_tokenizer(p, trust_remote_code))
        except CheckpointError:
            if missing_tokenizer == "error":
                raise
            LOG.warning("%s: no tokenizer; taken to have the vocabulary of %s", p, paths[donor])
            toks.append(None)
    source = settings.source
    if source == "base":
        out = base_tok
    elif source == "union":
        order = [donor] + [i for i in range(len(paths)) if i != donor and toks[i] is not None]
        members = [(toks[i], sizes[i][0] or toks[i].vocab_size) for i in order]
        out = _union(base_tok, members, trust_remote_code)
    else:
        idx = find(source)
        if idx is None and not Path(source).expanduser().is_dir():
            raise _fail(where, settings.key, f"{_shown(source)} is not a model of this merge")
        origin = paths[idx] if idx is not None else Path(source).expanduser()
        out = _load_tokenizer(origin, trust_remote_code)
    existing = set(out.get_vocab())
    for tok in settings.tokens:  # one at a time, in the YAML's order, as mergekit
        if tok not in existing:
            out.add_tokens(tok)
            existing.add(tok)
    # Read after the additions, as mergekit: with `source: base` the output tokenizer *is*
    # the base's, so a token added by `tokens:` gets the base's row of its new id when
    # that id is a padding row (below the base's vocab_size; past it, mergekit fails with
    # a KeyError where fastmerge takes the base to lack the token).
    vocabs = [(t if t is not None else base_tok).get_vocab() for t in toks]
    vocab = _by_id(out)
    n = len(vocab)
    if set(vocab.values()) != set(range(n)):
        raise CheckpointError(f"{where}: the output vocabulary's ids are not 0..{n - 1}")
    pad = settings.pad_to_multiple_of
    vocab_size = -(-n // pad) * pad if pad else n
    maps = []
    for (size, _key), mv in zip(sizes, vocabs):
        limit = size or len(mv)  # a token past the model's vocab_size has no row
        ids = [-1] * n
        for t, new in vocab.items():
            old = mv.get(t)
            if old is not None and old < limit:
                ids[new] = old
        maps.append(torch.tensor(ids, dtype=torch.long))
    plan = VocabularyPlan(
        paths, out, True, vocab_size, maps, base_index, vocab_size_key=sizes[donor][1], vocab=vocab
    )
    plan.overrides = _overrides(settings, vocab, vocabs, maps, find)
    _apply_template(plan, settings, [t for t in toks if t is not None])
    return plan


def _by_id(tok: Any) -> dict[str, int]:
    # get_vocab() comes from a Rust hash map, in a different order on every call
    return dict(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]))


def _soft_load(paths: Sequence[Path], trust_remote_code: bool) -> list[Any]:
    """The tokenizers of `paths` that load (mergekit's ``auto`` skips the others)."""
    out = []
    for p in paths:
        try:
            out.append(_load_tokenizer(p, trust_remote_code))
        except CheckpointError as exc:
            LOG.warning("chat_template auto: %s", exc)
    return out


def _apply_template(plan: VocabularyPlan, settings: TokenizerSettings, toks: list[Any]) -> None:
    plan.chat_template = _resolve_chat_template(settings.chat_template, toks)
    if plan.chat_template is not None:  # with auto and no template: the tokenizer's own
        plan.tokenizer.chat_template = plan.chat_template


def _overrides(
    settings: TokenizerSettings,
    vocab: Mapping[str, int],
    vocabs: Sequence[Mapping[str, int]],
    maps: Sequence[torch.Tensor],
    find: Any,
) -> dict[int, RowOverride]:
    """The `tokens:` entries against the models; the errors mergekit would meet while
    merging (a source needed but missing) are raised now."""
    out = {}
    for tok, ov in settings.tokens.items():
        tid = vocab[tok]
        key = f"tokenizer.tokens.{tok if len(tok) <= 60 else tok[:57] + '...'}"
        needed = ov.force or any(int(m[tid]) < 0 for m in maps)
        label = f"{settings.where}: {key}"  # the run's messages name the file too
        row = RowOverride(tok, ov.force, key=label)
        src = ov.source
        if src is None:
            if needed:
                lacking = [str(i) for i, m in enumerate(maps) if int(m[tid]) < 0]
                why = "force is set" if ov.force else f"models {', '.join(lacking)} lack it"
                raise _fail(settings.where, key + ".source", f"needed ({why}) but not given")
        elif isinstance(src, ZeroEmbedding):
            row = RowOverride(tok, ov.force, "zero", key=label)
        else:
            idx = find(src.model)
            if idx is None:
                raise _fail(
                    settings.where,
                    key + ".source",
                    f"{_shown(src.model)} is not a model of this merge",
                )
            if isinstance(src, ModelEmbedding):
                if needed and int(maps[idx][tid]) < 0:
                    raise _fail(
                        settings.where,
                        key + ".source",
                        f"{_shown(src.model)} does not have {_shown(tok)}",
                    )
                row = RowOverride(tok, ov.force, "row", idx, key=label)
            else:
                index = src.token_id
                if src.token is not None:
                    index = vocabs[idx].get(src.token)
                    if index is None and needed:
                        raise _fail(
                            settings.where,
                            key + ".source.token",
                            f"{_shown(src.model)} does not have {_shown(src.token)}",
                        )
                row = RowOverride(
                    tok, ov.force, "index", idx, -1 if index is None else index, label
                )
        out[tid] = row
    return out
