"""The documentation site (mkdocs.yml, docs/): every page is in the navigation, every API
page documents modules that import, every op has its row on the ops page, and an image
copied into docs/img/ matches its source in bench/results/.

CI builds the site itself (``mkdocs build --strict`` in ``.ci/run``: links, anchors and
docstring sections); these checks are the ones a build does not make. Skipped where
mkdocs is not installed (``pip install ".[docs]"``).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIG = ROOT / "mkdocs.yml"
OPS_DIR = ROOT / "python" / "fastmerge" / "ops"
GENERATED = "benchmarks/"  # pages written by `python bench/report.py pages`
GENERATED_INDEX = "benchmarks/results.md"


def nav_pages(entries) -> list[str]:
    """The page paths of a mkdocs ``nav`` (nested lists of ``{title: page or list}``)."""
    pages = []
    for entry in entries:
        values = entry.values() if isinstance(entry, dict) else [entry]
        for value in values:
            pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return pages


def api_modules() -> dict[str, list[str]]:
    """``{page: [module, ...]}`` of the ``::: module`` directives of docs/api/."""
    return {
        path.relative_to(DOCS).as_posix(): re.findall(
            r"^::: ([\w.]+)", path.read_text(), re.MULTILINE
        )
        for path in sorted((DOCS / "api").glob("*.md"))
    }


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_every_page_is_in_the_navigation_and_every_entry_exists(config):
    pages = nav_pages(config["nav"])
    assert len(pages) == len(set(pages)), "a page is twice in mkdocs.yml's nav"
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    # The generated results pages (bench/report.py pages) are reached from their index,
    # which is in the nav; listing each one there would go stale at every new results file.
    generated = {p for p in on_disk if p.startswith(GENERATED) and p != GENERATED_INDEX}
    index = (DOCS / GENERATED_INDEX).read_text()
    unlinked = sorted(p for p in generated if f"]({p[len(GENERATED) :]})" not in index)
    assert unlinked == [], f"results pages not linked from {GENERATED_INDEX}"
    assert GENERATED_INDEX in pages, "the results index is not in mkdocs.yml's nav"
    missing = sorted(on_disk - set(pages) - generated)
    assert missing == [], "pages missing from mkdocs.yml's nav"
    assert sorted(set(pages) - on_disk) == [], "nav entries without a page in docs/"


def test_site_uses_material_and_mkdocstrings_with_google_docstrings(config):
    assert config["theme"]["name"] == "material"
    assert config.get("strict") is True
    plugins = {next(iter(p)) if isinstance(p, dict) else p: p for p in config["plugins"]}
    handler = plugins["mkdocstrings"]["mkdocstrings"]["handlers"]["python"]
    assert handler["options"]["docstring_style"] == "google"


def test_api_pages_document_modules_that_import():
    pages = api_modules()
    assert pages, "no API pages in docs/api/"
    documented = {m for modules in pages.values() for m in modules}
    for page, modules in pages.items():
        assert modules, f"docs/{page} has no '::: module' directive"
        for name in modules:
            importlib.import_module(name)
    for name in ("fastmerge", "fastmerge.ops", "fastmerge.pleas", "fastmerge.twin"):
        assert name in documented
    for name in ("fastmerge.wsa", "fastmerge.merge", "fastmerge.lora", "fastmerge.engine"):
        assert name in documented
    assert {"fastmerge.features", "fastmerge.least_squares"} <= documented


def test_ops_page_has_a_row_for_every_op():
    page = (DOCS / "ops.md").read_text()
    ops = sorted(p.stem for p in OPS_DIR.glob("[a-z]*.py"))
    missing = [op for op in ops if f"[`{op}`][fastmerge.ops.{op}]" not in page]
    assert missing == [], "ops without a row on docs/ops.md"


def test_copied_images_match_their_bench_results_source():
    for image in sorted((DOCS / "img").glob("*")):
        source = ROOT / "bench" / "results" / image.name
        if source.exists():
            assert image.read_bytes() == source.read_bytes(), (
                f"docs/img/{image.name} differs from bench/results/{image.name}: copy it again"
            )


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move details to docs/"
