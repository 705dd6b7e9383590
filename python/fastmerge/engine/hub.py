"""Model references as mergekit writes them, and where their files are on disk.

A reference is a local path (``./models/a``, ``/abs/path``, ``~/models/a``) or a Hugging
Face Hub repo id (``org/name``, ``org/name@revision`` with a branch, tag or commit); a
local path that exists always wins over a hub id of the same spelling. mergekit's
``base+lora`` form (a model and a PEFT LoRA adapter merged into it) parses with
``allow_lora=True``; its two parts are resolved one at a time.

:func:`resolve_model` turns a reference into a directory: a local path as it is, a hub id
through :func:`huggingface_hub.snapshot_download` (weights, config, tokenizer files),
which downloads when online and reads the Hugging Face cache when offline
(``HF_HUB_OFFLINE=1`` or ``offline=True``).

Example:
    >>> ref = parse_model_reference("org/name@v1.0")
    >>> ref.repo_id, ref.revision, str(ref)
    ('org/name', 'v1.0', 'org/name@v1.0')
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

from ..io import CheckpointError
from .errors import ConfigError

__all__ = [
    "HUB_URL",
    "ModelReference",
    "default_cache_dir",
    "hub_offline",
    "parse_model_reference",
    "resolve_model",
    "snapshot_patterns",
]

HUB_URL = "https://huggingface.co"

# Hugging Face's repo id rules (huggingface_hub.utils.validate_repo_id): an optional
# namespace and a name of ASCII letters, digits, '-', '_', '.', at most 96 characters each,
# neither starting nor ending with '-' or '.', no '--' or '..', not ending in '.git'.
_REPO_PART = r"(?:[A-Za-z0-9_]|[A-Za-z0-9_][A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])"
_REPO_ID = re.compile(rf"(?:{_REPO_PART}/)?{_REPO_PART}")
_COMMIT = re.compile(r"[0-9a-f]{40}")

_WEIGHTS = ["*.safetensors", "*.safetensors.index.json"]
_PICKLE_WEIGHTS = ["*.bin", "*.bin.index.json"]
_METADATA = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "adapter_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "*.model",
    "*.tiktoken",
    "*.jinja",
]
# Repositories that also ship the original (non-transformers) checkpoint would otherwise
# download every weight twice (e.g. Mistral's consolidated.safetensors, Llama's original/).
_IGNORED = ["original/*", "consolidated*.safetensors"]

_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class ModelReference:
    """A parsed model reference: a local `path` or a hub `repo_id` (with an optional
    `revision`); `lora` is the adapter of a ``base+lora`` reference (resolve the model and
    the adapter one at a time: :func:`resolve_model` gives one directory).

    Example:
        >>> str(ModelReference(repo_id="org/name", revision="main"))
        'org/name@main'
        >>> ModelReference(repo_id="org/name").hub_url
        'https://huggingface.co/org/name'
        >>> ModelReference(path=Path("models/a")).is_local
        True
        >>> str(ModelReference(repo_id="o/b", lora=ModelReference(path=Path("l"))).model)
        'o/b'
    """

    path: Optional[Path] = None
    repo_id: Optional[str] = None
    revision: Optional[str] = None
    lora: Optional[ModelReference] = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.repo_id is None):
            raise ConfigError("a model reference needs exactly one of a local path or a repo id")
        if self.path is not None and self.revision is not None:
            raise ConfigError(
                f"{self.path}: a revision (@{self.revision}) applies only to a Hugging Face "
                "repo id, not to a local path"
            )
        if self.lora is not None and self.lora.lora is not None:
            raise ConfigError(f"{self}: an adapter cannot have an adapter of its own")

    @property
    def model(self) -> ModelReference:
        """The reference without its adapter (itself when it has none)."""
        return self if self.lora is None else replace(self, lora=None)

    @property
    def is_local(self) -> bool:
        """Whether the reference is a local path (not a hub repo id)."""
        return self.path is not None

    @property
    def hub_url(self) -> Optional[str]:
        """The repo's page on the Hugging Face Hub (None for a local path)."""
        return None if self.repo_id is None else f"{HUB_URL}/{self.repo_id}"

    def __str__(self) -> str:
        if self.path is not None:
            text = str(self.path)
        else:
            text = self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"
        return text if self.lora is None else f"{text}+{self.lora}"


