"""The README.md model card of a merged model, laid out as mergekit writes one.

Front matter (``base_model``: the hub repos merged; ``library_name``; ``tags``), then the
merge method with its description and reference, the models merged, and the YAML
configuration that produced the model. Hub repo ids are links to their Hub page; local
paths are plain names. Names are escaped so that no model name or path can change the
card's Markdown; the configuration block is fenced so that no value can close it.

Example:
    >>> card = model_card({"merge_method": "linear"}, method="linear", models=["org/a"],
    ...                   base_model=None, fastmerge_version="1.0")
    >>> for line in card.splitlines()[:10]:
    ...     print(line)
    ---
    base_model:
    - org/a
    base_model_relation: merge
    library_name: transformers
    tags:
    - fastmerge
    - merge
    - mergekit
    ---
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import PurePath
from typing import Any, Optional

import yaml

from .errors import ConfigError
from .hub import HUB_URL, ModelReference, parse_model_reference

__all__ = ["DEFAULT_NAME", "TAGS", "model_card"]

DEFAULT_NAME = "Untitled Model (1)"  # mergekit's default title
TAGS = ["fastmerge", "merge", "mergekit"]
MERGEKIT_URL = "https://github.com/arcee-ai/mergekit"

# Markdown punctuation that can start emphasis, code, links, HTML, tables, strike-through,
# math or a heading's closing sequence anywhere in a line.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&$#!])")
# ... and what starts a block (list, quote, rule) at the start of a line or list item.
_MD_BLOCK_START = re.compile(r"^(\d+)([.)])|^([-+=>])")
_URL = re.compile(r"https?://\S+")


def model_card(
    raw_config: Mapping[str, Any],
    *,
    method: str,
    models: Sequence[str],
    base_model: Optional[str],
    fastmerge_version: str,
    method_description: str = "",
    reference: str = "",
    name: Optional[str] = None,
) -> str:
    """A README.md model card for a merged model, as mergekit writes one.

    Args:
        raw_config: the configuration as read from its YAML (dumped back with
            ``yaml.safe_dump``, key order kept, in a ```` ```yaml ```` block).
        method: the merge method's name (``merge_method``).
        models: the models merged, as references (``org/name[@revision]`` or a path).
        base_model: the base model, named in the method sentence and left out of the list
            of models; None for none. With ``slerp`` it is listed as a merged model (it is
            one end of the interpolation, not a base), as mergekit does.
        fastmerge_version: the fastmerge version that made the merge.
        method_description: a one-line description of the method (Markdown, shown as is).
        reference: the method's paper or page: a URL links the method's name, other text
            (e.g. a citation) is shown on a "Reference:" line.
        name: the card's title; mergekit's ``Untitled Model (1)`` when None.

    Front matter: ``base_model`` lists every hub repo among the models and the base
    (without revisions, each once; omitted when there is none) with
    ``base_model_relation: merge``, ``library_name: transformers`` and
    ``tags: [fastmerge, merge, mergekit]``.

    Example:
        >>> card = model_card(
        ...     {"merge_method": "ties", "base_model": "org/base",
        ...      "models": [{"model": "org/math"}, {"model": "./local_model"}]},
        ...     method="ties", models=["org/math", "./local_model"], base_model="org/base",
        ...     fastmerge_version="1.2.0", reference="https://arxiv.org/abs/2306.01708")
        >>> print(card[card.index("## Merge Details"):card.index("### Configuration")].strip())
        ## Merge Details
        ### Merge Method
        <BLANKLINE>
        This model was merged using the [ties](https://arxiv.org/abs/2306.01708) merge method
        using [org/base](https://huggingface.co/org/base) as a base.
        <BLANKLINE>
        ### Models Merged
        <BLANKLINE>
        The following models were included in the merge:
        * [org/math](https://huggingface.co/org/math)
        * ./local\\_model
    """
    if not isinstance(raw_config, Mapping):
        raise ConfigError(
            f"model card: the configuration must be a mapping, got {type(raw_config).__name__}"
        )
    if isinstance(models, str):
        raise ConfigError("model card: models must be a sequence of references, not a string")
    slerp = method.strip().lower() == "slerp"
    as_base = None if slerp or not base_model else base_model
    merged = _unique([*models, *([base_model] if slerp and base_model else [])])
    merged = [model for model in merged if model != as_base]

    refs = [_reference(text) for text in [*([as_base] if as_base else []), *merged]]
    hub_ids = _unique(
        ref.repo_id for top in refs if top is not None for ref in _parts(top) if ref.repo_id
    )
    metadata: dict[str, Any] = {}
    if hub_ids:
        metadata["base_model"] = hub_ids
        metadata["base_model_relation"] = "merge"
    metadata["library_name"] = "transformers"
    metadata["tags"] = list(TAGS)
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)

    method_text = _escape(_one_line(method)) or "unnamed"
    reference = _one_line(reference)
    if reference and _URL.fullmatch(reference):
        method_text = f"[{method_text}]({_link_target(reference)})"
        reference = ""
    base_text = f" using {_model_md(as_base)} as a base" if as_base else ""
    method_lines = [f"This model was merged using the {method_text} merge method{base_text}."]
    if _one_line(method_description):
        method_lines += ["", _one_line(method_description)]
    if reference:
        method_lines += ["", f"Reference: {reference}"]

    bullets = [f"* {_model_md(model, line_start=True)}" for model in merged] or ["* (none)"]
    config_yaml = _dump_config(raw_config)
    fence = "`" * max(3, _longest_run(config_yaml, "`") + 1)
    version = _escape(_one_line(fastmerge_version))
    title = _escape(_one_line(name or ""), line_start=True) or DEFAULT_NAME
    lines = [
        "---",
        front.rstrip("\n"),
        "---",
        f"# {title}",
        "",
        f"This is a merge of pre-trained language models created using fastmerge {version} "
        f"from a [mergekit]({MERGEKIT_URL}) configuration.",
        "",
        "## Merge Details",
        "### Merge Method",
        "",
        *method_lines,
        "",
        "### Models Merged",
        "",
        "The following models were included in the merge:",
        *bullets,
        "",
        "### Configuration",
        "",
        "The following YAML configuration was used to produce this model:",
        "",
        f"{fence}yaml",
        config_yaml.rstrip("\n"),
        fence,
        "",
    ]
    return "\n".join(lines)


def _reference(text: str) -> Optional[ModelReference]:
    """The parsed reference, or None for text that is not one (shown as a plain name)."""
    try:
        return parse_model_reference(text, allow_lora=True)
    except ConfigError:
        return None


def _parts(ref: ModelReference) -> list[ModelReference]:
    """The model and, for ``base+lora``, its adapter."""
    return [ref] if ref.lora is None else [replace(ref, lora=None), ref.lora]


def _model_md(text: str, *, line_start: bool = False) -> str:
    """A model as Markdown: a hub repo as a link to its page, a local path as written."""
    ref = _reference(text)
    if ref is None:
        return _escape(_one_line(text), line_start=line_start)
    written = [text.strip()] if ref.lora is None else [p.strip() for p in text.split("+")]
    shown = [_one_md(part, spelled) for part, spelled in zip(_parts(ref), written)]
    if line_start and ref.is_local:
        shown[0] = _escape(_one_line(written[0]), line_start=True)
    return " + ".join(shown)


def _one_md(ref: ModelReference, written: str) -> str:
    if ref.repo_id is None:
        return _escape(_one_line(written))
    label = ref.repo_id if ref.revision is None else f"{ref.repo_id}@{ref.revision}"
    return f"[{_escape(_one_line(label))}]({HUB_URL}/{ref.repo_id})"


def _escape(text: str, *, line_start: bool = False) -> str:
    """`text` as literal Markdown inline text (backslash escapes); with `line_start`, also
    what would begin a block there (``1.``, ``-``, ``+``, ``>``)."""
    text = _MD_SPECIAL.sub(r"\\\1", text)
    # one tilde cannot strike through: keep the first as written (``~/models/a``)
    text = text.replace("\\~", "~", 1) if text.startswith("\\~") else text
    if not line_start:
        return text
    return _MD_BLOCK_START.sub(
        lambda m: f"{m.group(1)}\\{m.group(2)}" if m.group(1) else f"\\{m.group(3)}", text
    )


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _link_target(url: str) -> str:
    return url.replace("(", "%28").replace(")", "%29").replace("<", "%3C").replace(">", "%3E")


def _unique(items: Any) -> list:
    seen: dict = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


def _longest_run(text: str, char: str) -> int:
    runs = re.findall(f"{re.escape(char)}+", text)
    return max((len(run) for run in runs), default=0)


def _plain(value: Any, where: str = "config") -> Any:
    """`value` with mappings as dicts and sequences as lists, for yaml.safe_dump."""
    if isinstance(value, Mapping):
        return {key: _plain(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, PurePath):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool, bytes, datetime.date)):
        return value
    raise ConfigError(
        f"model card: {where}: a {type(value).__name__} cannot be written as YAML; "
        "pass the configuration as read from its YAML file"
    )


def _dump_config(raw_config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(
        _plain(raw_config), sort_keys=False, allow_unicode=True, default_flow_style=False
    )
