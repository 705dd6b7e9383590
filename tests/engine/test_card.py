"""The README.md model card of a merged model."""

from __future__ import annotations

import doctest
import re
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml

from fastmerge.engine import card as card_module
from fastmerge.engine.card import model_card
from fastmerge.engine.errors import ConfigError

TIES = {
    "merge_method": "ties",
    "base_model": "org/base",
    "models": [
        {"model": "org/math@v2", "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": "./local_code"},
        {"model": "org/base"},
    ],
    "parameters": {"normalize": True},
    "dtype": "bfloat16",
}


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run where none of the test's model names exist as local paths."""
    monkeypatch.chdir(tmp_path)


def ties_card(**kwargs) -> str:
    args = dict(
        method="ties",
        models=["org/math@v2", "./local_code", "org/base"],
        base_model="org/base",
        fastmerge_version="1.2.3",
    )
    args.update(kwargs)
    return model_card(TIES, **args)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end])


def config_block(text: str) -> tuple[str, str]:
    """(fence, body) of the card's YAML block."""
    match = re.search(r"^(`{3,})yaml\n(.*?)\n\1$", text, flags=re.S | re.M)
    assert match, text
    return match.group(1), match.group(2)


def section(text: str, start: str, stop: str) -> str:
    return text[text.index(start) : text.index(stop)]


def test_front_matter():
    meta = front_matter(ties_card())
    assert meta == {
        "base_model": ["org/base", "org/math"],
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["fastmerge", "merge", "mergekit"],
    }


def test_front_matter_without_hub_models():
    text = model_card(
        {"merge_method": "linear"},
        method="linear",
        models=["./a", "/abs/b"],
        base_model=None,
        fastmerge_version="1.0",
    )
    meta = front_matter(text)
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["tags"] == ["fastmerge", "merge", "mergekit"]


def test_sections_and_links():
    text = ties_card(name="My Merge")
    assert text.splitlines()[text.splitlines().index("---", 1) + 1] == "# My Merge"
    assert (
        "created using fastmerge 1.2.3 from a [mergekit](https://github.com/arcee-ai/mergekit)"
        in (text)
    )
    for heading in [
        "## Merge Details",
        "### Merge Method",
        "### Models Merged",
        "### Configuration",
    ]:
        assert f"\n{heading}\n" in text
    method = section(text, "### Merge Method", "### Models Merged")
    assert (
        "This model was merged using the ties merge method using "
        "[org/base](https://huggingface.co/org/base) as a base." in method
    )
    models = section(text, "### Models Merged", "### Configuration")
    bullets = [line for line in models.splitlines() if line.startswith("* ")]
    # the base is named as the base, not listed again; a revision is shown, not linked
    assert bullets == ["* [org/math@v2](https://huggingface.co/org/math)", "* ./local\\_code"]
    assert text.endswith("```\n")


def test_default_title():
    assert "\n# Untitled Model (1)\n" in ties_card()


def test_description_and_reference():
    text = ties_card(
        method_description="Trims small deltas,\n elects a sign per parameter, averages.",
        reference="https://arxiv.org/abs/2306.01708",
    )
    method = section(text, "### Merge Method", "### Models Merged")
    assert "using the [ties](https://arxiv.org/abs/2306.01708) merge method" in method
    assert "\nTrims small deltas, elects a sign per parameter, averages.\n" in method
    assert "Reference:" not in method

    text = ties_card(reference="Yadav et al., TIES-Merging, NeurIPS 2023")
    method = section(text, "### Merge Method", "### Models Merged")
    assert "using the ties merge method" in method
    assert "\nReference: Yadav et al., TIES-Merging, NeurIPS 2023\n" in method


def test_slerp_lists_its_base_as_a_model():
    text = model_card(
        {"merge_method": "slerp"},
        method="slerp",
        models=["org/a"],
        base_model="org/b",
        fastmerge_version="1.0",
    )
    method = section(text, "### Merge Method", "### Models Merged")
    assert "as a base" not in method
    models = section(text, "### Models Merged", "### Configuration")
    assert "* [org/a](https://huggingface.co/org/a)" in models
    assert "* [org/b](https://huggingface.co/org/b)" in models
    assert front_matter(text)["base_model"] == ["org/a", "org/b"]


def test_hub_ids_once_and_local_paths_plain(tmp_path):
    Path("org/local").mkdir(parents=True)  # exists here: a local path, not a hub id
    text = model_card(
        {"merge_method": "linear"},
        method="linear",
        models=["org/a", "org/a@v1", "org/local", "/abs/path/model", "~/m"],
        base_model=None,
        fastmerge_version="1.0",
    )
    assert front_matter(text)["base_model"] == ["org/a"]
    models = section(text, "### Models Merged", "### Configuration")
    bullets = [line for line in models.splitlines() if line.startswith("* ")]
    assert bullets == [
        "* [org/a](https://huggingface.co/org/a)",
        "* [org/a@v1](https://huggingface.co/org/a)",
        "* org/local",
        "* /abs/path/model",
        "* ~/m",
    ]


