"""Layering: no import goes upward, and no import cycles between fastmerge's modules.

A module may only import modules of its own layer or below it; the layers are declared
once, in the table of docs/design.md ("Layers"), which :func:`declared_layers` reads. The
import graph of the installed package must also be acyclic. The graph is built from
the source with ``ast``, counting every ``import`` and ``from ... import`` anywhere in a
file: at the top, inside functions (lazy imports are imports too) and under
``TYPE_CHECKING``. The rules:

* every module is a node; a package's ``__init__`` is the package's own node;
* ``import a.b.c`` is an edge to ``a.b.c``; ``from p import n`` is an edge to ``p.n`` when
  that is a submodule, else to ``p`` (relative imports resolved against the importer);
* importing ``a.b.c`` also imports the packages ``a.b`` and ``a``: edges to them too,
  except to the importer's own enclosing packages, which Python has always initialized
  before the importer runs (an explicit ``import a`` or ``from a import name`` of such a
  package still counts).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import fastmerge

PACKAGE_DIR = Path(fastmerge.__file__).resolve().parent
DESIGN_PAGE = Path(__file__).resolve().parent.parent / "docs" / "design.md"


def module_files(package_dir: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package at `package_dir`."""
    root = package_dir.name
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [root, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        if any(not p.isidentifier() for p in parts):
            continue  # not importable (e.g. a stray file name with a dash)
        modules[".".join(parts)] = path
    return modules


def _parents(name: str) -> Iterator[str]:
    """``a.b`` and ``a`` for ``a.b.c``."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:i])


def _resolve(importer: str, is_package: bool, module: str | None, level: int) -> str:
    """The absolute name of ``from <level dots><module> import ...`` in `importer`."""
    if level == 0:
        return module or ""
    package = importer if is_package else importer.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


def import_edges(package_dir: Path) -> dict[str, dict[str, list[int]]]:
    """``{importer: {imported: [line, ...]}}`` between the package's modules."""
    modules = module_files(package_dir)
    return {name: _edges_of(name, path, set(modules)) for name, path in modules.items()}


def _edges_of(importer: str, path: Path, modules: set[str]) -> dict[str, list[int]]:
    """The modules of `modules` that the file `path` (module `importer`) imports."""
    is_package = path.name == "__init__.py"
    enclosing = set(_parents(importer)) | ({importer} if is_package else set())
    edges: dict[str, list[int]] = {}

    def add(target: str, line: int) -> None:
        if target in modules and target != importer:
            edges.setdefault(target, []).append(line)
        for parent in _parents(target):  # imported first, unless already initialized
            if parent in modules and parent not in enclosing:
                edges.setdefault(parent, []).append(line)

    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(importer, is_package, node.module, node.level)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in modules else base, node.lineno)
    return edges


