"""``fastmerge merge`` trusts nothing: fuzzed YAML configurations (hypothesis).

Valid configurations of every streaming method (linear, task_arithmetic, ties, dare_ties,
dare_linear, passthrough and linear/ties with slices) over three tiny real models are
mutated at their real keys (every top-level key, the per-model, per-slice and per-source
keys, the parameter settings, the tokenizer block) with values of the wrong type or out
of range, and with YAML text written by hand (alias bombs, huge integers, NUL bytes,
recursive anchors, deep nesting). Every run must end with exit status 2 and exactly one
line ``fastmerge merge: error...`` on stderr naming the file or key (short, whatever the
value), leave nothing behind, and stay within a time and memory bound; or, when the
mutation happens to be valid, exit 0 with a complete output.

The merges run in-process (:func:`fastmerge.cli.main`) for speed; a few run in a
subprocess under ``RLIMIT_AS`` to check the real exit status and stderr.
``FASTMERGE_FUZZ_EXAMPLES=N`` runs N examples instead of the default (CI's) count, and
``FASTMERGE_FUZZ_RANDOM=1`` draws new ones on every run (CI's are always the same).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import safetensors.torch
import torch
import yaml

from fastmerge.cli import main
from fastmerge.engine import get_method

HAS_TRANSFORMERS = all(importlib.util.find_spec(m) for m in ("transformers", "tokenizers"))
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

LAYERS = 3
#: Bounds of one example: seconds, growth of the peak RSS over the whole file (bytes),
#: and the length of the error line (the CLI's own cap is 2000 characters of message).
SECONDS = 5.0
RSS_GROWTH = 400 << 20
MAX_LINE = 2100
PREFIX = "fastmerge merge: error"

settings.register_profile(
    "config-fuzz",
    max_examples=int(os.environ.get("FASTMERGE_FUZZ_EXAMPLES", "800")),
    deadline=None,
    # the same examples on every run (CI is reproducible); FASTMERGE_FUZZ_RANDOM=1 explores
    derandomize=os.environ.get("FASTMERGE_FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings(settings.get_profile("config-fuzz"))

BASE_WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(10)]
#: Model b's vocabulary: the same size, two other tokens (a union re-indexes the rows).
B_WORDS = BASE_WORDS[:-2] + ["x1", "y1"]


def _tiny_model(path: Path, seed: int, words: list[str]) -> None:
    gen = torch.Generator().manual_seed(seed)
    rows = len(words)
    t = {"model.embed_tokens.weight": torch.randn(rows, 4, generator=gen),
         "model.norm.weight": torch.randn(4, generator=gen),
         "lm_head.weight": torch.randn(rows, 4, generator=gen)}  # fmt: skip
    for i in range(LAYERS):
        t[f"model.layers.{i}.mlp.w"] = torch.randn(6, 4, generator=gen)
        t[f"model.layers.{i}.self_attn.q"] = torch.randn(4, 4, generator=gen)
    path.mkdir(parents=True)
    safetensors.torch.save_file(t, path / "model.safetensors")
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": LAYERS, "vocab_size": rows, "hidden_size": 4,
        "num_attention_heads": 1, "num_key_value_heads": 1, "intermediate_size": 6,
        "torch_dtype": "float32",
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
    except ImportError:  # the tokenizer keys then fail on the missing files: still fuzzed
        return
    backend = Tokenizer(models.BPE(vocab={w: i for i, w in enumerate(words)}, merges=[],
                                   unk_token="<unk>"))  # fmt: skip
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>")  # fmt: skip
    tok.save_pretrained(str(path))


class World:
    """The tiny models (``base``, ``a``, ``b``: 3 layers each) and a folder for the runs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.work = root / "work"
        self.models = {n: str(root / n) for n in ("base", "a", "b")}

    def tree(self) -> set[str]:
        """Every file and directory under the root (to see what a run left)."""
        found = set()
        for folder, dirs, files in os.walk(self.root):
            rel = os.path.relpath(folder, self.root)
            found.update(os.path.join(rel, n) for n in dirs + files)
        return found


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("config-fuzz")
    hf_home = tmp_path_factory.mktemp("config-fuzz-hf")
    for seed, (name, words) in enumerate([("base", BASE_WORDS), ("a", BASE_WORDS),
                                          ("b", B_WORDS)]):  # fmt: skip
        _tiny_model(root / name, seed, words)
    w = World(root)
    w.work.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # a model reference never reaches the network
        mp.setenv("HF_HOME", str(hf_home))
        mp.delenv("HF_HUB_CACHE", raising=False)
        mp.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
        # Warm-up: the first merge imports the engine (and transformers for a union).
        for name in ("linear", "union") if HAS_TRANSFORMERS else ("linear",):
            code, err, out = _run_cli(w, _dump(_valid(w.models, name)))
            assert code == 0, err
            shutil.rmtree(out.parent)
        yield w


