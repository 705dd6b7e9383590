"""Merge methods and their registry: what a method takes and how it merges one tensor.

A merge method is a :class:`MergeMethod`: its name, a one-line description, its
reference, the :class:`Parameter` s it takes (each with a scope, a type, a default and a
range check), whether it needs a base model, how many models it takes, and the per-tensor
function. Methods register themselves with :func:`register` from one file each in
:mod:`fastmerge.engine.methods`; ``fastmerge merge --list-methods`` prints
:func:`method_table`.

Parameter scopes follow mergekit's:

* ``"global"``: one value per tensor, from the slice's and the top-level ``parameters``;
* ``"model"``: one value per input model, the base model included (``weight`` of ``linear``);
* ``"non_base"``: one value per input model other than the base (``weight``, ``density`` of
  the task-vector methods).

Example:
    >>> from fastmerge.engine import get_method
    >>> m = get_method("ties")
    >>> m.base, [p.name for p in m.parameters][:3]
    ('required', ['weight', 'density', 'normalize'])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .errors import ConfigError

#: A :class:`fastmerge.engine.plan.TensorTask` (the plan module builds on this one).
TensorTask = Any

SCOPES = ("global", "model", "non_base")
BASE_POLICIES = ("required", "optional", "ignored")
#: Marks a parameter without a default (it must be given).
REQUIRED = object()


@dataclass(frozen=True)
class Parameter:
    """One parameter of a merge method.

    Args:
        name: the YAML key.
        kind: ``float``, ``int``, ``bool`` or ``str``.
        scope: ``"global"``, ``"model"`` or ``"non_base"`` (see the module doc).
        default: the value when the configuration does not set it (:data:`REQUIRED`: none).
        low, high: the allowed closed range of a number (None: unbounded);
            ``low_open`` / ``high_open`` make that end open.
        doc: one line for ``--list-methods``.

    Example:
        >>> p = Parameter("density", float, "non_base", 1.0, low=0.0, low_open=True, high=1.0)
        >>> p.check(1.5)
        'must be in (0, 1], got 1.5'
    """

    name: str
    kind: type
    scope: str
    default: Any = REQUIRED
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"parameter {self.name}: scope must be one of {SCOPES}")

    def convert(self, value: Any) -> Any:
        """`value` as this parameter's type; ConfigError text (a str) when it is not one.

        Numbers may be written as YAML strings (``"1e-3"``), as mergekit accepts them.
        """
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise ConfigError(f"must be true or false, got {_short(value)}")
        if self.kind is str:
            if isinstance(value, str):
                return value
            raise ConfigError(f"must be a string, got {_short(value)}")
        if isinstance(value, bool):
            raise ConfigError(f"must be a number, got {_short(value)}")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"must be a number, got {_short(value)}") from None
        if not isinstance(value, (int, float)):
            raise ConfigError(f"must be a number, got {_short(value)}")
        try:
            number = float(value)
        except OverflowError:  # an int past float's range (YAML reads 0xfff... exactly)
            raise ConfigError(f"must be a number, got {_short(value)}, too large") from None
        if self.kind is int:
            if not number.is_integer():
                raise ConfigError(f"must be an integer, got {_short(value)}")
            return int(value)
        return number

    def check(self, value: Any) -> Optional[str]:
        """Why `value` (already converted) is out of range, or None when it is fine."""
        if self.kind not in (int, float):
            return None
        if not math.isfinite(value):
            return f"must be finite, got {value}"
        low_bad = self.low is not None and (
            value < self.low or (self.low_open and value == self.low)
        )
        high_bad = self.high is not None and (
            value > self.high or (self.high_open and value == self.high)
        )
        if low_bad or high_bad:
            return f"must be in {self.range_text()}, got {_number(value)}"
        return None

    def range_text(self) -> str:
        """The allowed range, e.g. ``(0, 1]`` (empty for an unbounded or non-numeric one)."""
        if self.low is None and self.high is None:
            return ""
        lo = "(" if self.low_open or self.low is None else "["
        hi = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else _number(self.low)
        high = "inf" if self.high is None else _number(self.high)
        return f"{lo}{low}, {high}{hi}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _short(value: Any) -> str:
    """repr of a value for an error message, never long (YAML aliases can be huge).

    Example:
        >>> _short("x" * 100)[-5:], _short(2**300), _short([1])
        ('xx...', 'an integer of 301 bits', 'a list')
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 192:
        return f"an integer of {value.bit_length()} bits"  # repr is refused past 4300 digits
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else None
    if text is None:
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