def find_cycles(edges: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with a cycle."""
    return [_cycle_in(component, edges) for component in tangles(edges)]


def tangles(edges: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each holds a cycle),
    sorted; found with Tarjan's algorithm, iteratively (the graph may be deep)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def _cycle_in(component: list[str], edges: dict[str, dict[str, list[int]]]) -> list[str]:
    """A shortest cycle through the first member of a strongly connected component."""
    members, start = set(component), component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in the component {component}")  # pragma: no cover


def describe(cycle: list[str], edges: dict[str, dict[str, list[int]]], files: dict) -> str:
    """``a -> b (a.py:12) -> a (b.py:3)``."""
    steps = [cycle[0]]
    for a, b in zip(cycle, cycle[1:]):
        lines = ",".join(str(n) for n in sorted(set(edges[a][b])))
        steps.append(f"{b} ({files[a].relative_to(PACKAGE_DIR.parent)}:{lines})")
    return " -> ".join(steps)


# ---- the declared layers ---------------------------------------------------------------


def declared_layers(page: Path = DESIGN_PAGE) -> dict[str, int]:
    """``{module or package: layer number}`` from the layer table of `page`: the table after
    the ``<!-- layers`` marker, rows ``| <n> <name> | `mod`, `mod` | ... |``."""
    text = page.read_text()
    marker = text.find("<!-- layers")
    assert marker >= 0, f"{page} has no '<!-- layers' table"
    layers: dict[str, int] = {}
    started = False
    for line in text[marker:].splitlines()[1:]:
        if not line.startswith("|"):
            if started:
                break
            continue
        started = True
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        number = re.match(r"(\d+)\b", cells[0])
        if number is None:
            continue  # the header and the |---| row
        for name in re.findall(r"`([\w.]+)`", cells[1]):
            assert name not in layers, f"{name} is in two layers of {page.name}"
            layers[name] = int(number.group(1))
    assert layers, f"{page} has an empty layer table"
    return layers


def layer_of(module: str, layers: dict[str, int]) -> Optional[int]:
    """The layer of the longest entry of `layers` that is `module` or a package above it
    (the root package's entry covers only the root's own ``__init__``)."""
    root = module.split(".")[0]
    for name in [module, *_parents(module)]:
        if name in layers and (name == module or name != root):
            return layers[name]
    return None


def upward_imports(
    edges: dict[str, dict[str, list[int]]], layers: dict[str, int]
) -> tuple[list[tuple[str, str, list[int]]], list[str]]:
    """``([(importer, imported, lines)] that go to a higher layer, [modules in no layer])``."""
    unplaced = sorted(m for m in edges if layer_of(m, layers) is None)
    upward = []
    for importer in sorted(edges):
        low = layer_of(importer, layers)
        for imported, lines in sorted(edges[importer].items()):
            high = layer_of(imported, layers)
            if low is not None and high is not None and high > low:
                upward.append((importer, imported, sorted(set(lines))))
    return upward, unplaced


# ---- the rules, on small packages --------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "pkg"


def test_a_lazy_import_inside_a_function_closes_a_cycle(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "low.py": "def f():\n    from .high import g\n",
            "high.py": "from . import low\n",
        },
    )
    assert find_cycles(import_edges(root)) == [["pkg.high", "pkg.low", "pkg.high"]]


def test_submodules_packages_and_relative_imports_resolve(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "from .a import x\nfrom . import sub\n",
            "a.py": "import pkg.sub.b\nfrom .sub import c\nfrom .sub import name\n",
            "sub/__init__.py": "",
            "sub/b.py": "from .. import a as _a  # a submodule: an edge to pkg.a\n",
            "sub/c.py": "from ..sub import b\nimport os\n",
        },
    )
    edges = import_edges(root)
    assert set(edges["pkg"]) == {"pkg.a", "pkg.sub"}
    # `import pkg.sub.b` also imports pkg.sub; pkg itself encloses pkg.a: no edge to it
    assert set(edges["pkg.a"]) == {"pkg.sub", "pkg.sub.b", "pkg.sub.c"}
    assert set(edges["pkg.sub.b"]) == {"pkg.a"}
    assert set(edges["pkg.sub.c"]) == {"pkg.sub.b"}
    assert find_cycles(edges) == [["pkg.a", "pkg.sub.b", "pkg.a"]]


def test_an_explicit_import_of_an_enclosing_package_counts(tmp_path):
    root = _package(
        tmp_path,
        {"__init__.py": "from .a import f\n", "a.py": "def f():\n    import pkg\n"},
    )
    assert find_cycles(import_edges(root)) == [["pkg", "pkg.a", "pkg"]]


def test_type_checking_imports_count(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
            "b.py": "from .a import A\n",
        },
    )
    assert find_cycles(import_edges(root)) == [["pkg.a", "pkg.b", "pkg.a"]]


# ---- fastmerge -------------------------------------------------------------------------------


def test_the_graph_sees_the_package():
    edges = import_edges(PACKAGE_DIR)
    assert "fastmerge.stats" in edges["fastmerge"]
    assert "fastmerge.dist" in edges["fastmerge.stats"]  # accumulators sit above dist
    assert not set(edges["fastmerge.dist"]) & {
        "fastmerge.stats",
        "fastmerge.features",
        "fastmerge.least_squares",
    }


def test_fastmerge_has_no_import_cycles():
    files = module_files(PACKAGE_DIR)
    edges = import_edges(PACKAGE_DIR)
    report = []
    for component in tangles(edges):
        cycle = _cycle_in(component, edges)
        report.append(describe(cycle, edges, files))
        others = sorted(set(component) - set(cycle))
        if others:
            report.append(f"  (more cycles through these modules and {', '.join(others)})")
    assert not report, "import cycles (a module may only import modules below it):\n" + (
        "\n".join(report)
    )


def test_an_upward_import_is_reported_even_when_lazy(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "from . import low\n",
            "low.py": "def f():\n    from .high import g\n",
            "high.py": "from .low import f\n",
            "side.py": "from .low import f\n",
        },
    )
    layers = {"pkg": 3, "pkg.high": 2, "pkg.low": 1}
    upward, unplaced = upward_imports(import_edges(root), layers)
    assert upward == [("pkg.low", "pkg.high", [2])]
    assert unplaced == ["pkg.side"]
    assert layer_of("pkg.high.sub", layers) == 2 and layer_of("pkg.other", layers) is None


def test_the_layer_table_is_read_from_the_design_page(tmp_path):
    page = tmp_path / "design.md"
    page.write_text(
        "text\n<!-- layers -->\n| layer | modules | what |\n|---|---|---|\n"
        "| 2 top | `pkg` | api |\n| 1 core | `pkg.a`, `pkg.b` | x |\n\nafter `pkg.c`\n"
    )
    assert declared_layers(page) == {"pkg": 2, "pkg.a": 1, "pkg.b": 1}
    layers = declared_layers()
    assert layers["fastmerge.cli"] > layers["fastmerge.engine"] > layers["fastmerge"]
    assert layers["fastmerge"] > layers["fastmerge.wsa"] > layers["fastmerge.ops"]


def test_fastmerge_imports_only_downward():
    files = module_files(PACKAGE_DIR)
    upward, unplaced = upward_imports(import_edges(PACKAGE_DIR), declared_layers())
    assert not unplaced, (
        "modules in no layer: add them to the layer table of docs/design.md: " + ", ".join(unplaced)
    )
    report = [
        f"{a} ({files[a].relative_to(PACKAGE_DIR.parent)}:{','.join(map(str, lines))}) imports "
        f"{b}, which is in a higher layer (docs/design.md, Layers)"
        for a, b, lines in upward
    ]
    assert not report, "upward imports:\n" + "\n".join(report)
