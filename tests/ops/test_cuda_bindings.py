"""The Python side's calls into the native modules match the bindings they call, without
a GPU.

``fastmerge._cuda`` cannot run on a CPU-only machine, so a call that passes the wrong
number or names of arguments would only fail on a GPU. Two checks find that here:

* statically: every ``backends.cuda_extension().NAME(...)`` (and
  ``backends.cpu_extension().NAME(...)``) call in the installed package is checked against
  the ``m.def("NAME", ..., py::arg(...)...)`` entries parsed from
  ``csrc/bindings/{cuda,cpu}_module.cpp``: the function exists, the positional and keyword
  arguments fit its declared ones (pybind11's rules), none is missing;
* dynamically: every op with a cuda backend is run with ``backend="cuda"`` on CPU tensors
  against a recording stand-in for ``fastmerge._cuda`` that validates each call the same
  way, and the types of its values against the lambda's C++ parameter types (an int for
  an integer, a float or int for a double, ...). The stand-in computes nothing and leaves
  the outputs as the op allocated them, so only the calls are checked, not the results.

A new op with a cuda path needs a driver in ``CUDA_DRIVERS`` (the test says so).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

import fastmerge
from fastmerge import backends

ROOT = Path(__file__).resolve().parents[2]
BINDINGS = {
    "cuda_extension": ROOT / "csrc" / "bindings" / "cuda_module.cpp",
    "cpu_extension": ROOT / "csrc" / "bindings" / "cpu_module.cpp",
}
PACKAGE = Path(fastmerge.__file__).resolve().parent


# ---- parsing the pybind11 bindings ---------------------------------------------------------


@dataclass
class Binding:
    """One ``m.def``: its arguments in order (names, C++ types where a lambda gives them)."""

    name: str
    arg_names: Optional[list[str]]  # None: no py::arg given (only positional calls check)
    arity: Optional[int]  # number of parameters, when known
    types: Optional[list[str]] = None  # C++ parameter types, for a lambda
    defaults: set = field(default_factory=set)  # names with a default value
    kw_only_from: Optional[int] = None  # index of the first keyword-only argument
    pos_only_to: int = 0  # arguments before this index are positional-only


_TOKENS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|//[^\n]*|/\*.*?\*/', re.S)


def _strip_comments(source: str) -> str:
    """C++ source without comments; string and character literals are kept as they are
    (a docstring may hold ``//``)."""
    return _TOKENS.sub(lambda m: " " if m.group().startswith("/") else m.group(), source)


def _closing(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index of the bracket closing the one at `start`, skipping string literals."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == '"':
            i = _TOKENS.match(text, i).end() - 1
        elif ch == open_ch:
            depth += 1
        elif ch == close_ch:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unbalanced {open_ch}{close_ch} at offset {start}")


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside (), [], {}, <> and string literals."""
    parts, depth, current, i = [], 0, [], 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            end = _TOKENS.match(text, i).end()
            current.append(text[i:end])
            i = end
            continue
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
        i += 1
    if "".join(current).strip():
        parts.append("".join(current).strip())
    return parts


def _lambda_params(function: str) -> Optional[list[str]]:
    """The parameter declarations of a ``[](...) {...}`` lambda, else None."""
    match = re.match(r"\[[^\]]*\]\s*\(", function)
    if not match:
        return None
    open_paren = match.end() - 1
    inner = function[open_paren + 1 : _closing(function, open_paren, "(", ")")]
    return _split_top_level(inner) if inner.strip() else []


def parse_bindings(path: Path) -> dict[str, Binding]:
    """``{name: Binding}`` for every ``m.def(...)`` of a pybind11 module source."""
    text = _strip_comments(path.read_text())
    out: dict[str, Binding] = {}
    for match in re.finditer(r"\bm\.def\s*\(", text):
        open_paren = match.end() - 1
        items = _split_top_level(text[open_paren + 1 : _closing(text, open_paren, "(", ")")])
        name = re.fullmatch(r'"([^"]+)"', items[0]).group(1)
        params = _lambda_params(items[1])
        binding = Binding(name, None, None if params is None else len(params))
        if params is not None:
            # "const uintptr_t x" -> "const uintptr_t": drop the parameter's name
            binding.types = [re.sub(r"\s*\b\w+\s*$", "", p).strip() for p in params]
        names: list[str] = []
        for item in items[2:]:
            arg = re.fullmatch(r'py::arg\("(\w+)"\)(\s*=\s*.+)?', item, flags=re.S)
            if arg:
                names.append(arg.group(1))
                if arg.group(2):
                    binding.defaults.add(arg.group(1))
            elif re.fullmatch(r"py::kw_only\(\)", item):
                binding.kw_only_from = len(names)
            elif re.fullmatch(r"py::pos_only\(\)", item):
                binding.pos_only_to = len(names)
        if names:
            binding.arg_names = names
            binding.arity = len(names)
        assert name not in out, f"{path.name} defines {name!r} twice"
        out[name] = binding
    return out


def check_call(
    module: str, binding: Optional[Binding], name: str, n_positional: int, keywords: list[str]
) -> list[str]:
    """What is wrong with calling `binding` so, by pybind11's rules (empty when fine)."""
    if binding is None:
        return [f"{module} has no function {name!r}"]
    problems = []
    where = f"{module}.{name}"
    if binding.arity is not None and n_positional > binding.arity:
        problems.append(
            f"{where} takes {binding.arity} arguments, the call passes {n_positional} "
            f"positionally (declared: {binding.arg_names})"
        )
    if binding.kw_only_from is not None and n_positional > binding.kw_only_from:
        problems.append(f"{where}: only {binding.kw_only_from} arguments may be positional")
    if keywords and binding.arg_names is None:
        problems.append(f"{where} declares no argument names but is called with {keywords}")
    if binding.arg_names is None:
        return problems
    names = binding.arg_names
    for keyword in keywords:
        if keyword not in names:
            problems.append(f"{where} has no argument {keyword!r} (declared: {names})")
        elif names.index(keyword) < n_positional:
            problems.append(f"{where}: {keyword!r} is given positionally and by keyword")
        elif names.index(keyword) < binding.pos_only_to:
            problems.append(f"{where}: {keyword!r} is positional-only")
    if len(set(keywords)) != len(keywords):
        problems.append(f"{where}: a keyword argument is repeated in {keywords}")
    given = set(names[:n_positional]) | set(keywords)
    missing = [n for n in names if n not in given and n not in binding.defaults]
    if missing:
        problems.append(
            f"{where} is called without {missing} ({n_positional} positional arguments "
            f"{'and keywords ' + str(keywords) if keywords else ''} for {names})"
        )
    return problems


_INTEGERS = re.compile(r"\b(u?int(8|16|32|64)?_t|uintptr_t|size_t|ssize_t|int|long|unsigned)\b")


def check_types(module: str, binding: Binding, args: tuple, kwargs: dict) -> list[str]:
    """Values that pybind11 would not convert to the lambda's C++ parameter types."""
    if binding.types is None or binding.arg_names is None:
        return []
    values = dict(zip(binding.arg_names, args), **kwargs)
    problems = []
    for arg_name, cpp_type in zip(binding.arg_names, binding.types):
        if arg_name not in values:
            continue
        value, base = values[arg_name], cpp_type.replace("const", "").strip()
        where = f"{module}.{binding.name}({arg_name}: {cpp_type})"
        if base == "bool":
            ok = isinstance(value, bool)
        elif base in ("double", "float"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif _INTEGERS.fullmatch(base):
            ok = isinstance(value, int) and not isinstance(value, bool)
            if ok and base.startswith(("u", "size_t")) and value < 0:
                problems.append(f"{where} gets the negative value {value}")
        else:
            continue  # py::object, std::vector, ...: not checked
        if not ok:
            problems.append(f"{where} gets a {type(value).__name__}: {value!r}")
    return problems


@pytest.fixture(scope="module")
def bindings() -> dict[str, dict[str, Binding]]:
    return {loader: parse_bindings(path) for loader, path in BINDINGS.items()}


def test_the_parser_reads_every_binding(bindings):
    cuda = bindings["cuda_extension"]
    assert {"scope_stats", "lowrank_mixture", "ties_combine", "device_count"} <= set(cuda)
    assert cuda["lowrank_mixture"].arg_names[-1] == "stream"
    assert cuda["lowrank_mixture"].arity == len(cuda["lowrank_mixture"].types)
    assert bindings["cpu_extension"]["scope_stats"].arg_names[:2] == ["data", "numels"]


def test_check_call_follows_pybind11_rules():
    b = Binding("f", ["a", "b", "c"], 3, defaults={"c"})
    assert check_call("m", b, "f", 2, []) == []
    assert check_call("m", b, "f", 1, ["b"]) == []
    assert "takes 3 arguments" in check_call("m", b, "f", 4, [])[0]
    assert "without ['b']" in check_call("m", b, "f", 1, [])[0]
    assert "no argument 'd'" in check_call("m", b, "f", 2, ["d"])[0]
    assert "positionally and by keyword" in check_call("m", b, "f", 2, ["a"])[0]
    assert "has no function" in check_call("m", None, "g", 0, [])[0]


# ---- static: every call site in the installed package -------------------------------------


def _extension_calls(tree: ast.AST):
    """(loader, function, call node) for each ``backends.<loader>().<function>(...)``."""
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        inner = node.func.value
        if isinstance(inner, ast.Call) and isinstance(inner.func, (ast.Attribute, ast.Name)):
            loader = inner.func.attr if isinstance(inner.func, ast.Attribute) else inner.func.id
            if loader in BINDINGS:
                yield loader, node.func.attr, node


def _all_call_sites() -> list[tuple[str, int, str, str, ast.Call]]:
    sites = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = path.relative_to(PACKAGE.parent).as_posix()
        for loader, function, call in _extension_calls(tree):
            sites.append((rel, call.lineno, loader, function, call))
    return sites


def test_every_native_call_site_matches_its_binding(bindings):
    sites = _all_call_sites()
    assert any(loader == "cuda_extension" for _, _, loader, _, _ in sites)
    problems = []
    for rel, line, loader, function, call in sites:
        module = "fastmerge._cuda" if loader == "cuda_extension" else "fastmerge._C"
        binding = bindings[loader].get(function)
        positional = [a for a in call.args if not isinstance(a, ast.Starred)]
        keywords = [k.arg for k in call.keywords if k.arg is not None]
        found = check_call(module, binding, function, len(positional), keywords)
        if len(positional) < len(call.args) or len(keywords) < len(call.keywords):
            # *args / **kwargs: only what is spelled out can be checked here (too many, or
            # unknown names); the run below and the op tests check the whole call.
            found = [p for p in found if "is called without" not in p]
        problems += [f"{rel}:{line}: {p}" for p in found]
    assert not problems, "\n".join(problems)


# ---- dynamic: each op's cuda path against a recording stand-in ------------------------------


class RecordingExtension(types.ModuleType):
    """Stands in for ``fastmerge._cuda``: checks and records every call, computes nothing."""

    def __init__(self, bindings: dict[str, Binding]) -> None:
        super().__init__("fastmerge._cuda")
        self._bindings = bindings
        self.calls: list[tuple[str, tuple, dict]] = []
        self.problems: list[str] = []
        self.compiled_archs = "80,90"

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)
        binding = self._bindings.get(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            found = check_call("fastmerge._cuda", binding, name, len(args), list(kwargs))
            if binding is not None:
                found += check_types("fastmerge._cuda", binding, args, kwargs)
            self.problems += found
            if found:
                raise TypeError("; ".join(found))  # as pybind11 would, before any work
            return 0 if name == "device_count" else None

        return call


def _tensor(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    return torch.randn(*shape, generator=g).to(dtype)


def _drive_lowrank_mixture(ops):
    x, w = _tensor(2, 3, 4), _tensor(5, 4)
    us, vs = _tensor(2, 5, 2), _tensor(2, 2, 4)
    gates = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    ops.lowrank_mixture(x, w, _tensor(5), us, vs, gates, backend="cuda")


def _drive_feature_cost(ops):
    x, y = _tensor(6, 3, dtype=torch.float64), _tensor(6, 2, dtype=torch.float64)
    s, t = x.mean(0), y.mean(0)
    moments = ((x - s).T @ (y - t), (x - s).sum(0), (y - t).sum(0))
    squares = (((x - s) ** 2).sum(0), ((y - t) ** 2).sum(0))
    ops.feature_cost(*moments, *squares, s, t, 6, kind="correlation", backend="cuda")


def _drive_gram(ops):
    a, b = _tensor(3, 5), _tensor(3, 5, dtype=torch.bfloat16)
    ops.gram([a, b], backend="cuda")
    ops.gram([a, b], base=_tensor(3, 5, dtype=torch.float16), axis=-1, backend="cuda")
    ops.gram([a, b], axis=0, backend="cuda")
    ops.gram([_tensor(5000), _tensor(5000)], base=_tensor(5000), backend="cuda")  # 2 splits


#: op module -> a call of its public function with backend="cuda". Inputs are small; the
#: stand-in leaves outputs as allocated, so nothing is checked about them.
CUDA_DRIVERS: dict[str, Callable[[Any], Any]] = {
    "scope_stats": lambda ops: ops.scope_stats([_tensor(10), _tensor(3)], backend="cuda"),
    "scope_grad": lambda ops: ops.scope_grad(
        [_tensor(4), _tensor(2, 3)],
        *(torch.ones(2, dtype=torch.float64) for _ in range(3)),
        backend="cuda",
    ),
    "linear_assignment": lambda ops: ops.linear_assignment(_tensor(3, 4), backend="cuda"),
    "feature_center": lambda ops: ops.feature_center(_tensor(5, 3), _tensor(3), backend="cuda"),
    "feature_cost": _drive_feature_cost,
    "gram": _drive_gram,
    "conv_gram": lambda ops: ops.conv_gram(
        _tensor(1, 2, 5, 5), _tensor(1, 3, 4, 4), 2, backend="cuda"
    ),
    "gta_combine": lambda ops: ops.gta_combine(
        _tensor(6),
        [_tensor(6), _tensor(6, dtype=torch.float16)],
        [0.5, -0.25],
        keep_probability=[0.5, 1.0],
        offset=12,
        consensus=True,
        normalize=True,
        backend="cuda",
    ),
    "lowrank_mixture": _drive_lowrank_mixture,
    "magnitude_threshold": lambda ops: ops.magnitude_threshold(
        _tensor(8), [_tensor(8), _tensor(8)], 3, backend="cuda"
    ),
    "nearswap": lambda ops: ops.nearswap(
        _tensor(7), _tensor(7, dtype=torch.bfloat16), 0.5, backend="cuda"
    ),
    "ties_combine": lambda ops: ops.ties_combine(
        _tensor(6), [_tensor(6), _tensor(6)], torch.tensor([0.5, 0.5]), backend="cuda"
    ),
    "weighted_sum": lambda ops: ops.weighted_sum(
        [_tensor(7), _tensor(7, dtype=torch.float16)], [0.5, 0.25], backend="cuda"
    ),
}


def _ops_with_cuda_calls() -> dict[str, set[str]]:
    """op module name -> the fastmerge._cuda functions its source calls."""
    out: dict[str, set[str]] = {}
    for rel, _, loader, function, _ in _all_call_sites():
        if loader == "cuda_extension" and rel.startswith("fastmerge/ops/"):
            out.setdefault(Path(rel).stem, set()).add(function)
    return out


def test_every_op_with_a_cuda_path_has_a_driver():
    missing = sorted(set(_ops_with_cuda_calls()) - set(CUDA_DRIVERS))
    assert not missing, f"add a driver to CUDA_DRIVERS for the cuda path of ops {missing}"


@pytest.fixture
def fake_cuda(monkeypatch, bindings) -> RecordingExtension:
    """fastmerge._cuda replaced by the stand-in; CPU tensors accepted by the cuda backend
    and torch.cuda's device guard and stream without a GPU."""
    extension = RecordingExtension(bindings["cuda_extension"])
    reason = backends.unavailable_reason
    monkeypatch.setattr(backends, "cuda_extension", lambda: extension)
    monkeypatch.setattr(
        backends,
        "unavailable_reason",
        lambda backend, device: None if backend == "cuda" else reason(backend, device),
    )
    monkeypatch.setattr(torch.cuda, "device", lambda device=None: contextlib.nullcontext())
    stream = types.SimpleNamespace(cuda_stream=0x5EED)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    return extension


@pytest.mark.parametrize("op", sorted(CUDA_DRIVERS))
def test_op_cuda_path_calls_match_the_bindings(op, fake_cuda):
    expected = _ops_with_cuda_calls().get(op)
    if expected is None:
        pytest.skip(f"fastmerge.ops.{op} has no cuda path in this tree")
    module = importlib.import_module(f"fastmerge.ops.{op}")
    try:
        CUDA_DRIVERS[op](fastmerge.ops)
    except Exception as exc:
        raise AssertionError(
            f"{module.__name__} on backend='cuda' failed: {exc!r}\n" + "\n".join(fake_cuda.problems)
        ) from exc
    assert not fake_cuda.problems, "\n".join(fake_cuda.problems)
    called = {name for name, _, _ in fake_cuda.calls}
    assert called >= expected, f"{op} never called {sorted(expected - called)} on backend='cuda'"
