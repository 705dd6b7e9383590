"""``fastmerge merge`` with fastmerge's own methods: ``twin`` and ``pleas``."""

from __future__ import annotations

import json
import os
import sys

import pytest
import safetensors.torch
import torch
import yaml
from torch import nn

import fastmerge.pleas
from fastmerge import io
from fastmerge.cli import main
from fastmerge.engine import ConfigError, parse_config
from fastmerge.engine import run as run_merge
from fastmerge.engine.methods.pleas import jsonable
from fastmerge.twin import TwinMerger


def mlp_state(seed: int, base=None) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if base is not None:
        state = {k: base[k] + 0.1 * v for k, v in state.items()}
    state["steps"] = torch.tensor(seed, dtype=torch.int64)  # an integer buffer
    return state


def save_hf_dir(path, tensors) -> None:
    path.mkdir(parents=True)
    safetensors.torch.save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "mlp", "torch_dtype": "float32"}))
    (path / "tokenizer_config.json").write_text("{}")


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_yaml(tmp_path, cfg, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------ twin

NAMES = ("math", "code", "chat")


@pytest.fixture
def twin_models(tmp_path):
    base = mlp_state(0)
    experts = [mlp_state(i, base) for i in (1, 2, 3)]
    save_hf_dir(tmp_path / "base", base)
    for name, e in zip(NAMES, experts):
        save_hf_dir(tmp_path / name, e)
    return tmp_path, base, experts


def twin_config(tmp, parameters=None, **extra):
    cfg = {
        "merge_method": "twin",
        "base_model": str(tmp / "base"),
        "models": [{"model": str(tmp / n), "name": n} for n in NAMES],
        "parameters": parameters or {},
    }
    cfg.update(extra)
    return cfg


def assert_states_equal(got, expected):
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k


@pytest.mark.parametrize(
    "parameters, dtype",
    [
        (
            {"shared": "ties", "shared_kwargs": {"density": 0.5}, "rank": 2, "exclude": "^2\\."},
            None,
        ),
        ({"rank": 0.5, "shared_kwargs": {"scale": 0.4}}, "bfloat16"),
    ],
)
def test_twin_writes_the_shared_model_and_the_factors(twin_models, capsys, parameters, dtype):
    tmp, base, experts = twin_models
    extra = {"dtype": dtype} if dtype else {}
    cfg = write_yaml(tmp, twin_config(tmp, parameters, **extra))
    out = tmp / "out"
    code, stdout, err = run(["merge", str(cfg), "--out", str(out), "--shard-size", "100B"], capsys)
    assert code == 0, err
    assert "merged 5 tensors" in stdout

    cast = torch.bfloat16 if dtype else None

    def inputs(state):
        return {k: v.to(cast) if cast and v.is_floating_point() else v for k, v in state.items()}

    expected = TwinMerger(
        inputs(base),
        {n: inputs(e) for n, e in zip(NAMES, experts)},
        shared=parameters.get("shared", "task_arithmetic"),
        shared_kwargs=parameters["shared_kwargs"],
        rank=parameters["rank"],
        exclude=parameters.get("exclude"),
        progress=False,
    )
    # The output directory is a checkpoint of the shared model ...
    shards = {k: v for k, v in io.open_checkpoint(out).items()}
    assert_states_equal(shards, expected.shared_state)
    names = sorted(os.listdir(out))
    assert sum(n.endswith(".safetensors") for n in names) >= 2 and io.INDEX_NAME in names
    assert {"config.json", "tokenizer_config.json", "fastmerge_config.yaml", "twin"} <= set(names)
    torch_dtype = json.loads((out / "config.json").read_text())["torch_dtype"]
    assert torch_dtype == (dtype or "float32")
    # ... and twin/ holds the whole merger.
    loaded = TwinMerger.load(out / "twin")
    assert loaded.task_names == NAMES and loaded.rank == parameters["rank"]
    assert_states_equal(loaded.shared_state, expected.shared_state)
    assert sorted(loaded.factors) == sorted(expected.factors) and expected.factors
    for key, (us, vs) in expected.factors.items():
        assert torch.equal(loaded.factors[key][0], us) and torch.equal(loaded.factors[key][1], vs)
    assert sorted(loaded.dense_deltas) == sorted(expected.dense_deltas)
    for key, delta in expected.dense_deltas.items():
        assert torch.equal(loaded.dense_deltas[key], delta)
    if "exclude" in parameters:  # the excluded matrix is kept dense
        assert "2.weight" in loaded.dense_deltas and "2.weight" not in loaded.factors


def test_twin_default_task_names(twin_models, capsys):
    tmp, _, _ = twin_models
    cfg = twin_config(tmp)
    cfg["models"] = [str(tmp / n) for n in NAMES]
    code, _, err = run(
        ["merge", str(write_yaml(tmp, cfg)), "--out", str(tmp / "o"), "--quiet"], capsys
    )
    assert code == 0, err
    assert TwinMerger.load(tmp / "o" / "twin").task_names == ("task0", "task1", "task2")


TWIN_BAD = {
    "unknown parameter": (
        {"parameters": {"colour": 1}},
        "unknown key 'colour'; valid keys: shared, shared_kwargs, rank",
    ),
    "unknown top-level key": ({"include": "x"}, "unknown key 'include'; valid keys: merge_method"),
    "unknown shared kwarg": (
        {"parameters": {"shared": "ties", "shared_kwargs": {"drop": 0.1}}},
        "unknown key 'drop'; valid keys: density, scale",
    ),
    "bad shared method": ({"parameters": {"shared": "slerp"}}, "shared 'slerp' is not supported"),
    "bad rank": ({"parameters": {"rank": 1.5}}, "a float rank is a fraction"),
    "bad regex": ({"parameters": {"include": "("}}, "not a valid regex"),
    "bad kwarg type": (
        {"parameters": {"shared_kwargs": {"scale": "big"}}},
        "twin: the shared merge task_arithmetic failed with shared_kwargs",
    ),
    "no base": ({"base_model": None}, "needs a base_model"),
    "repeated name": (
        {"models": [{"model": "a", "name": "x"}, {"model": "b", "name": "x"}]},
        "repeats the task name 'x'",
    ),
    "model keys": (
        {"models": [{"model": "a", "parameters": {}}]},
        "unknown key 'parameters'; valid keys: model, name",
    ),
    "expert shape": (None, "'0.weight' is torch.float32 [8, 5]"),
    "output exists": ("exists", "exists (pass --overwrite"),
}


@pytest.mark.parametrize("case", list(TWIN_BAD))
def test_twin_bad_input_exit_2_nothing_written(twin_models, capsys, case):
    tmp, base, _ = twin_models
    change, message = TWIN_BAD[case]
    cfg = twin_config(tmp)
    if change is None:
        bad = dict(base, **{"0.weight": torch.zeros(8, 5)})
        safetensors.torch.save_file(bad, tmp / "code" / "model.safetensors")
    elif change == "exists":
        (tmp / "out").mkdir()
    else:
        cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = write_yaml(tmp, cfg)
    before = sorted(os.listdir(tmp))
    code, _, err = run(["merge", str(path), "--out", str(tmp / "out"), "--quiet"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fastmerge merge: error") and message in err, err
    assert sorted(os.listdir(tmp)) == before


def test_twin_parse_config():
    cfg = parse_config(
        {
            "merge_method": "twin",
            "base_model": "b",
            "models": ["x", "y"],
            "parameters": {"rank": 3, "shared": "average"},
        }
    )
    assert cfg.method == "twin" and [e.name for e in cfg.experts] == ["task0", "task1"]
    assert cfg.shared["rank"] == 3 and cfg.all_models()[0].name == "b"
    with pytest.raises(ConfigError, match="valid: .*linear.*pleas.*twin"):
        parse_config({"merge_method": "model_soup_v9", "models": ["x"]})


# ----------------------------------------------------------------------------------- pleas

USER_MODULE = """
import torch
from torch import nn

CONSTANT = 3


def mlp():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def batches():
    gen = torch.Generator().manual_seed(123)
    return [torch.randn(32, 4, generator=gen) for _ in range(4)]


def no_module():
    return 42


def no_data():
    return 7


def broken():
    raise RuntimeError("cannot build")
"""


@pytest.fixture
def pleas_setup(tmp_path):
    """A user module (unique name) in tmp_path/code, and two checkpoints of its mlp()."""
    name = f"user_{tmp_path.name}"
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / f"{name}.py").write_text(USER_MODULE)
    (code_dir / f"{name}_fails.py").write_text("raise ImportError('missing dependency')\n")
    sys.path.insert(0, str(code_dir))
    try:
        user = __import__(name)
    finally:
        sys.path.remove(str(code_dir))
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(user.mlp().state_dict())
        safetensors.torch.save_file(states[-1], tmp_path / f"m{seed}.safetensors")
    yield tmp_path, name, user, states
    for mod in (name, f"{name}_fails"):
        sys.modules.pop(mod, None)


def pleas_config(tmp, name, **parameters):
    params = {"model": f"{name}:mlp", "data": f"{name}:batches"}
    params.update(parameters)
    return {
        "merge_method": "pleas",
        "module_path": str(tmp / "code"),
        "models": [{"model": str(tmp / "m1.safetensors")}, {"model": str(tmp / "m2.safetensors")}],
        "parameters": params,
    }


def expected_pleas(user, states, **kwargs):
    models = []
    for state in states:
        m = user.mlp()
        m.load_state_dict(state)
        models.append(m.eval())
    return fastmerge.pleas.merge(models[0], models[1], user.batches(), **kwargs)


@pytest.mark.parametrize(
    "parameters", [{"budget": 1.5}, {"budget": 1.25, "method": "zipit", "data_free": True}]
)
def test_pleas_matches_the_in_memory_merge(pleas_setup, capsys, parameters):
    tmp, name, user, states = pleas_setup
    cfg = write_yaml(tmp, pleas_config(tmp, name, **parameters))
    out = tmp / "out"
    code, stdout, err = run(
        ["merge", str(cfg), "--trust-remote-code", "--out", str(out), "--shard-size", "500B"],
        capsys,
    )
    assert code == 0, err
    assert "merged 6 tensors" in stdout
    assert str(tmp / "code") not in sys.path  # module_path is removed afterwards

    expected = expected_pleas(user, states, **parameters)
    state = {k: v for k, v in io.open_checkpoint(out).items()}
    expected_state = expected.state_dict()
    assert sorted(state) == sorted(expected_state)
    for k, v in expected_state.items():
        assert torch.equal(state[k], v), k
    widened = sum(v.numel() for v in state.values())
    assert widened > sum(v.numel() for v in states[0].values())  # units kept from both
    expected.load_state_dict(state)  # loads into the merged architecture
    info = json.loads((out / "pleas_info.json").read_text())
    assert info == json.loads(json.dumps(jsonable(expected.fastmerge_info)))
    assert info["method"] == parameters.get("method", "pleas")
    assert info["relative_flops"] <= parameters["budget"] and info["data_free"] == (
        "data_free" in parameters
    )
    names = sorted(os.listdir(out))
    assert {"fastmerge_config.yaml", io.INDEX_NAME, "pleas_info.json"} <= set(names)
    assert sum(n.endswith(".safetensors") for n in names) >= 2


PLEAS_BAD = {
    "no colon": ({"model": "{name}"}, "parameters.model must name a function"),
    "import fails": ({"data": "{name}_fails:f"}, "parameters.data: cannot import"),
    "no such module": ({"model": "fastmerge_no_such_module:f"}, "parameters.model: cannot import"),
    "no attribute": ({"model": "{name}:nope"}, "parameters.model: '{name}' has no attribute"),
    "not callable": ({"data": "{name}:CONSTANT"}, "parameters.data: '{name}:CONSTANT' is not"),
    "not a module": ({"model": "{name}:no_module"}, "returned int, not an nn.Module"),
    "not iterable": ({"data": "{name}:no_data"}, "parameters.data: {name}:no_data() returned int"),
    "raises": ({"model": "{name}:broken"}, "broken() raised RuntimeError: cannot build"),
    "unknown parameter": ({"epochs": 3}, "unknown key 'epochs'; valid keys: model, data, budget"),
    "bad budget": ({"budget": "big"}, "budget must be a number"),
    "budget range": ({"budget": 3.0}, "budget must be in [1, 2]"),
    "bad method": ({"method": "slerp"}, "method 'slerp' is not one of average, permute"),
    "bad allocation": ({"allocation": "x"}, "allocation 'x' is not one of uniform"),
    "missing data": ({"data": None}, "parameters.data must name a function"),
}


@pytest.mark.parametrize("case", list(PLEAS_BAD))
def test_pleas_bad_callables_exit_2_nothing_written(pleas_setup, capsys, case):
    tmp, name, _, _ = pleas_setup
    change, message = PLEAS_BAD[case]
    change = {k: v.format(name=name) if isinstance(v, str) else v for k, v in change.items()}
    cfg = write_yaml(tmp, pleas_config(tmp, name, **change))
    before = sorted(os.listdir(tmp))
    code, _, err = run(
        ["merge", str(cfg), "--trust-remote-code", "--out", str(tmp / "out"), "--quiet"], capsys
    )
    assert code == 2
    message = message.format(name=name)
    assert err.count("\n") == 1 and err.startswith("fastmerge merge: error") and message in err, err
    assert sorted(os.listdir(tmp)) == before


@pytest.mark.parametrize(
    "change, message",
    [
        ({"module_path": "no/such/dir"}, "module_path: no/such/dir is not a directory"),
        ({"models": ["a", "b", "c"]}, "exactly 2 models, got 3"),
        ({"base_model": "b"}, "unknown key 'base_model'; valid keys: merge_method, models"),
        ({"parameters": "x"}, "parameters must be a mapping"),
    ],
)
def test_pleas_config_errors(pleas_setup, capsys, change, message):
    tmp, name, _, _ = pleas_setup
    cfg = pleas_config(tmp, name)
    cfg.update(change)
    path = write_yaml(tmp, cfg)
    before = sorted(os.listdir(tmp))
    code, _, err = run(
        ["merge", str(path), "--trust-remote-code", "--out", str(tmp / "out"), "--quiet"], capsys
    )
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp)) == before


