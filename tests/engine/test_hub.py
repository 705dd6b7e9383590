"""Model references and their resolution through the Hugging Face cache, never the network:
every test runs with HF_HUB_OFFLINE=1, a temporary HF_HOME/HF_HUB_CACHE, and sockets that
record and refuse any connection."""

from __future__ import annotations

import doctest
import hashlib
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastmerge.engine import hub
from fastmerge.engine.errors import ConfigError
from fastmerge.engine.hub import ModelReference, parse_model_reference, resolve_model
from fastmerge.io import CheckpointError, open_checkpoint

huggingface_hub = pytest.importorskip("huggingface_hub")
safetensors_torch = pytest.importorskip("safetensors.torch")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Refuse (and record) every connection and name look-up; fail the test if any happened
    even when the code under test swallowed the error."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache under a temporary HF_HOME, offline, with a working directory
    where no ``org/...`` folder exists."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


def weights(value: float = 1.0) -> bytes:
    return safetensors_torch.save({"w": torch.full((2, 3), value)})


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict, refs=("main",)) -> Path:
    """A snapshot in the hub cache's real layout: ``models--org--name/blobs/<hash>``,
    ``snapshots/<commit>/<file>`` as relative symlinks to the blobs, ``refs/<ref>``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        data = data.encode() if isinstance(data, str) else data
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(os.path.relpath(blob, target.parent), target)
        except OSError:  # no symlinks here: the hub then stores copies too
            target.write_bytes(data)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # no trailing newline, as the hub writes
    return snapshot


MODEL_FILES = {
    "config.json": '{"model_type": "llama"}',
    "model.safetensors": weights(),
    "tokenizer.json": "{}",
}


# --- resolving hub ids from the cache -------------------------------------------------


def test_guard_refuses_connections(no_network):
    with pytest.raises(OSError):
        socket.create_connection(("huggingface.co", 443))
    no_network.clear()


@pytest.mark.parametrize("suffix", ["", "@main", f"@{COMMIT}"])
def test_cached_repo_resolves_offline(cache, suffix):
    snapshot = add_snapshot(cache, "org/name", COMMIT, MODEL_FILES)
    path = resolve_model("org/name" + suffix)
    assert path == snapshot
    assert path.parent.parent.name == "models--org--name"
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert (path / "config.json").read_text() == '{"model_type": "llama"}'
    assert open_checkpoint(path)["w"].tolist() == [[1.0] * 3] * 2


def test_tag_and_unreferenced_commit(cache):
    add_snapshot(cache, "org/name", COMMIT, MODEL_FILES)
    old = add_snapshot(
        cache, "org/name", OLD_COMMIT, {**MODEL_FILES, "model.safetensors": weights(2.0)},
        refs=("v1",),
    )  # fmt: skip
    assert resolve_model("org/name@v1") == old
    assert resolve_model(f"org/name@{OLD_COMMIT}") == old
    assert open_checkpoint(resolve_model("org/name@v1"))["w"][0, 0].item() == 2.0
    assert resolve_model("org/name") != old


def test_repo_without_namespace(cache):
    snapshot = add_snapshot(cache, "gpt2", COMMIT, MODEL_FILES)
    assert resolve_model("gpt2") == snapshot


def test_offline_argument_without_the_environment(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    snapshot = add_snapshot(cache, "org/name", COMMIT, MODEL_FILES)
    assert resolve_model("org/name", offline=True) == snapshot


def test_explicit_cache_dir_and_hf_home(cache, tmp_path, monkeypatch):
    other = tmp_path / "other_cache"
    snapshot = add_snapshot(other, "org/name", COMMIT, MODEL_FILES)
    assert resolve_model("org/name", cache_dir=other) == snapshot
    with pytest.raises(CheckpointError):
        resolve_model("org/name")  # not in the environment's cache
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home2"))
    assert hub.default_cache_dir() == tmp_path / "home2" / "hub"
    home_snapshot = add_snapshot(tmp_path / "home2" / "hub", "org/name", COMMIT, MODEL_FILES)
    assert resolve_model("org/name") == home_snapshot


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.default_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.default_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.default_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub.default_cache_dir() == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", "~/hubcache")
    assert hub.default_cache_dir() == tmp_path / "hubcache"


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"HF_HUB_OFFLINE": "1"}, True),
        ({"HF_HUB_OFFLINE": "true"}, True),
        ({"HF_HUB_OFFLINE": "0"}, False),
        ({"TRANSFORMERS_OFFLINE": "yes"}, True),
    ],
)
def test_hub_offline_reads_the_environment_now(monkeypatch, env, expected):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert hub.hub_offline() is expected


# --- errors -----------------------------------------------------------------------------


def test_uncached_repo_offline(cache):
    with pytest.raises(CheckpointError) as err:
        resolve_model("org/missing")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("org/missing: not in the Hugging Face cache ")
    assert str(cache) in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "run once online" in message and "HF_HOME" in message


def test_uncached_repo_with_offline_argument(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(CheckpointError, match=r"offline \(offline=True\)"):
        resolve_model("org/missing", offline=True)


def test_uncached_revision_of_a_cached_repo(cache):
    add_snapshot(cache, "org/name", COMMIT, MODEL_FILES)
    with pytest.raises(CheckpointError, match=r"^org/name@v9: not in the Hugging Face cache"):
        resolve_model("org/name@v9")
    with pytest.raises(CheckpointError, match=rf"^org/name@{OLD_COMMIT}: not in the"):
        resolve_model(f"org/name@{OLD_COMMIT}")


def test_snapshot_without_weights(cache):
    add_snapshot(cache, "org/config-only", COMMIT, {"config.json": "{}"})
    with pytest.raises(CheckpointError) as err:
        resolve_model("org/config-only")
    assert str(err.value).startswith("org/config-only: no *.safetensors weights")
    assert "run once online" in str(err.value) and "\n" not in str(err.value)
    assert resolve_model("org/config-only", require_weights=False).name == COMMIT


def test_pickle_weights_only_with_include_bin(cache):
    snapshot = add_snapshot(
        cache, "org/old", COMMIT, {"config.json": "{}", "pytorch_model.bin": b"\0"}
    )
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        resolve_model("org/old")
    assert resolve_model("org/old", include_bin=True) == snapshot


def test_missing_local_path(cache, tmp_path):
    for text in ["./missing", str(tmp_path / "nowhere"), "a/b/c"]:
        with pytest.raises(CheckpointError) as err:
            resolve_model(text)
        assert str(err.value) == f"{Path(text)}: local model path does not exist"


class FakeDownload:
    """Stands in for huggingface_hub.snapshot_download: records its arguments, then
    returns `folder` or raises `error`."""

    def __init__(self, folder=None, error=None):
        self.folder, self.error, self.calls = folder, error, []

    def __call__(self, repo_id, **kwargs):
        self.calls.append((repo_id, kwargs))
        if self.error is not None:
            raise self.error
        return str(self.folder)


def test_download_arguments(cache, monkeypatch, tmp_path):
    folder = tmp_path / "snap"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(weights())
    fake = FakeDownload(folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve_model("org/name@dev") == folder
    repo_id, kwargs = fake.calls[-1]
    assert repo_id == "org/name" and kwargs["revision"] == "dev"
    assert kwargs["local_files_only"] is False
    assert kwargs["cache_dir"] == str(cache)
    patterns = kwargs["allow_patterns"]
    for pattern in [
        "*.safetensors",
        "*.safetensors.index.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "*.model",
        "*.tiktoken",
        "*.jinja",
    ]:
        assert pattern in patterns
    assert not any(".bin" in pattern for pattern in patterns)
    assert "consolidated*.safetensors" in kwargs["ignore_patterns"]

    resolve_model("org/name", include_bin=True, cache_dir=tmp_path / "c")
    _, kwargs = fake.calls[-1]
    assert "*.bin" in kwargs["allow_patterns"] and "*.bin.index.json" in kwargs["allow_patterns"]
    assert kwargs["revision"] is None and kwargs["cache_dir"] == str(tmp_path / "c")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolve_model("org/name")
    assert fake.calls[-1][1]["local_files_only"] is True
    resolve_model("org/name", offline=False)
    assert fake.calls[-1][1]["local_files_only"] is False


def _response(status: int):
    return SimpleNamespace(status_code=status, headers={}, request=None)


def _hub_errors():
    from huggingface_hub import errors

    return errors


def _connect_error():
    """A LocalEntryNotFoundError caused by a connection failure, as an online
    snapshot_download raises it when the Hub is unreachable and nothing is cached."""
    errors = _hub_errors()
    try:
        try:
            raise ConnectionError("[Errno 101] Network is unreachable")
        except ConnectionError as cause:
            raise errors.LocalEntryNotFoundError("Got: ConnectError\nAn error happened") from cause
    except errors.LocalEntryNotFoundError as err:
        return err


@pytest.mark.parametrize(
    "make_error, expected",
    [
        (
            lambda e: e.RepositoryNotFoundError(
                "404 Client Error.\n\nRepo", response=_response(404)
            ),
            r"^org/name@dev: no such model repository on the Hugging Face Hub, or it is private",
        ),
        (
            lambda e: e.GatedRepoError("403 Client Error.\n\nGated", response=_response(403)),
            r"^org/name@dev: a gated repository; accept its conditions on "
            r"https://huggingface.co/org/name",
        ),
        (
            lambda e: e.RevisionNotFoundError("404 Client Error.\n\nRev", response=_response(404)),
            r"^org/name@dev: revision 'dev' not found on the Hugging Face Hub",
        ),
        (
            lambda e: e.HfHubHTTPError("500 Server Error.\n\nDown", response=_response(500)),
            r"^org/name@dev: the Hugging Face Hub refused the download \(HfHubHTTPError: 500",
        ),
        (
            lambda e: _connect_error(),
            r"^org/name@dev: could not reach the Hugging Face Hub \(ConnectionError: \[Errno 101\]",
        ),
        (
            lambda e: TimeoutError("timed out"),
            r"^org/name@dev: could not download from the Hugging Face Hub \(TimeoutError",
        ),
        (
            lambda e: PermissionError(13, "Permission denied"),
            r"^org/name@dev: could not store the download in the cache .*PermissionError.*"
            r"set HF_HOME \(or HF_HUB_CACHE\) to a writable folder",
        ),
    ],
)
def test_hub_errors_are_one_line(cache, monkeypatch, make_error, expected):
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", FakeDownload(error=make_error(_hub_errors()))
    )
    with pytest.raises(CheckpointError, match=expected) as err:
        resolve_model("org/name@dev", offline=False)
    assert "\n" not in str(err.value)
    assert err.value.__cause__ is not None


def test_unrelated_errors_propagate(cache, monkeypatch):
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", FakeDownload(error=RuntimeError("a bug"))
    )
    with pytest.raises(RuntimeError, match="a bug"):
        resolve_model("org/name")


# --- parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, repo_id, revision",
    [
        ("org/name", "org/name", None),
        ("org/name@main", "org/name", "main"),
        (f"org/name@{COMMIT}", "org/name", COMMIT),
        ("org/name@refs/pr/1", "org/name", "refs/pr/1"),
        ("Org-1/Model_2.5-Instruct@v1.0", "Org-1/Model_2.5-Instruct", "v1.0"),
        ("gpt2", "gpt2", None),
        ("  org/name  ", "org/name", None),
    ],
)
def test_parse_hub_ids(cache, text, repo_id, revision):
    ref = parse_model_reference(text)
    assert (ref.path, ref.repo_id, ref.revision, ref.lora) == (None, repo_id, revision, None)
    assert not ref.is_local and ref.hub_url == f"https://huggingface.co/{repo_id}"
    assert str(ref) == text.strip()
    assert parse_model_reference(str(ref)) == ref


def test_existing_local_path_wins_over_hub_id(cache):
    Path("org/name").mkdir(parents=True)
    Path("plain").mkdir()
    for text in ["org/name", "plain", "./org/name", "org/name/"]:
        ref = parse_model_reference(text)
        assert ref.is_local and ref.repo_id is None and ref.hub_url is None
        assert resolve_model(text) == Path(text)
        assert resolve_model(ref).is_dir()


def test_local_paths(cache, tmp_path, monkeypatch):
    model = tmp_path / "models" / "a"
    model.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_model_reference(str(model)).path == model
    assert parse_model_reference("~/models/a").path == model
    assert resolve_model("~/models/a") == model
    assert parse_model_reference("../models/a").path == Path("../models/a")
    assert resolve_model("../models/a").resolve() == model.resolve()
    # existing paths with the characters of the other syntaxes
    odd = tmp_path / "models" / "x+y@z"
    odd.mkdir()
    assert resolve_model(str(odd)) == odd
    # paths that look local parse even when missing; resolving reports them
    assert parse_model_reference("./missing@main").path == Path("missing@main")
    assert parse_model_reference("/no/such/dir").path == Path("/no/such/dir")
    assert parse_model_reference("a/b/c").path == Path("a/b/c")
    assert parse_model_reference("~/nothing").path == tmp_path / "nothing"


def test_revision_of_a_local_path(cache):
    Path("models/a").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"'models/a' is a local path; a revision \(@main\)"):
        parse_model_reference("models/a@main")
    with pytest.raises(ConfigError, match="applies only to a Hugging Face repo id"):
        ModelReference(path=Path("models/a"), revision="main")


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty model reference"),
        ("   ", "empty model reference"),
        ("org/name@a@b", "more than one '@'"),
        ("org/name@", "empty revision"),
        ("@main", "neither an existing local path nor a Hugging Face repo id"),
        ("org/na me", "neither an existing local path"),
        ("org/name@has space", "contains whitespace"),
        ("org/-name", "neither an existing local path"),
        ("org/na--me", "neither an existing local path"),
        ("org/na..me", "neither an existing local path"),
        ("org/name.git", "neither an existing local path"),
        ("org/" + "x" * 97, "neither an existing local path"),
        ("org/n:ame", "neither an existing local path"),
        ("a+b+c", r"expected MODEL or MODEL\+LORA"),
        ("+org/lora", r"expected MODEL or MODEL\+LORA"),
        ("org/base+", r"expected MODEL or MODEL\+LORA"),
        (7, "must be a string, got int"),
    ],
)
def test_bad_references(cache, text, match):
    with pytest.raises(ConfigError, match=match) as err:
        parse_model_reference(text)
    assert "\n" not in str(err.value)
    if isinstance(text, str):
        with pytest.raises(ConfigError):
            resolve_model(text)


def test_lora_is_kept_but_refused(cache):
    with pytest.raises(ConfigError, match=r"^org/base\+org/lora: LoRA adapters .* not accepted"):
        parse_model_reference("org/base+org/lora")
    with pytest.raises(ConfigError, match="no local path '/models/a\\+b' exists either"):
        parse_model_reference("/models/a+b")
    ref = parse_model_reference("org/base@v2 + ./adapters/math", allow_lora=True)
    assert (ref.repo_id, ref.revision) == ("org/base", "v2")
    assert ref.lora == ModelReference(path=Path("adapters/math"))
    assert str(ref) == "org/base@v2+adapters/math"
    assert ref.model == ModelReference(repo_id="org/base", revision="v2")
    with pytest.raises(ConfigError, match="resolve the model .* one at a time"):
        resolve_model(ref)
    with pytest.raises(ConfigError, match="not accepted here"):
        resolve_model("org/base+org/lora")


def test_reference_validation():
    with pytest.raises(ConfigError, match="exactly one of"):
        ModelReference()
    with pytest.raises(ConfigError, match="exactly one of"):
        ModelReference(path=Path("a"), repo_id="org/a")
    inner = ModelReference(repo_id="org/l", lora=ModelReference(repo_id="org/m"))
    with pytest.raises(ConfigError, match="adapter of its own"):
        ModelReference(repo_id="org/a", lora=inner)
    with pytest.raises(ConfigError, match="string or a ModelReference"):
        resolve_model(Path("a"))  # type: ignore[arg-type]


def test_docstring_examples(cache):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(hub, "fastmerge.engine.hub")
    assert sum(len(test.examples) for test in tests) > 10
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


# --- hub ids in a merge configuration -------------------------------------------------


def test_fastmerge_merge_reads_hub_ids_from_the_cache(cache, capsys):
    from fastmerge.cli import main

    add_snapshot(cache, "org/base", COMMIT, {**MODEL_FILES, "model.safetensors": weights(1.0)})
    add_snapshot(cache, "org/tuned", COMMIT, {**MODEL_FILES, "model.safetensors": weights(3.0)})
    Path("cfg.yaml").write_text(
        "merge_method: task_arithmetic\nbase_model: org/base\n"
        f"models:\n  - model: org/tuned@{COMMIT}\n    parameters: {{weight: 0.5}}\n"
    )
    code = main(["merge", "cfg.yaml", "--out", "merged", "--write-model-card", "--quiet"])
    assert code == 0, capsys.readouterr().err
    merged = safetensors_torch.load_file("merged/model-00001-of-00001.safetensors")
    assert merged["w"].tolist() == [[2.0] * 3] * 2
    card = Path("merged/README.md").read_text()
    assert "https://huggingface.co/org/base" in card and "https://huggingface.co/org/tuned" in card
    code = main(["merge", "cfg.yaml", "--out", "other", "--quiet"])
    assert code == 0
    Path("cfg.yaml").write_text(
        "merge_method: linear\nmodels:\n  - model: org/absent\n  - model: org/base\n"
    )
    assert main(["merge", "cfg.yaml", "--out", "none"]) == 2
    err = capsys.readouterr().err
    assert "org/absent" in err and err.count("\n") == 1, err
    assert not Path("none").exists()
