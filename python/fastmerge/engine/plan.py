"""The planner: from a configuration and the inputs' headers to one task per output tensor.

Each :class:`TensorTask` names the output tensor, its dtype and shape, its inputs
(model, tensor name), the position of the base among them, and the method's parameters
resolved for that tensor (mergekit's semantics, see :mod:`fastmerge.engine.params`).
Nothing but headers and ``config.json`` files is read, so a plan is cheap, and
``fastmerge merge --dry-run`` prints it.

Layers are recognized by name (``model.layers.7.``, ``transformer.h.7.``, ``blocks.7.``);
their count is ``num_hidden_layers`` (``n_layer``, ``num_layers``) of the model's
``config.json``, else one more than the largest index. Tensors outside the layers are
"pre" tensors (embeddings: names containing ``embed``, ``wte`` or ``wpe``), merged from the
first slice's sources, and "post" tensors (final norm, LM head), from the last slice's, both
at ``t = 0``, as mergekit does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..io import Checkpoint, CheckpointError
from ..merge import key_selector
from .config import MergeConfig, OutputSlice, SliceSource, same_model
from .errors import ConfigError
from .params import resolve
from .registry import REQUIRED, MergeMethod, Parameter, _short

#: ``<prefix>.<layers>.<index>.<rest>``: the layer index of a tensor name.
LAYER_PATTERN = re.compile(
    r"^(?P<prefix>(?:.*\.)?(?:layers|layer|h|blocks|block))\.(?P<index>\d+)\."
)
_PRE_PATTERN = re.compile(r"(embed|wte|wpe|word_embeddings)")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
#: LM-head names and the input-embedding names they are tied to.
TIED_HEADS = {
    "lm_head.weight": (
        "model.embed_tokens.weight",
        "transformer.wte.weight",
        "embed_tokens.weight",
    ),
}


@dataclass(frozen=True)
class TensorInput:
    """One input of an output tensor: model index (into :attr:`MergePlan.models`) and
    the tensor's name in that model."""

    model: int
    name: str


@dataclass
class TensorTask:
    """How one output tensor is made.

    ``shared`` holds the global parameters; ``per_input[i]`` the parameters of input i
    (for the base, only the ``model``-scoped ones). ``copy`` tensors are taken from
    ``inputs[0]`` unchanged (not selected by include/exclude, or not floating point).
    ``vocab`` is ``"embed"`` or ``"lm_head"`` when the inputs are aligned to the output
    vocabulary first.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    inputs: list[TensorInput]
    base_index: Optional[int]
    method: MergeMethod
    shared: dict[str, Any] = field(default_factory=dict)
    per_input: list[dict[str, Any]] = field(default_factory=list)
    copy: bool = False
    vocab: Optional[str] = None
    vocab_axis: int = 0
    t: float = 0.0
    group: str = ""
    seed: int = 0

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


@dataclass
class MergePlan:
    """Every output tensor's task, the opened inputs and what else the output needs."""

    config: MergeConfig
    models: list[Path]
    checkpoints: list[Checkpoint]
    tasks: list[TensorTask]
    template: int  # the model whose config.json and other files are copied
    num_layers: Optional[int] = None  # output layers when slices renumber them
    vocabulary: Any = None  # a fastmerge.engine.tokenizer.VocabularyPlan

    def input_bytes(self) -> int:
        """Bytes of every input tensor read (each input of each task once)."""
        return sum(self.checkpoints[i.model].info(i.name).nbytes for t in self.tasks
                   for i in t.inputs[: 1 if t.copy else None])  # fmt: skip

    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tasks)

    def describe(self) -> str:
        """The plan as text (``fastmerge merge --dry-run``): models, sizes, and one line
        per tensor group (tensors that differ only in their layer index) with the
        parameters (``first..last`` where a gradient makes them vary)."""
        cfg = self.config
        labels = _labels(self.models)
        lines = [
            f"merge_method: {cfg.method}",
            "models: " + ", ".join(f"[{j}] {p}" for j, p in enumerate(self.models)),
            f"output: {len(self.tasks)} tensors, {self.output_bytes() / 1e9:.3f} GB "
            f"(reads {self.input_bytes() / 1e9:.3f} GB)"
            + (f", {self.num_layers} layers" if self.num_layers is not None else ""),
        ]
        if self.vocabulary is not None:
            lines.append(f"vocabulary: {self.vocabulary.vocab_size} rows")
        groups: dict[tuple, list[TensorTask]] = {}
        for task in self.tasks:
            key = (LAYER_PATTERN.sub(r"\g<prefix>.*.", task.name), task.copy,
                   tuple(i.model for i in task.inputs))  # fmt: skip
            groups.setdefault(key, []).append(task)
        for (pattern, copy, models), tasks in groups.items():
            t0 = tasks[0]
            head = f"{pattern} x{len(tasks)}" if len(tasks) > 1 else pattern
            what = "copy" if copy else cfg.method
            inputs = ", ".join(labels[m] for m in models[: 1 if copy else None])
            params = "" if copy else _parameter_summary(tasks, labels)
            lines.append(
                f"  {head}: {what} of {inputs}; {str(t0.dtype).removeprefix('torch.')} "
                f"{list(t0.shape)}" + (f"; {params}" if params else "")
            )
        return "\n".join(lines)