def test_lora_references_are_shown_with_their_adapter():
    text = model_card(
        {"merge_method": "linear"},
        method="linear",
        models=["org/base+org/adapter", "org/b"],
        base_model=None,
        fastmerge_version="1.0",
    )
    assert (
        "* [org/base](https://huggingface.co/org/base) + "
        "[org/adapter](https://huggingface.co/org/adapter)"
    ) in text
    assert front_matter(text)["base_model"] == ["org/base", "org/adapter", "org/b"]


def test_config_block_round_trips_with_key_order():
    text = ties_card()
    fence, body = config_block(text)
    assert fence == "```"
    assert yaml.safe_load(body) == TIES
    assert list(yaml.safe_load(body)) == list(TIES)  # key order kept, not sorted
    assert body.index("merge_method") < body.index("base_model") < body.index("dtype")


def test_config_with_backticks_cannot_close_its_block():
    raw = {"merge_method": "linear", "models": [{"model": "./a```b````c"}], "note": "```"}
    text = model_card(
        raw, method="linear", models=["./a```b````c"], base_model=None, fastmerge_version="1"
    )
    fence, body = config_block(text)
    assert fence == "`````"
    assert yaml.safe_load(body) == raw


def test_config_mappings_and_tuples_are_plain_yaml():
    raw = MappingProxyType({"merge_method": "linear", "slices": ({"layer_range": (0, 4)},)})
    text = model_card(raw, method="linear", models=[], base_model=None, fastmerge_version="1")
    assert yaml.safe_load(config_block(text)[1]) == {
        "merge_method": "linear",
        "slices": [{"layer_range": [0, 4]}],
    }
    assert "* (none)" in text


def test_bad_arguments():
    with pytest.raises(ConfigError, match="must be a mapping"):
        model_card([], method="x", models=[], base_model=None, fastmerge_version="1")
    with pytest.raises(ConfigError, match="not a string"):
        model_card({}, method="x", models="org/a", base_model=None, fastmerge_version="1")
    with pytest.raises(ConfigError, match=r"config\.models\[0\]: a object cannot be written"):
        model_card(
            {"models": [object()]}, method="x", models=[], base_model=None, fastmerge_version="1"
        )


SPECIAL = [
    "./we*ird_[name](http://evil.example)",
    "<script>alert(1)</script>",
    "a|b|c",
    "two\nlines",
    "# not a heading",
    "1. not a list",
    "- not a list",
    "---",
    "`code` ~~strike~~ $x$ &amp;",
    'quote " and colon: here',
]


def test_special_characters_are_escaped():
    title = "</h1><img src=x> # title ---"
    text = model_card(
        {"merge_method": "linear", "models": [{"model": name} for name in SPECIAL]},
        method="lin*ear<b>",
        models=SPECIAL,
        base_model="a_b [base]",
        fastmerge_version="1.0<i>",
        name=title,
    )
    meta = front_matter(text)  # still one front matter block that parses
    assert meta["tags"] == ["fastmerge", "merge", "mergekit"] and "base_model" not in meta
    assert text.count("\n---\n") == 1
    body = text[: text.index("### Configuration")]
    for raw in ["<script>", "<img", "<b>", "<i>", "](http://evil", "~~strike~~", "$x$", "&amp;"]:
        assert not re.search(r"(?<!\\)" + re.escape(raw), body), raw
    assert "\n# \\</h1\\>\\<img src=x\\> \\# title ---\n" in body
    models = section(text, "### Models Merged", "### Configuration")
    bullets = [line for line in models.splitlines() if line.startswith("* ")]
    assert len(bullets) == len(SPECIAL)
    assert "* two lines" in bullets and "* 1\\. not a list" in bullets
    assert "* \\- not a list" in bullets and "* \\# not a heading" in bullets
    assert "* \\---" in bullets
    assert yaml.safe_load(config_block(text)[1])["models"][3] == {"model": "two\nlines"}


def test_special_characters_render_as_literal_text():
    markdown_it = pytest.importorskip("markdown_it")
    text = model_card(
        {"merge_method": "linear"},
        method="linear",
        models=SPECIAL,
        base_model=None,
        fastmerge_version="1.0",
        name="<b>bold</b> *x*",
    )
    body = text[text.index("\n---\n") + 5 : text.index("### Configuration")]
    html = markdown_it.MarkdownIt("commonmark").render(body)
    assert "<script>" not in html and "<b>" not in html and "<em>" not in html
    assert 'href="http://evil.example"' not in html and "<code>" not in html
    assert html.count("<h1>") == 1 and "<hr" not in html and "<ol" not in html
    assert html.count("<li>") == len(SPECIAL)  # one flat list, one item per model
    assert "<ul>" in html and html.count("<ul>") == 1
    assert "<li>./we*ird_[name](http://evil.example)</li>" in html
    assert "<li>&lt;script&gt;alert(1)&lt;/script&gt;</li>" in html
    assert "<li>1. not a list</li>" in html and "<li>---</li>" in html
    assert "<h1>&lt;b&gt;bold&lt;/b&gt; *x*</h1>" in html


def test_docstring_examples():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(card_module, "fastmerge.engine.card")
    assert sum(len(test.examples) for test in tests) >= 4
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