# ---- valid configurations ------------------------------------------------------------


def _valid(m: dict[str, str], name: str) -> dict[str, Any]:
    """A valid configuration of each streaming method over the tiny models."""
    base, a, b = m["base"], m["a"], m["b"]
    if name in ("linear", "union"):
        cfg = {"merge_method": "linear",
               "models": [{"model": a, "parameters": {"weight": 0.6}},
                          {"model": b, "parameters": {"weight": [0.2, 0.8]}}],
               "parameters": {"normalize": True}, "dtype": "float32"}  # fmt: skip
        if name == "union":
            cfg["tokenizer_source"] = "union"
        return cfg
    if name in ("task_arithmetic", "ties", "dare_ties", "dare_linear"):
        params: dict[str, Any] = {"lambda": 0.9, "normalize": False}
        own = {"weight": [{"filter": "self_attn", "value": 0.3}, {"value": 1.0}]}
        if name != "task_arithmetic":
            params.update(int8_mask=False, rescale=name.startswith("dare"))
            own["density"] = 0.5
        return {"merge_method": name, "base_model": base,
                "models": [{"model": base}, {"model": a, "parameters": {"weight": 0.5}},
                           {"model": b, "parameters": own}],
                "parameters": params, "seed": 3, "out_dtype": "bfloat16"}  # fmt: skip
    if name == "passthrough":
        return {"merge_method": "passthrough",
                "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                           {"sources": [{"model": b, "layer_range": [1, 3],
                                         "parameters": {"scale": 0.5}}]}]}  # fmt: skip
    if name == "linear_slices":
        return {"merge_method": "linear",
                "slices": [{"sources": [{"model": a, "layer_range": [0, 3],
                                         "parameters": {"weight": [0.3, 0.7]}},
                                        {"model": b, "layer_range": [0, 3]}],
                            "parameters": {"weight": 0.5}}],
                "include": ["mlp", "self_attn"], "exclude": "norm"}  # fmt: skip
    if name == "ties_slices":
        return {"merge_method": "ties",
                "slices": [{"sources": [{"model": base, "layer_range": [0, 2]},
                                        {"model": a, "layer_range": [0, 2],
                                         "parameters": {"density": [0.3, 0.9]}},
                                        {"model": b, "layer_range": [1, 3]}],
                            "base_model": base, "parameters": {"lambda": 1.1}}],
                "parameters": {"density": 0.6}}  # fmt: skip
    raise KeyError(name)


METHODS = ["linear", "union", "task_arithmetic", "ties", "dare_ties", "dare_linear",
           "passthrough", "linear_slices", "ties_slices"]  # fmt: skip


# ---- values: wrong types, out of range, hand-written YAML ------------------------------


class Raw:
    """A value written into the YAML text as it is (what yaml.safe_dump cannot write)."""

    def __init__(self, name: str, text: str) -> None:
        self.name, self.text = name, text

    def __repr__(self) -> str:
        return f"Raw({self.name})"