def test_pleas_refuses_to_import_without_trust_remote_code(pleas_setup, capsys):
    tmp, name, _, _ = pleas_setup
    marker = tmp / "imported"
    (tmp / "code" / "spy_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef f(): return None\n"
    )
    cfg = write_yaml(tmp, pleas_config(tmp, name, model="spy_module:f", data="spy_module:f"))
    before = sorted(os.listdir(tmp))
    code, _, err = run(["merge", str(cfg), "--out", str(tmp / "out")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "parameters.model, parameters.data, module_path" in err and "--trust-remote-code" in err
    assert not marker.exists()  # refused before anything was imported
    assert sorted(os.listdir(tmp)) == before
    with pytest.raises(ConfigError, match="--trust-remote-code"):
        run_merge(cfg, tmp / "out")  # the library entry point too: trust_remote_code=False


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "sys:exit"}, "parameters.model: sys:exit() exited: it called sys.exit()"),
        (
            {"data": "exits_on_import:f"},
            "parameters.data: cannot import 'exits_on_import' (it called",
        ),
    ],
)
def test_pleas_callables_that_exit_are_clean_errors(pleas_setup, capsys, change, message):
    tmp, name, _, _ = pleas_setup
    (tmp / "code" / "exits_on_import.py").write_text("import sys\nsys.exit(3)\n")
    cfg = write_yaml(tmp, pleas_config(tmp, name, **change))
    code, _, err = run(["merge", str(cfg), "--trust-remote-code", "--out", str(tmp / "out")],
                       capsys)  # fmt: skip
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp / "out").exists()


def test_pleas_weights_that_do_not_fit(pleas_setup, capsys):
    tmp, name, _, states = pleas_setup
    bad = dict(states[1], **{"2.weight": torch.zeros(8, 15)})
    safetensors.torch.save_file(bad, tmp / "m2.safetensors")
    cfg = write_yaml(tmp, pleas_config(tmp, name))
    code, _, err = run(
        ["merge", str(cfg), "--trust-remote-code", "--out", str(tmp / "out"), "--quiet"], capsys
    )
    assert code == 2 and "m2.safetensors: does not fit the module" in err and err.count("\n") == 1
    assert not (tmp / "out").exists()


def test_jsonable_named_tuples_and_tensors():
    from fastmerge.pleas.least_squares_stage import LayerFit

    fields = {f: 1.0 for f in LayerFit._fields}
    got = jsonable({"fits": {"0": LayerFit(**fields)}, "t": torch.tensor([1, 2]), "x": None})
    assert got == {"fits": {"0": fields}, "t": [1, 2], "x": None}
    json.dumps(got)