def parse_model_reference(text: str, *, allow_lora: bool = False) -> ModelReference:
    """Parse a mergekit model reference: ``org/name``, ``org/name@revision``, or a local path
    (``./x``, ``/abs``, ``~/x``, or any path that exists; an existing path always wins over
    a hub id). ``base+lora`` is a ConfigError saying adapters are not accepted here unless
    `allow_lora` (then the adapter is kept in ``lora``).

    A path that looks local (starts with ``/``, ``~``, ``./`` or ``../``, or has more than
    one ``/`` before any ``@``) but does not exist parses; :func:`resolve_model` then
    reports it missing. Anything else must be a valid Hugging Face repo id.

    Example:
        >>> parse_model_reference("org/name")
        ModelReference(path=None, repo_id='org/name', revision=None, lora=None)
        >>> parse_model_reference("./no/such/dir").path
        PosixPath('no/such/dir')
        >>> parse_model_reference("org/base+org/adapter", allow_lora=True).lora.repo_id
        'org/adapter'
        >>> parse_model_reference("org/base+org/adapter")
        Traceback (most recent call last):
        ...
        fastmerge.engine.errors.ConfigError: org/base+org/adapter: LoRA ... not accepted here; ...
    """
    if not isinstance(text, str):
        raise ConfigError(f"a model reference must be a string, got {type(text).__name__}")
    spec = text.strip()
    if not spec:
        raise ConfigError("empty model reference: expected org/name[@revision] or a local path")
    if _exists(spec):
        return ModelReference(path=_expand(spec))
    if "+" in spec:
        parts = [part.strip() for part in spec.split("+")]
        if len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"{spec}: expected MODEL or MODEL+LORA (one '+'), or an existing local path"
            )
        if not allow_lora:
            local = any(map(_looks_local, parts))
            missing = f"; no local path '{spec}' exists either" if local else ""
            raise ConfigError(
                f"{spec}: LoRA adapters (MODEL+LORA) are not accepted here; merge the adapter "
                f"into its base model first and reference the result{missing}"
            )
        return replace(_parse_one(parts[0]), lora=_parse_one(parts[1]))
    return _parse_one(spec)


def resolve_model(
    ref: Union[str, ModelReference],
    *,
    cache_dir: Union[str, os.PathLike, None] = None,
    offline: Optional[bool] = None,
    include_bin: bool = False,
    require_weights: bool = True,
) -> Path:
    """The local directory of a model reference.

    A local path is returned as it is (it must exist). A hub repo id goes through
    ``huggingface_hub.snapshot_download`` with the files a merge needs
    (:func:`snapshot_patterns`): it downloads what is missing when online and only reads
    the cache when offline (`offline` True, or None and ``HF_HUB_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE`` set). `cache_dir` defaults to the Hugging Face cache
    (:func:`default_cache_dir`, read at call time). ``*.bin`` weights are fetched only with
    `include_bin`. With `require_weights`, a snapshot without weights is an error.

    Raises:
        ConfigError: a bad reference, or a ``base+lora`` one (resolve its two parts).
        CheckpointError: a one-line message naming the reference and what to do: a local
            path that does not exist, a repo not in the cache while offline, an unknown or
            gated repo or revision, the Hub unreachable, a snapshot without weights.

    Example:
        >>> import tempfile
        >>> local = tempfile.mkdtemp()
        >>> resolve_model(local) == Path(local)
        True
        >>> resolve_model("org/name", cache_dir=tempfile.mkdtemp(), offline=True)
        Traceback (most recent call last):
        ...
        fastmerge.io.safetensors.CheckpointError: org/name: not in the Hugging Face cache...
    """
    if isinstance(ref, str):
        ref = parse_model_reference(ref)
    elif not isinstance(ref, ModelReference):
        raise ConfigError(
            f"a model reference must be a string or a ModelReference, got {type(ref).__name__}"
        )
    if ref.lora is not None:
        raise ConfigError(
            f"{ref}: a MODEL+LORA reference names two directories; resolve the model "
            f"({ref.model}) and the adapter ({ref.lora}) one at a time"
        )
    if ref.path is not None:
        if not ref.path.exists():
            raise CheckpointError(f"{ref.path}: local model path does not exist")
        return ref.path

    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"{ref}: resolving a Hugging Face repo id needs huggingface_hub "
            "(pip install huggingface_hub), or give a local path"
        ) from None
    if offline is None:
        offline = hub_offline()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        folder = huggingface_hub.snapshot_download(
            ref.repo_id,
            revision=ref.revision,
            cache_dir=str(cache),
            allow_patterns=snapshot_patterns(include_bin=include_bin),
            ignore_patterns=list(_IGNORED),
            local_files_only=offline,
        )
    except Exception as err:
        mapped = _hub_error(ref, err, cache, offline)
        if mapped is None:
            raise
        raise mapped from err
    path = Path(folder)
    if require_weights and not _has_weights(path, include_bin):
        kinds = "*.safetensors or *.bin" if include_bin else "*.safetensors"
        if offline:
            hint = "run once online to download them (the cache may hold only its config)"
        else:
            hint = "the repo may ship other weight files" + (
                "" if include_bin else " (only *.bin: pass include_bin=True)"
            )
        raise CheckpointError(f"{ref}: no {kinds} weights in the snapshot {path}; {hint}")
    return path