def _string_bomb(levels: int = 9, width: int = 9) -> str:
    # width**levels strings if anything expanded the value (9**9: 387 million)
    parts = ["&s0 [" + ", ".join(["x"] * width) + "]"]
    parts += [f"&s{i} [" + ", ".join([f"*s{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def _setting_bomb(levels: int = 8, width: int = 9, bad_tail: bool = False) -> str:
    # conditional settings whose every `value` is the same list: width**levels mappings
    # for anything walking the tree (9**8: 43 million); with `bad_tail`, an invalid last
    # entry that a check reaches only after the whole tree
    text = "1.0"
    for i in range(levels):
        entries = [f"{{value: &v{i} {text}}}"] + [f"{{value: *v{i}}}"] * (width - 1)
        text = "[" + ", ".join(entries) + "]"
    return text[:-1] + ", {value: 1.0, colour: 1}]" if bad_tail else text


HUGE_HEX = "0x" + "f" * 5000  # an int of 20,000 bits (its decimal repr is refused)
RAW = [
    Raw("string bomb", _string_bomb()),
    Raw("setting bomb", _setting_bomb()),
    Raw("setting bomb, bad tail", _setting_bomb(bad_tail=True)),
    Raw("huge hex int", HUGE_HEX),
    Raw("int of 5000 digits", "9" * 5000),
    Raw("int of 400 digits", "9" * 400),
    Raw("sexagesimal", "190:20:30"),
    Raw("nan", ".nan"),
    Raw("minus inf", "-.inf"),
    Raw("binary", "!!binary aGVsbG8="),
    Raw("date", "2020-01-01"),
    Raw("timestamp", "2001-12-14t21:59:43.10-05:00"),
    Raw("NUL byte", '"x\\0y"'),
    Raw("lone surrogate", '"x\\ud800y"'),
    Raw("python tag", "!!python/object/apply:os.getcwd []"),
    Raw("recursive list", "&r [1, *r]"),
    Raw("recursive mapping", "&q {value: *q, filter: x}"),
    Raw("nested lists", "[" * 60 + "1" + "]" * 60),
    Raw("merge key", "{<<: {value: 1.0}, filter: mlp}"),
    Raw("bad merge key", "{<<: 3}"),
    Raw("set", "!!set {a, b}"),
    Raw("ordered map", "!!omap [{value: 1}]"),
]


class Long(str):
    """A long string with a short repr (hypothesis prints the failing examples)."""

    def __repr__(self) -> str:
        return f"Long({self[:1]!r} * {len(self)})"


LONG = Long("x" * 20_000)  # never echoed in full
LONG_WIDE = Long("é" * 3_000)
BAD_SCALARS = [None, True, False, 0, 1, -1, -0.0, 2**31, 2**63, -(2**63) - 1, 10**30,
               10**400, float("nan"), float("inf"), -float("inf"), 1e308, 5e-324, "", " ",
               LONG, LONG_WIDE, "\t\n", "0", "1.5", "nan", "-inf", "1e400", "~", "null",
               "base", "union", "*", "{x}", "true", "a+b", "\x00", "\u2028"]  # fmt: skip
TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
scalars = st.one_of(
    st.sampled_from(BAD_SCALARS),
    st.integers(),
    st.floats(),
    TEXT,
)
KEYS = ["model", "parameters", "layer_range", "sources", "base_model", "weight", "density",
        "lambda", "normalize", "rescale", "int8_mask", "scale", "filter", "value", "source",
        "tokens", "kind", "force", "token", "token_id", "colour", "name", "modules"]  # fmt: skip
dict_keys = st.one_of(st.sampled_from(KEYS), TEXT, st.integers(), st.just(LONG),
                      st.sampled_from([None, True, 1.5]))  # fmt: skip
anything = st.recursive(
    st.one_of(scalars, st.sampled_from(RAW)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(dict_keys, inner, max_size=3),
    max_leaves=8,
)


def _model_refs(m: dict[str, str]):
    root = str(Path(m["a"]).parent)
    return st.sampled_from([m["base"], m["a"], m["b"], m["a"] + "/", m["a"] + "/model.safetensors",
                            root + "/missing", root + "/a/config.json", "a", "./a",
                            "org/name", "org/name@main", "org/name@", "org/na me", "a+b",
                            "/" + "x" * 300, Long("x/" * 1500), root])  # fmt: skip


def _gradient(elements, typed: bool):
    return st.lists(elements, min_size=1 if typed else 0, max_size=6)


def _conditional(value, typed: bool):
    filters = st.one_of(TEXT, st.sampled_from(["mlp", "self_attn", "*", "", "embed", "norm"]))
    if not typed:
        filters = st.one_of(filters, anything)
    entry = st.fixed_dictionaries({"value": value}, optional={"filter": filters})
    return st.lists(entry, min_size=0 if not typed else 1, max_size=3)


def _number(low: float, high: float, typed: bool):
    edge = st.sampled_from([low, high, 0, 0.0, 1, 1.0, 1.5, -0.1, 1e-9, "0.5", "1e-1"])
    close = st.floats(low, high, allow_nan=False)
    if typed:
        bad = st.sampled_from([float("nan"), float("inf")])
        return st.one_of(edge, edge, close, close, close, bad)
    return st.one_of(edge, close, st.floats(), st.integers(-(2**70), 2**70))


def _setting(name: str, typed: bool):
    """Values for one parameter setting: scalars, gradients (NaN included), conditional
    settings (filters that match some tensors and not others), and anything."""
    if name in ("normalize", "rescale", "int8_mask"):
        scalar = st.one_of(st.booleans(), st.booleans(), st.sampled_from(["true", 0, 1, None]))
    elif name == "density":
        scalar = _number(0.0, 1.0, typed)
    else:
        scalar = _number(-2.0, 2.0, typed)
    gradient = _gradient(scalar, typed)
    setting = st.one_of(scalar, gradient, _conditional(scalar | gradient, typed))
    return setting if typed else st.one_of(setting, anything)


PARAMETERS = ("weight", "density", "lambda", "normalize", "rescale", "int8_mask", "scale")
GLOBAL = ("lambda", "normalize", "rescale", "int8_mask")


def _value_for(m: dict[str, str], key: Any, typed: bool = False):
    """Values for a slot whose key is `key`: of the right type when `typed` (out of
    range, or valid), else also anything at all."""
    refs = _model_refs(m)
    if key in PARAMETERS:
        return _setting(key, typed)
    if key in ("model", "base_model", "tokenizer_source", "source"):
        values = st.one_of(refs, refs, st.sampled_from(["base", "union"]))
    elif key == "layer_range":
        bound = st.integers(-1, 5) | st.sampled_from([10**20, 2**63, True, 1.5, "1"])
        values = st.lists(st.integers(-1, 5) if typed else bound, min_size=0, max_size=3)
        values = st.one_of(values, st.tuples(st.integers(0, 4), st.integers(0, 4)).map(list))
    elif key in ("dtype", "out_dtype"):
        names = ["float32", "bfloat16", "fp16", "float64", "int8", "float8_e4m3fn", "FP32"]
        values = st.sampled_from(names)
    elif key in ("include", "exclude"):
        patterns = st.sampled_from(
            [
                "mlp",
                ".*",
                "(",
                "a{4294967296}",
                "(a+)+$",
                "[",
                "\\",
                Long("x" * 5000),
                "(?P<x",
                "norm|lm_head",
                "^$",
                "embed",
                "(.*)*x",
                "(\\w+\\.?)+x",
            ]
        )
        values = st.one_of(patterns, st.lists(patterns | TEXT, max_size=3))
    elif key == "seed":
        values = st.integers(-(2**70), 2**70)
    elif key == "merge_method":
        values = st.sampled_from(
            [
                "linear",
                "ties",
                "task_arithmetic",
                "dare_ties",
                "dare_linear",
                "passthrough",
                "twin",
                "pleas",
                "TIES",
                "",
            ]
        )
    elif key == "chat_template":
        values = st.sampled_from(
            [
                "auto",
                "chatml",
                "llama3",
                "nope",
                "",
                "{{ messages }}" * 3,
                Long("{" + LONG),
                "{{ x }}\n" * 4,
                "short {",
            ]
        )
    elif key == "pad_to_multiple_of":
        values = st.one_of(
            st.sampled_from([0, 1, 8, -1, 10**9, 2**40, 2**70, True, 8.0, "8", 65536, 65537]),
            st.integers(-5, 64),
        )
    elif key == "tokens":
        token = st.sampled_from(["w1", "x1", "<new>", "", "y1", "w9"]) | TEXT
        force = st.booleans() if typed else st.booleans() | anything
        entry = st.fixed_dictionaries(
            {}, optional={"source": _token_source(m, typed), "force": force}
        )
        values = st.dictionaries(token, entry if typed else entry | anything, max_size=2)
    elif key == "kind":
        values = st.sampled_from(["zero", "model_token", "ZERO", None])
    elif key == "token_id":
        values = st.one_of(st.integers(-3, 20), st.sampled_from([10**11, 2**64, True]))
    elif key == "token":
        values = st.sampled_from(["w1", "x1", "<unk>", "zz", LONG, ""]) | TEXT
    elif key == "force":
        values = st.booleans()
    else:
        return anything
    return values if typed else st.one_of(values, anything)


def _token_source(m: dict[str, str], typed: bool = False):
    refs = _model_refs(m)
    kind = st.fixed_dictionaries({"kind": st.just("zero")})
    model_token = st.fixed_dictionaries(
        {"kind": st.just("model_token"), "model": refs},
        optional={"token": st.sampled_from(["w1", "x1", "<unk>", "zz", LONG]) | TEXT,
                  "token_id": st.integers(-2, 20) | st.sampled_from([10**11, 2**70])},
    )  # fmt: skip
    sources = st.one_of(refs, kind, model_token)
    return sources if typed else st.one_of(sources, anything)


# ---- mutations -----------------------------------------------------------------------

TOP_LEVEL = ("merge_method", "models", "slices", "base_model", "parameters", "dtype",
             "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "seed", "include",
             "exclude")  # fmt: skip
DELETE = object()


def _slots(cfg: dict[str, Any]) -> list[tuple]:
    """The key paths of a configuration where a mutation goes (present or not)."""
    slots: list[tuple] = [(k,) for k in TOP_LEVEL] + [("colour",), ("modules",), ("name",)]
    slots += [("parameters", p) for p in PARAMETERS + ("epsilon",)]
    slots += [("tokenizer", k) for k in ("source", "tokens", "pad_to_multiple_of", "colour")]
    for k in ("source", "force", "colour"):
        slots.append(("tokenizer", "tokens", "x1", k))
    for k in ("kind", "model", "token", "token_id"):
        slots.append(("tokenizer", "tokens", "<new>", "source", k))
    models = cfg.get("models") if isinstance(cfg.get("models"), list) else []
    slices = cfg.get("slices") if isinstance(cfg.get("slices"), list) else []
    for i, _ in enumerate(models):
        slots += [("models", i), ("models", i, "model"), ("models", i, "parameters"),
                  ("models", i, "name"), ("models", i, "layer_range")]  # fmt: skip
        slots += [("models", i, "parameters", p) for p in PARAMETERS]
    for i, s in enumerate(slices):
        slots += [("slices", i), ("slices", i, "sources"), ("slices", i, "base_model"),
                  ("slices", i, "parameters"), ("slices", i, "residual_weight")]  # fmt: skip
        slots += [("slices", i, "parameters", p) for p in PARAMETERS]
        sources = s.get("sources") if isinstance(s, dict) else None
        for j, _ in enumerate(sources if isinstance(sources, list) else []):
            src = ("slices", i, "sources", j)
            slots += [src, src + ("model",), src + ("layer_range",), src + ("parameters",),
                      src + ("base_model",)]  # fmt: skip
            slots += [src + ("parameters", p) for p in PARAMETERS]
    return slots


def _set(cfg: Any, path: tuple, value: Any) -> Any:
    """`cfg` with `value` at `path` (mappings created on the way; DELETE removes)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(key, int):
        if not isinstance(cfg, list):
            cfg = []
        if key < len(cfg):
            if value is DELETE and not rest:
                del cfg[key]
            else:
                cfg[key] = _set(cfg[key], rest, value)
        elif value is not DELETE:
            cfg.append(_set({}, rest, value))
        return cfg
    if not isinstance(cfg, dict):
        cfg = {}
    if value is DELETE and not rest:
        cfg.pop(key, None)
    else:
        cfg[key] = _set(cfg.get(key), rest, value)
    return cfg


def _typed(path: tuple, takes: Any = PARAMETERS) -> bool:
    """Whether a slot takes a value of a known type where it is (the parameters in the
    scopes that allow them, the real keys): a typed mutation is then out of range, not
    of the wrong kind, and reaches the planner."""
    last = path[-1]
    if last in PARAMETERS and last not in takes:
        return False
    unknown = ("colour", "modules", "name", "residual_weight", "epsilon")
    whole = ("merge_method", "parameters", "sources", "models", "slices")
    if isinstance(last, int) or last in unknown + whole:
        return False
    in_source = "sources" in path[:3]
    if (path[0] == "models" or in_source) and last in GLOBAL:
        return False
    return not (path[0] == "models" and last == "layer_range") and not (
        in_source and last == "base_model"
    )


@st.composite
def mutated(draw, m: dict[str, str]):
    """A valid configuration with one to three slots replaced (or removed): half of the
    examples with values of the right type only (out of range, or valid), in the slots
    that take them, so that they get past the parser to the planner and the merge."""
    name = draw(st.sampled_from(METHODS))
    typed = draw(st.booleans())
    cfg = _valid(m, name)
    changes = []
    for _ in range(draw(st.integers(1, 3))):
        method = cfg.get("merge_method")
        takes = [p.name for p in get_method(method).parameters] if typed else PARAMETERS
        slots = [s for s in _slots(cfg) if not typed or _typed(s, takes)]
        path = draw(st.sampled_from(slots))
        key = path[-1] if not isinstance(path[-1], int) else path[-2]
        value = draw(_value_for(m, key, typed) if typed else
                     st.one_of(_value_for(m, key), st.just(DELETE)))  # fmt: skip
        cfg = _set(cfg, path, value)
        changes.append((path, value))
    return name, changes, cfg


# ---- running one configuration -------------------------------------------------------


def _dump(cfg: Any) -> str:
    """YAML text of `cfg`, with the :class:`Raw` values written in as they are."""
    raws: dict[str, str] = {}

    def mark(v: Any) -> Any:
        if isinstance(v, Long):
            return str(v)
        if isinstance(v, Raw):
            key = f"RAWYAML{len(raws)}X"
            raws[key] = v.text
            return key
        if isinstance(v, dict):
            return {mark_key(k): mark(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x) for x in v]
        return v

    def mark_key(k: Any) -> Any:
        return mark(k) if isinstance(k, (Raw, Long)) else k

    text = yaml.safe_dump(mark(cfg), sort_keys=False, allow_unicode=True)
    for key, raw in raws.items():
        text = text.replace(key, raw)
    return text


def _run_cli(world: World, text: str | bytes, argv: tuple = ()):
    """Run ``fastmerge merge`` in-process in a new folder of ``world.work`` (the current
    directory while it runs); return the exit status, stderr and the --out path."""
    work = Path(tempfile.mkdtemp(dir=world.work))
    cfg = work / "cfg.yaml"
    cfg.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    out = work / "out"
    err, std = io.StringIO(), io.StringIO()
    # What logging's last resort prints in a real process (pytest's handler replaces it).
    warnings_to_stderr = logging.StreamHandler(err)
    warnings_to_stderr.setLevel(logging.WARNING)
    logging.getLogger().addHandler(warnings_to_stderr)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
            code = main(["merge", str(cfg), "--out", str(out), "--quiet", *argv])
    finally:
        os.chdir(cwd)
        logging.getLogger().removeHandler(warnings_to_stderr)
    return code, err.getvalue(), out


REF_KEYS = ("model", "base_model", "tokenizer_source", "source")


def _refs_in(cfg: Any) -> list[str]:
    """The model references of a configuration (a message may name one instead of the
    file: a model that does not exist)."""
    if isinstance(cfg, dict):
        own = [v for k, v in cfg.items() if k in REF_KEYS and isinstance(v, str)]
        return own + [s for v in cfg.values() for s in _refs_in(v)]
    if isinstance(cfg, list):
        return [s for v in cfg for s in _refs_in(v)]
    return []


def check_run(world: World, text: str | bytes, cfg: Any = None) -> tuple[int, str]:
    """Run one configuration and check the contract; returns (exit status, stderr)."""
    before = world.tree()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    code, err, out = _run_cli(world, text)
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - _RSS0[0]
    assert seconds < SECONDS, f"took {seconds:.1f} s: {err[:300]}"
    assert grown < RSS_GROWTH, f"peak RSS grew by {grown >> 20} MiB (from {rss >> 20} MiB)"
    assert code in (0, 2), (code, err[:500])
    if code == 0:
        _check_output(out)
        folder = os.path.relpath(out.parent, world.root)
        elsewhere = [p for p in world.tree() - before if not p.startswith(folder)]
        assert elsewhere == [], f"wrote {elsewhere}"
        shutil.rmtree(out.parent)
        return code, err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err[:1000]!r}"
    assert err.startswith(PREFIX) and "Traceback" not in err, err[:500]
    assert len(err) <= MAX_LINE, f"{len(err)} characters: {err[:300]}"
    for long in (LONG, LONG_WIDE, "x" * 5000, "9" * 400):
        assert long[:300] not in err, f"echoes a long value: {err[:300]}"
    named = [str(out.parent / "cfg.yaml"), *world.models.values(), str(world.root)]
    for ref in _refs_in(cfg):
        named.append(ref.strip()[:40] if len(ref.strip()) >= 4 else f"{ref.strip()}: ")
    assert any(n in err for n in named), f"names no file, key or model: {err}"
    assert world.tree() == before | {os.path.relpath(out.parent / "cfg.yaml", world.root),
                                     os.path.relpath(out.parent, world.root)}, (
        f"left {sorted(world.tree() - before)}"
    )  # fmt: skip
    shutil.rmtree(out.parent)
    return code, err


def _check_output(out: Path) -> None:
    """A successful merge's output is complete: the index lists every shard, which all
    load, and nothing is left beside it."""
    assert out.is_dir(), "exit 0 without the output directory"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert shards == {p.name for p in out.glob("*.safetensors")}, (shards, list(out.iterdir()))
    loaded: set[str] = set()
    for shard in shards:
        loaded.update(safetensors.torch.load_file(out / shard))
    assert loaded == set(index["weight_map"])
    assert (out / "fastmerge_config.yaml").is_file()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


_RSS0 = [0]


@pytest.fixture(scope="module", autouse=True)
def _rss_baseline(world):
    _RSS0[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- the tests -----------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_the_valid_configurations_merge(world, name):
    if name == "union" and not HAS_TRANSFORMERS:
        pytest.skip("tokenizer_source needs transformers")
    code, err = check_run(world, _dump(_valid(world.models, name)))
    assert code == 0, err


@FUZZ
@given(data=st.data())
def test_mutated_configurations_fail_cleanly(world, data):
    name, changes, cfg = data.draw(mutated(world.models), label="configuration")
    code, err = check_run(world, _dump(cfg), cfg)
    event(f"exit {code}: {_stage(err) if code else name}")


def _stage(err: str) -> str:
    """Where a failure was found (for --hypothesis-show-statistics)."""
    if " tensor " in err:
        return "the planner (a tensor named)"
    if "tokenizer" in err or "chat_template" in err:
        return "the vocabulary"
    if "YAML" in err:
        return "the YAML"
    return "the parser or the inputs"


def _with(name: str, *changes: tuple) -> Callable[[dict[str, str]], dict[str, Any]]:
    def build(m: dict[str, str]) -> dict[str, Any]:
        cfg = _valid(m, name)
        for path, value in changes:
            cfg = _set(cfg, path, value if not callable(value) else value(m))
        return cfg

    return build


#: Each defect the fuzzer found, as the configuration that showed it, and a part of the
#: message it must give now.
REGRESSIONS = {
    "int past float's range as a weight (OverflowError)": (
        _with("linear", (("models", 0, "parameters", "weight"), 2**1024 - 1)),
        "models[0].weight: must be a number, got an integer of 1024 bits, too large for model"),
    "huge int in a gradient": (
        _with("linear", (("models", 0, "parameters", "weight"), [1, Raw("hex", HUGE_HEX)])),
        "models[0].parameters.weight: gradient entry 1"),
    "int of 400 digits lambda": (
        _with("task_arithmetic", (("parameters", "lambda"), 10**400)), "lambda"),
    "int of 5000 digits (YAML's ValueError)": (
        _with("ties", (("seed",), Raw("d", "9" * 5000))), "cfg.yaml"),
    "huge layer_range stop": (
        _with("passthrough", (("slices", 0, "sources", 0, "layer_range"),
                              [0, Raw("hex", HUGE_HEX)])), "layer_range"),
    "1000-digit layer_range stop": (
        _with("passthrough", (("slices", 0, "sources", 0, "layer_range"), [0, 10**999])),
        "layer_range"),
    "include repetition too large (OverflowError)": (
        _with("linear", (("include",), "a{4294967296}")), "include"),
    "exclude not a regex": (
        _with("linear", (("exclude",), ["mlp", "("])),
        "cfg.yaml: exclude[1]: '(' is not a valid regex"),
    "include that backtracks for minutes on a tensor name (a hang)": (
        _with("linear", (("include",), "(\\w+\\.?)+x")), "cfg.yaml: include: '(\\\\w+"),
    "NUL byte in base_model": (
        _with("ties", (("base_model",), Raw("nul", '"x\\0y"'))), "base_model"),
    "NUL byte in a model": (
        _with("linear", (("models", 1, "model"), Raw("nul", '"x\\0y"'))), "models[1].model"),
    "file name too long": (_with("ties", (("models", 1, "model"), "a" * 3000)), "models[1]"),
    "tokenizer_source file name too long": (
        _with("linear", (("tokenizer_source",), "a" * 3000)), "tokenizer_source"),
    "long LoRA tokenizer_source": (
        _with("linear", (("tokenizer_source",), "q" * 3000 + "+b")), "tokenizer_source"),
    "long token source model": (
        _with("union", (("tokenizer_source",), DELETE),
              (("tokenizer", "tokens", "zz", "source"), "q/" * 1500)), "tokens.zz.source"),
    "long token": (
        _with("union", (("tokenizer_source",), DELETE),
              (("tokenizer", "tokens", "zz", "source"),
               lambda m: {"kind": "model_token", "model": m["a"], "token": LONG})),
        "tokens.zz.source.token"),
    "huge token_id": (
        _with("union", (("tokenizer_source",), DELETE),
              (("tokenizer", "tokens", "zz", "source"),
               lambda m: {"kind": "model_token", "model": m["a"],
                          "token_id": Raw("hex", HUGE_HEX)})), "token_id"),
    "token_id past the rows": (
        _with("union", (("tokenizer_source",), DELETE),
              (("tokenizer", "tokens", "zz", "source"),
               lambda m: {"kind": "model_token", "model": m["a"], "token_id": 10**11})),
        "cfg.yaml: tokenizer.tokens.zz.source"),
    "huge token kind": (
        _with("union", (("tokenizer_source",), DELETE),
              (("tokenizer", "tokens", "zz", "source"), {"kind": Raw("hex", HUGE_HEX)})),
        "kind"),
    "long unknown tokenizer key": (
        _with("union", (("tokenizer_source",), DELETE), (("tokenizer", LONG), 1)), "tokenizer"),
    "pad_to_multiple_of 10**8 (a 100M-row embedding)": (
        _with("union", (("tokenizer_source",), DELETE),
              (("tokenizer", "pad_to_multiple_of"), 10**8)), "pad_to_multiple_of"),
    "pad_to_multiple_of huge (TypeError)": (
        _with("union", (("tokenizer_source",), DELETE),
              (("tokenizer", "pad_to_multiple_of"), Raw("hex", HUGE_HEX))),
        "pad_to_multiple_of"),
    "conditional settings alias bomb (43M mappings)": (
        _with("ties", (("parameters", "weight"), Raw("bomb", _setting_bomb()))), None),
    "conditional settings alias bomb, then a bad entry": (
        _with("ties", (("parameters", "weight"), Raw("bomb", _setting_bomb(bad_tail=True)))),
        "cfg.yaml: parameters.weight[9]: unknown key 'colour'"),
    "huge int where it is never used (fastmerge_config.yaml cannot hold it)": (
        _with("ties", (("parameters", "weight"), Raw("hex", HUGE_HEX))),
        "cfg.yaml: parameters.weight: an integer of 20000 bits is too large"),
    "a value of the wrong type in the planner names the file": (
        _with("linear", (("parameters", "normalize"), "true")),
        "cfg.yaml: parameters.normalize: must be true or false, got 'true' ("),
    "lone surrogate in chat_template": (
        _with("linear", (("chat_template",), Raw("s", '"{{ messages }} \\ud800 and more"'))),
        "cfg.yaml: chat_template: must be valid Unicode"),
    "lone surrogate token (TypeError in transformers)": (
        _with("union", (("tokenizer_source",), DELETE),
              (("tokenizer", "tokens"), Raw("s", '{"\\ud800": {source: {kind: zero}}}'))),
        "is not valid Unicode"),
    "unhashable token source kind (TypeError)": (
        _with("union", (("tokenizer_source",), DELETE),
              (("tokenizer", "tokens", "zz", "source"), {"kind": ["zero"]})),
        "tokens.zz.source.kind: must be zero or model_token, got a list"),
    "a model's settings named by its index in models (the base counted)": (
        _with("ties", (("models", 2, "parameters", "density"), 1.5)),
        "cfg.yaml: models[2].density: must be in (0, 1], got 1.5 for model"),
    "the base's own settings named by its index in models": (
        _with("linear", (("base_model",), lambda m: m["a"]),
              (("models", 0, "parameters", "weight"), "heavy")),
        "cfg.yaml: models[0].weight: must be a number, got 'heavy' for model"),
    "recursive conditional setting that matches (RecursionError)": (
        _with("linear", (("models", 0, "parameters", "weight"),
                         Raw("r", "&q {value: *q, filter: mlp}"))),
        "cfg.yaml: models[0].parameters.weight[0].value"),
    "a warning, then the error (two lines on stderr)": (
        _with("passthrough", (("tokenizer", "tokens", "x1", "source"), lambda m: m["b"])),
        "cfg.yaml: tokenizer.tokens.x1.source: token 'x1' needs the embed of model 1"),
    "top-level parameters named once": (
        _with("ties", (("parameters", "weight"), Raw("date", "2020-01-01"))),
        "cfg.yaml: parameters.weight:"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_regressions(world, case):
    build, message = REGRESSIONS[case]
    cfg = build(world.models)
    code, err = check_run(world, _dump(cfg), cfg)
    if message is not None:
        assert code == 2 and message in err, err


WHOLE_DOCUMENTS = {
    "empty file": b"",
    "only a comment": b"# nothing\n",
    "a list": b"- merge_method: linear\n- models: [a]\n",
    "a scalar": b"linear\n",
    "null": b"~\n",
    "invalid YAML": b"merge_method: linear\nmodels: [a, b\n",
    "tab indentation": b"merge_method: linear\nmodels:\n\t- a\n",
    "duplicate anchors and unknown alias": b"a: *nope\n",
    "binary garbage": bytes(range(256)) * 4,
    "not UTF-8": b"merge_method: linear\nmodels: [\xff\xfe]\n",
    "UTF-16": "merge_method: linear\nmodels: [a, b]\n".encode("utf-16"),
    "NUL bytes": b"merge_method: linear\x00\nmodels: [a]\n",
    "10,000 nested lists": b"[" * 10_000 + b"]" * 10_000,
    "10,000 nested mappings": b"{a: " * 10_000 + b"1" + b"}" * 10_000,
    "10,000 nested block lists": b"".join(b"  " * i + b"-\n" for i in range(2_000)),
    "string bomb document": _string_bomb().encode(),
    "setting bomb document": _setting_bomb().encode(),
    "huge hex document": HUGE_HEX.encode(),
    "a mapping with a list key": b"? [a, b]\n: 1\n",
    "python tag": b"!!python/object/apply:os.getcwd []\n",
    "many documents": b"merge_method: linear\n---\nmerge_method: ties\n",
}  # fmt: skip


@pytest.mark.parametrize("case", list(WHOLE_DOCUMENTS))
def test_whole_documents(world, case):
    code, err = check_run(world, WHOLE_DOCUMENTS[case])
    assert code == 2, err


_SUBPROCESS = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from fastmerge.cli import main
sys.exit(main(["merge", sys.argv[1], "--out", sys.argv[2]]))
"""


@pytest.mark.parametrize(
    "case",
    ["string bomb", "setting bomb", "binary garbage", "10,000 nested lists", "density 1.5"],
)
def test_real_exit_status_in_a_subprocess(world, case):
    """The real process: exit status 2, stderr one line, no traceback, under 2 GB."""
    m = world.models
    if case in ("string bomb", "setting bomb"):
        bomb = _string_bomb() if case == "string bomb" else _setting_bomb(bad_tail=True)
        text = _dump(_set(_valid(m, "ties"), ("parameters", "weight"), Raw(case, bomb)))
    elif case == "density 1.5":  # reaches the planner: the message names model and tensor
        text = _dump(_set(_valid(m, "ties"), ("models", 2, "parameters", "density"), 1.5))
    else:
        text = WHOLE_DOCUMENTS[case]
    work = Path(tempfile.mkdtemp(dir=world.work))
    (work / "cfg.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _SUBPROCESS, str(work / "cfg.yaml"), str(work / "out")],
            capture_output=True, text=True, timeout=120, cwd=work, env=env,
        )  # fmt: skip
        left = sorted(p.name for p in work.iterdir())
    finally:
        shutil.rmtree(work)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(PREFIX), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr) <= MAX_LINE
    assert left == ["cfg.yaml"]
    if case == "density 1.5":
        assert "models[2].density: must be in (0, 1], got 1.5 for model" in proc.stderr
        assert "(pre tensor model.embed_tokens.weight)" in proc.stderr


def test_nothing_left_in_the_work_folder(world):
    """Every example removed its own folder: nothing else was written there."""
    assert sorted(os.listdir(world.work)) == []
