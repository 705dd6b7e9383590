"""The public namespace (docs/design.md): every op in ``fastmerge.ops`` and the daily ones
(``fastmerge.ops.TOP_LEVEL``) at the top level, one key selector, and a library that does
not import its own command line."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fastmerge

PACKAGE_DIR = Path(fastmerge.__file__).resolve().parent


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )


def test_import_fastmerge_does_not_import_the_command_line():
    result = _run(
        "import sys, fastmerge\n"
        "cli = sorted(m for m in sys.modules if m.startswith(('fastmerge.cli', 'fastmerge.engine',"
        " 'fastmerge.bench')) or m == 'fastmerge.__main__')\n"
        "assert not cli, cli\n"
        "assert fastmerge.cli.main is sys.modules['fastmerge.cli'].main\n"  # on first use
    )
    assert result.returncode == 0, result.stderr


def test_python_dash_m_fastmerge_still_runs_the_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "fastmerge", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "info" in result.stdout and "merge" in result.stdout


def test_the_top_level_ops_are_the_listed_ones_and_the_same_objects():
    ops = fastmerge.ops
    assert set(ops.TOP_LEVEL) <= set(ops.__all__)
    at_top = {n for n in ops.__all__ if hasattr(fastmerge, n)}
    assert at_top == set(ops.TOP_LEVEL), "add the op to fastmerge.ops.TOP_LEVEL (or drop it)"
    for name in ops.TOP_LEVEL:
        assert name in fastmerge.__all__, name
        assert getattr(fastmerge, name) is getattr(ops, name), name


def test_every_op_file_is_exported_by_fastmerge_ops():
    files = sorted(p.stem for p in (PACKAGE_DIR / "ops").glob("*.py") if p.stem[0] != "_")
    assert files, "no op files found"
    missing = [f for f in files if f not in fastmerge.ops.__all__]
    assert not missing, f"ops without a fastmerge.ops.<op> name: {missing}"


def test_there_is_one_key_selector():
    definitions = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == "key_selector":
                definitions.append(str(path.relative_to(PACKAGE_DIR)))
    assert definitions == [str(Path("merge") / "_select.py")]


def test_the_key_selector_takes_regexes_lists_and_callables():
    select = fastmerge.merge.key_selector
    # positional (include, exclude), as both former selectors took them
    by_regex = select(r"\.weight$", ["^embed"])
    assert [by_regex(k) for k in ("fc.weight", "fc.bias", "embed.weight")] == [1, 0, 0]
    assert by_regex("fc.weight", torch.zeros(1)) is True
    big = select(include=lambda key, tensor: tensor is not None and tensor.numel() > 2)
    assert big("w", torch.zeros(3)) and not big("w", torch.zeros(2)) and not big("w")
    assert select(None, None)("anything") and select([], [])("anything")
    assert select({"^a"})("ab") and not select(("^a",))("ba")  # any collection of regexes
    with pytest.raises(TypeError, match="exclude"):
        select(None, 3)
    with pytest.raises(ValueError, match="include pattern"):
        select("(", None)


def test_the_twin_name_of_the_key_selector_is_deprecated_and_the_same_function():
    with pytest.warns(DeprecationWarning, match="fastmerge.merge.key_selector"):
        alias = fastmerge.twin.key_selector
    assert alias is fastmerge.merge.key_selector
    with pytest.warns(DeprecationWarning):
        from fastmerge.twin import key_selector  # noqa: F401
    assert "key_selector" not in fastmerge.twin.__all__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no_such_name"):
            fastmerge.twin.no_such_name  # noqa: B018


def test_twin_merging_selects_as_before():
    torch.manual_seed(0)
    base = {"a.weight": torch.randn(4, 4), "b.weight": torch.randn(4, 4)}
    experts = [{k: v + torch.randn_like(v) for k, v in base.items()} for _ in range(2)]

    def merger(**kw):
        return fastmerge.twin.TwinMerger(base, experts, rank=1, progress=False, **kw)

    assert set(merger(include=r"^a\.").factors) == {"a.weight"}
    assert set(merger(exclude=lambda key, tensor: key.startswith("a")).factors) == {"b.weight"}
    assert merger(include=[]).factors == {}  # an empty include list selects nothing here
    assert merger(include=set()).factors == {}
    assert set(merger(include=(r"^b",)).factors) == {"b.weight"}
    assert inspect.signature(fastmerge.merge.key_selector).parameters["include"].default is None