def _labels(models: Sequence[Path]) -> list[str]:
    return [f"[{j}]" for j in range(len(models))]


def _range(values: list[Any]) -> str:
    first, last = values[0], values[-1]
    fmt = (lambda v: f"{v:.4g}") if isinstance(first, float) else str
    if all(v == first for v in values):
        return fmt(first)
    return f"{fmt(first)}..{fmt(last)}"


def _parameter_summary(tasks: list[TensorTask], labels: list[str]) -> str:
    parts = []
    for name in tasks[0].shared:
        parts.append(f"{name}={_range([t.shared[name] for t in tasks])}")
    for j, inp in enumerate(tasks[0].inputs):
        for name in tasks[0].per_input[j]:
            values = [t.per_input[j][name] for t in tasks]
            parts.append(f"{name}{labels[inp.model]}={_range(values)}")
    return " ".join(parts)


def layer_of(name: str) -> Optional[tuple[str, int]]:
    """``(prefix, index)`` of a layer tensor's name, None outside the layers.

    Example:
        >>> layer_of("model.layers.12.mlp.up_proj.weight"), layer_of("lm_head.weight")
        (('model.layers', 12), None)
    """
    m = LAYER_PATTERN.match(name)
    return (m.group("prefix"), int(m.group("index"))) if m else None


def with_layer(name: str, index: int) -> str:
    """`name` with its layer index replaced.

    Example:
        >>> with_layer("model.layers.3.self_attn.q_proj.weight", 7)
        'model.layers.7.self_attn.q_proj.weight'
    """
    return LAYER_PATTERN.sub(lambda m: f"{m.group('prefix')}.{index}.", name, count=1)


def model_config(path: Path) -> dict[str, Any]:
    """A model directory's ``config.json`` (empty when there is none, it is unreadable,
    or the model is a single file: a folder's config.json may describe another model)."""
    if not path.is_dir():
        return {}
    file = path / "config.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def num_layers(checkpoint: Checkpoint, config: dict[str, Any]) -> int:
    """Layers of a model: ``config.json``'s count, else one more than the largest index."""
    for key in _LAYER_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    indices = [li[1] for li in map(layer_of, checkpoint) if li is not None]
    return max(indices) + 1 if indices else 0