def snapshot_patterns(*, include_bin: bool = False) -> list[str]:
    """The file patterns :func:`resolve_model` downloads from a hub repo: safetensors weights
    and their index (``*.bin`` ones with `include_bin`), ``config.json``,
    ``generation_config.json`` and tokenizer files.

    Example:
        >>> "*.safetensors" in snapshot_patterns(), "*.bin" in snapshot_patterns()
        (True, False)
        >>> "*.bin" in snapshot_patterns(include_bin=True)
        True
    """
    return _WEIGHTS + (_PICKLE_WEIGHTS if include_bin else []) + _METADATA


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for offline mode, read
    now (huggingface_hub reads it once, at import).

    Example:
        >>> isinstance(hub_offline(), bool)
        True
    """
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def default_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment now, as huggingface_hub finds it:
    ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``.

    Example:
        >>> default_cache_dir().name
        'hub'
    """
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "huggingface",
        )
        cache = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def _expand(spec: str) -> Path:
    return Path(os.path.expanduser(spec))


def _exists(spec: str) -> bool:
    return os.path.exists(os.path.expanduser(spec))


def _looks_local(spec: str) -> bool:
    """``/...``, ``~...``, ``./...``, ``../...``, or more than one '/' before any '@'."""
    head = spec.split("@", 1)[0]
    return (
        spec.startswith(("/", "~", "./", "../"))
        or spec in (".", "..")
        or head.endswith("/")
        or head.count("/") > 1
    )


def _parse_one(spec: str) -> ModelReference:
    """One side of a reference (no '+'): a local path or ``repo_id[@revision]``."""
    if _exists(spec):
        return ModelReference(path=_expand(spec))
    head, at, revision = spec.rpartition("@")
    if at and head and _exists(head):
        raise ConfigError(
            f"{spec}: '{head}' is a local path; a revision (@{revision}) applies only to a "
            "Hugging Face repo id"
        )
    if _looks_local(spec):
        return ModelReference(path=_expand(spec))
    if spec.count("@") > 1:
        raise ConfigError(f"{spec}: more than one '@'; expected org/name[@revision]")
    repo_id, at, revision = spec.partition("@")
    if at and not revision:
        raise ConfigError(f"{spec}: empty revision after '@'; expected org/name@revision")
    if at and re.search(r"\s", revision):
        raise ConfigError(f"{spec}: the revision '{revision}' contains whitespace")
    if not _valid_repo_id(repo_id):
        raise ConfigError(
            f"{spec}: neither an existing local path nor a Hugging Face repo id "
            "(org/name[@revision]: letters, digits, '-', '_' and '.', at most 96 each)"
        )
    return ModelReference(repo_id=repo_id, revision=revision or None)