#: merge(task, tensors, statistics) -> the merged tensor (in the compute dtype).
MergeFunction = Callable[[TensorTask, list, Any], torch.Tensor]
#: statistics(task, tensors_iterable) -> whole-tensor values that row blocks need.
StatisticsFunction = Callable[[TensorTask, Any], Any]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method (see the module doc).

    ``merge(task, tensors, statistics)`` gets the input tensors of one output tensor in
    ``task.inputs`` order (float32, or float64 when an input is float64; the base at
    ``task.base_index``), and `statistics` from ``statistics(task, tensors)`` when the
    tensor is merged in row blocks (None otherwise). It returns the merged tensor.

    ``blockwise(task)`` says whether row blocks of a tensor can be merged separately
    (given the statistics of the whole tensor). Methods that build a whole model their
    own way (``twin``, ``pleas``) have ``run`` (and ``parse``) instead of ``merge``.
    """

    name: str
    description: str
    reference: str = ""
    parameters: tuple[Parameter, ...] = ()
    base: str = "ignored"
    min_models: int = 1
    max_models: Optional[int] = None
    merge: Optional[MergeFunction] = None
    statistics: Optional[StatisticsFunction] = None
    blockwise: Callable[[TensorTask], bool] = field(default=lambda task: True)
    #: check(task) -> why the task's resolved parameters cannot be merged (None: fine).
    check: Optional[Callable[[TensorTask], Optional[str]]] = None
    parse: Optional[Callable[..., Any]] = None
    run: Optional[Callable[..., Any]] = None
    #: Extra option names of the whole-model methods, for --list-methods.
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.base not in BASE_POLICIES:
            raise ValueError(f"method {self.name}: base must be one of {BASE_POLICIES}")
        if (self.merge is None) == (self.run is None):
            raise ValueError(f"method {self.name}: give exactly one of merge= and run=")

    @property
    def streams(self) -> bool:
        """True for per-tensor methods run by the streaming engine."""
        return self.merge is not None

    def parameter(self, name: str) -> Optional[Parameter]:
        """The parameter called `name`, or None."""
        return next((p for p in self.parameters if p.name == name), None)


_METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Make `method` available by name (a second method of the same name is an error).

    Example:
        >>> from fastmerge.engine.registry import MergeMethod, register, unregister
        >>> m = register(MergeMethod("first_model", "the first model as is",
        ...                          merge=lambda task, tensors, stats: tensors[0]))
        >>> unregister("first_model")
    """
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method registered with :func:`register` (for tests and plug-ins)."""
    _METHODS.pop(name, None)


def get_method(name: Any, where: str = "config") -> MergeMethod:
    """The registered method called `name`.

    Raises:
        ConfigError: no such method (the message lists the valid names).

    Example:
        >>> get_method("linear").reference
        'https://arxiv.org/abs/2203.05482'
    """
    valid = ", ".join(sorted(_METHODS))
    if not isinstance(name, str):
        raise ConfigError(f"{where}: merge_method must be a method name; valid: {valid}")
    if name not in _METHODS:
        raise ConfigError(f"{where}: merge_method {_short(name)} is not supported; valid: {valid}")
    return _METHODS[name]


def registered_methods() -> list[MergeMethod]:
    """Every registered method, by name.

    Example:
        >>> "passthrough" in [m.name for m in registered_methods()]
        True
    """
    return [_METHODS[n] for n in sorted(_METHODS)]


def method_table() -> str:
    """The Markdown table that ``fastmerge merge --list-methods`` prints: each method,
    its base-model policy, model count, parameters (scope, default, range) and reference.

    Example:
        >>> print(method_table().splitlines()[0])
        | method | what it does | base model | models | parameters | reference |
    """
    rows = ["| method | what it does | base model | models | parameters | reference |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for m in registered_methods():
        count = f"{m.min_models}+" if m.max_models is None else (
            str(m.min_models) if m.min_models == m.max_models else f"{m.min_models}-{m.max_models}"
        )  # fmt: skip
        params = [_parameter_text(p) for p in m.parameters] + [f"`{o}`" for o in m.options]
        rows.append(
            f"| `{m.name}` | {m.description} | {m.base} | {count} | "
            f"{'; '.join(params) or '-'} | {m.reference or '-'} |"
        )
    return "\n".join(rows)


def _parameter_text(p: Parameter) -> str:
    default = "required" if p.default is REQUIRED else f"default {p.default!r}"
    if isinstance(p.default, bool):
        default = f"default {str(p.default).lower()}"
    rng = f" in {p.range_text()}" if p.range_text() else ""
    return f"`{p.name}` ({p.scope}, {p.kind.__name__}{rng}, {default})"