class _Planner:
    def __init__(self, cfg: MergeConfig, models: list[Path], checkpoints: list[Checkpoint]):
        self.cfg, self.models, self.ckpts = cfg, models, checkpoints
        self.method = cfg.method_info
        self.configs = [model_config(p) for p in models]
        self.layers = [num_layers(c, k) for c, k in zip(checkpoints, self.configs)]
        self.selected = key_selector(cfg.include, cfg.exclude)
        self.tasks: list[TensorTask] = []
        self._vocab_names: Optional[set[str]] = None
        self._indices: dict[str, int] = {}

    def index(self, ref: Path) -> int:
        """The position of model `ref` in ``cfg.all_models()`` (memoized: every tensor
        asks, and comparing paths resolves them)."""
        key = str(ref)
        if key not in self._indices:
            found = next(
                (j for j, p in enumerate(self.cfg.all_models()) if same_model(p, ref)), None
            )
            if found is None:
                raise ConfigError(f"{self.cfg.source}: model {ref} is not in the configuration")
            self._indices[key] = found
        return self._indices[key]

    # ---- slices ---------------------------------------------------------------------
    def output_slices(self) -> list[OutputSlice]:
        cfg = self.cfg
        if cfg.slices is not None:
            return cfg.slices
        entries = []
        if cfg.base is not None:
            entries.append((cfg.base, cfg.base_parameters))
        entries += [(e.path, e.parameters) for e in cfg.experts]
        counts = {self.layers[self.index(p)] for p, _ in entries}
        if len(counts) != 1:
            raise ConfigError(
                f"{cfg.source}: the models have different numbers of layers "
                f"({', '.join(str(self.layers[self.index(p)]) for p, _ in entries)}); "
                "use slices to say which layers to merge"
            )
        n = counts.pop()
        return [OutputSlice([SliceSource(p, (0, n), params) for p, params in entries], cfg.base)]

    def base_of(self, s: OutputSlice) -> Optional[int]:
        base = s.base_model if s.base_model is not None else self.cfg.base
        if base is None or self.method.base == "ignored":
            return None
        want = self.index(base)
        for j, src in enumerate(s.sources):
            if self.index(src.model) == want:
                return j
        raise ConfigError(
            f"{self.cfg.source}: the base model {base} is not among the sources of a slice "
            f"(merge_method {self.method.name} merges each slice against its base)"
        )

    def plan(self) -> tuple[list[TensorTask], Optional[int]]:
        slices = self.output_slices()
        for k, s in enumerate(slices):
            count = len(s.sources)
            if count < self.method.min_models or (
                self.method.max_models is not None and count > self.method.max_models
            ):
                low, high = self.method.min_models, self.method.max_models
                want = f"at least {low}" if high is None else f"{low} to {high}"
                want = f"exactly {low}" if low == high else want
                raise ConfigError(
                    f"{self.cfg.source}: slices[{k}]: merge_method {self.method.name} takes "
                    f"{want} model(s) per tensor, got {count}"
                )
            for src in s.sources:
                j = self.index(src.model)
                if src.layer_range[1] > self.layers[j]:
                    start, stop = map(_short, src.layer_range)  # YAML reads 0xfff... exactly
                    raise ConfigError(
                        f"{self.cfg.source}: slices[{k}]: layer_range [{start}, {stop}] "
                        f"of {src.model} is beyond its {self.layers[j]} layers"
                    )
        first, last = slices[0], slices[-1]
        template = self.index(first.sources[0].model)
        names = list(self.ckpts[template])
        non_layer = [n for n in names if layer_of(n) is None]
        pre = [n for n in non_layer if _PRE_PATTERN.search(n)]
        post = [n for n in non_layer if not _PRE_PATTERN.search(n)]
        for n in pre:
            self.add(n, [(src, n) for src in first.sources], first, 0, 0.0, "pre")
        out_layer = 0
        for k, s in enumerate(slices):
            tmpl = self.index(s.sources[0].model)
            for offset in range(s.num_layers):
                t = offset / (s.num_layers - 1) if s.num_layers > 1 else 1.0
                layer_in = s.sources[0].layer_range[0] + offset
                names_in = [n for n in self.ckpts[tmpl] if (layer_of(n) or ("", -1))[1] == layer_in]
                for n in names_in:
                    inputs = [
                        (src, with_layer(n, src.layer_range[0] + offset)) for src in s.sources
                    ]
                    self.add(with_layer(n, out_layer), inputs, s, k, t, f"slices[{k}]")
                out_layer += 1
        for n in post:
            self.add(n, [(src, n) for src in last.sources], last, len(slices) - 1, 0.0, "post")
        renumbered = out_layer if self.cfg.slices is not None else None
        return self.tasks, renumbered

    # ---- one tensor -----------------------------------------------------------------
    def find(self, j: int, name: str, out_name: str) -> Optional[str]:
        """`name` in model j; a tied LM head falls back to its input embedding."""
        if name in self.ckpts[j]:
            return name
        for tied in TIED_HEADS.get(name, ()):
            if tied in self.ckpts[j]:
                return tied
        return None

    def add(self, out_name: str, sources: list[tuple[SliceSource, str]], s: OutputSlice,
            k: int, t: float, where: str) -> None:  # fmt: skip
        inputs = []
        for src, name in sources:
            j = self.index(src.model)
            found = self.find(j, name, out_name)
            if found is None:
                raise CheckpointError(
                    f"{self.models[j]}: no tensor {name!r} (needed for output {out_name!r})"
                )
            inputs.append(TensorInput(j, found))
        infos = [self.ckpts[i.model].info(i.name) for i in inputs]
        base_index = self.base_of(s)
        ref = infos[base_index if base_index is not None else 0]
        floating = all(info.dtype.is_floating_point for info in infos)
        copy = not (floating and self.selected(out_name))
        for inp, info in zip(inputs, infos):
            if tuple(info.shape) != tuple(ref.shape) and not self.vocab_axis(out_name):
                raise CheckpointError(
                    f"{self.ckpts[inp.model].file_of(inp.name)}: tensor {inp.name!r} is "
                    f"{info.dtype} {list(info.shape)} but {ref.dtype} {list(ref.shape)} in "
                    f"{self.ckpts[inputs[0].model].file_of(inputs[0].name)}"
                    + (
                        "; the vocabularies differ: set tokenizer_source (base, union or a model)"
                        if self.is_embedding(out_name)
                        else ""
                    )  # fmt: skip
                )
        out_dtype = self.cfg.output_dtype if ref.dtype.is_floating_point else None
        task = TensorTask(
            name=out_name,
            shape=tuple(ref.shape),
            dtype=out_dtype or ref.dtype,
            inputs=inputs if not copy else [inputs[base_index or 0]],
            base_index=base_index if not copy else None,
            method=self.method,
            copy=copy,
            t=t,
            group=f"{where} tensor {out_name}",
            seed=self.cfg.seed,
        )
        if not copy:
            self.resolve(task, [src for src, _ in sources], s, k)
            problem = self.method.check(task) if self.method.check is not None else None
            if problem is not None:
                raise ConfigError(
                    f"{self.cfg.source}: {self.method.name}: {problem} ({task.group})"
                )
        self.tasks.append(task)

    def is_embedding(self, name: str) -> bool:
        return bool(_PRE_PATTERN.search(name)) or name in TIED_HEADS

    def vocab_axis(self, name: str) -> bool:
        """Whether `name` may differ in size between models (its vocabulary is aligned)."""
        settings = self.cfg.tokenizer
        if settings is None or not settings.aligns_vocabulary:
            return False
        if self._vocab_names is None:
            from .tokenizer import embedding_names  # transformers-free, but only when needed

            names = {n for c in self.ckpts for n in c}
            self._vocab_names = set(embedding_names(names, self.configs[0]))
        return name in self._vocab_names

    def resolve(self, task: TensorTask, sources: list[SliceSource], s: OutputSlice, k: int) -> None:
        cfg, method = self.cfg, self.method
        slice_label = f"slices[{k}]" if cfg.slices is not None else None
        common = [(slice_label, s.parameters)] if slice_label else []
        common.append(("parameters", cfg.parameters))
        for p in method.parameters:
            if p.scope == "global":
                task.shared[p.name] = self.value(p, common, task.name, task, None)
        for j, (src, inp) in enumerate(zip(sources, task.inputs)):
            own_label = (f"{slice_label}.sources[{j}]" if slice_label else
                         self.model_label(src.model))  # fmt: skip
            scopes = [(own_label, src.parameters), *common]
            params = {}
            for p in method.parameters:
                if p.scope == "model" or (p.scope == "non_base" and j != task.base_index):
                    params[p.name] = self.value(p, scopes, inp.name, task, src.model)
            task.per_input.append(params)

    def model_label(self, ref: Path) -> str:
        """Where a model's own settings are in the YAML (its index in ``models``)."""
        j = self.index(ref)
        if self.cfg.base is not None and j == self.index(self.cfg.base):
            return self.cfg.base_label
        i, e = next((i, e) for i, e in enumerate(self.cfg.experts) if self.index(e.path) == j)
        return f"models[{e.index if e.index is not None else i}]"

    def value(self, p: Parameter, scopes, tensor_name: str, task: TensorTask,
              model: Optional[Path]) -> Any:  # fmt: skip
        whom = f" for model {model}" if model is not None else ""
        try:
            value, label = resolve(p.name, scopes, tensor_name, task.t, p.convert)
        except ConfigError as exc:  # a value of the wrong type: "<label>.<name>: ..."
            raise ConfigError(f"{self.cfg.source}: {exc}{whom} ({task.group})") from None
        where = f"{self.cfg.source}: {label or 'parameters'}.{p.name}"
        if value is None:
            if p.default is REQUIRED:
                raise ConfigError(
                    f"{where}: required parameter of {self.method.name} is not set{whom} "
                    f"({task.group})"
                )
            return p.default
        problem = p.check(value)
        if problem is not None:
            raise ConfigError(f"{where}: {problem}{whom} ({task.group})")
        return value


def plan_merge(cfg: MergeConfig, models: list[Path], checkpoints: list[Checkpoint]) -> MergePlan:
    """The :class:`MergePlan` of `cfg` over the opened inputs (`models` and `checkpoints`
    in the order of ``cfg.all_models()``).

    Raises:
        ConfigError: a parameter out of range or missing, a slice beyond a model's layers,
            the wrong number of models for the method, a base model missing from a slice.
        CheckpointError: an input tensor missing or of another shape.
    """
    planner = _Planner(cfg, models, checkpoints)
    tasks, renumbered = planner.plan()
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"{cfg.source}: two slices produce the tensor {dup!r}")
    if cfg.slices is None:  # read each file front to back
        ref = checkpoints[tasks[0].inputs[0].model] if tasks else None

        def position(task: TensorTask):
            i = task.inputs[0]
            info = checkpoints[i.model].info(i.name)
            return (checkpoints[i.model].file_of(i.name), info.begin, task.name)

        if ref is not None:
            tasks.sort(key=position)
    template = planner.index(planner.output_slices()[0].sources[0].model)
    if cfg.base is not None:
        template = planner.index(cfg.base)
    return MergePlan(cfg, models, checkpoints, tasks, template, renumbered)