def _valid_repo_id(repo_id: str) -> bool:
    return (
        _REPO_ID.fullmatch(repo_id) is not None
        and "--" not in repo_id
        and ".." not in repo_id
        and not repo_id.endswith(".git")
    )


def _has_weights(path: Path, include_bin: bool) -> bool:
    suffixes = (".safetensors", ".bin") if include_bin else (".safetensors",)
    try:
        return any(entry.name.endswith(suffixes) for entry in path.iterdir())
    except OSError:
        return False


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _is_network_error(err: BaseException) -> bool:
    root = type(err).__module__.split(".")[0]
    network = (ConnectionError, TimeoutError, socket.gaierror, socket.herror)
    return isinstance(err, network) or root in {
        "httpx",
        "httpx2",
        "httpcore",
        "requests",
        "urllib3",
    }


def _hub_error(
    ref: ModelReference, err: Exception, cache: Path, offline: bool
) -> Optional[Exception]:
    """The one-line CheckpointError (or ConfigError) for a snapshot_download failure, or None
    for an error that is not about the reference, the cache or the network."""
    from huggingface_hub import errors as hub_errors

    def kind(name: str) -> tuple[type, ...]:
        found = getattr(hub_errors, name, None)
        return (found,) if isinstance(found, type) else ()

    where = f"{ref.repo_id}@{ref.revision}" if ref.revision else ref.repo_id
    cache_hint = "set HF_HOME (or HF_HUB_CACHE) to a cache that has it"
    online_hint = f"run once online to download it, or {cache_hint}"
    retry_hint = f"check the connection and retry, or {cache_hint}"
    page = f"{HUB_URL}/{ref.repo_id}"
    if isinstance(err, kind("GatedRepoError")):
        return CheckpointError(
            f"{where}: a gated repository; accept its conditions on {page} and log in "
            "(hf auth login, or set HF_TOKEN)"
        )
    if isinstance(err, kind("RevisionNotFoundError")):
        return CheckpointError(
            f"{where}: revision '{ref.revision or 'main'}' not found on the Hugging Face Hub; "
            f"use a branch, tag or commit of {ref.repo_id} (see {page})"
        )
    if isinstance(err, kind("RepositoryNotFoundError")):
        return CheckpointError(
            f"{where}: no such model repository on the Hugging Face Hub, or it is private "
            f"(log in with hf auth login, or set HF_TOKEN); no local path '{ref.repo_id}' "
            "exists either"
        )
    if isinstance(err, kind("IncompleteSnapshotError")):
        return CheckpointError(
            f"{where}: the cached snapshot in {cache} is incomplete and the Hub cannot be "
            "reached; run once online to complete it"
        )
    if isinstance(err, kind("LocalEntryNotFoundError")):
        cause = err.__cause__ or err.__context__
        if offline or isinstance(cause, kind("OfflineModeIsEnabled")):
            state = "offline=True" if offline and not hub_offline() else "HF_HUB_OFFLINE=1"
            return CheckpointError(
                f"{where}: not in the Hugging Face cache {cache} and offline ({state}); "
                f"{online_hint}; "
                f"no local path '{ref.repo_id}' exists either"
            )
        reason = _first_line(cause) if cause is not None else "no connection"
        return CheckpointError(
            f"{where}: could not reach the Hugging Face Hub ({reason}) and it is not in the "
            f"cache {cache}; {retry_hint}"
        )
    if isinstance(err, kind("HFValidationError")):
        return ConfigError(f"{where}: not a valid Hugging Face repo id ({_first_line(err)})")
    if isinstance(err, kind("HfHubHTTPError")):
        return CheckpointError(
            f"{where}: the Hugging Face Hub refused the download ({_first_line(err)}); "
            "check the repo id and your token (HF_TOKEN), or retry later"
        )
    if _is_network_error(err):
        return CheckpointError(
            f"{where}: could not download from the Hugging Face Hub ({_first_line(err)}); "
            f"{retry_hint} (cache: {cache})"
        )
    if isinstance(err, OSError):
        return CheckpointError(
            f"{where}: could not store the download in the cache {cache} ({_first_line(err)}); "
            "set HF_HOME (or HF_HUB_CACHE) to a writable folder with room for the model"
        )
    return None
