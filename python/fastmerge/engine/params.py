"""mergekit's parameter semantics: scalars, per-layer gradients and filters.

A parameter's setting in the YAML is one of:

* a scalar: ``weight: 0.5``;
* a gradient, a list of numbers interpolated linearly over the layer position
  ``t`` in [0, 1]: ``weight: [0, 0.5, 1]`` gives 0 at the first layer of the slice,
  0.5 in the middle and 1 at the last (a list of booleans or strings is not
  interpolated: element ``int(t · (n - 1))`` is taken);
* a list of conditional settings ``{filter: SUBSTRING, value: SETTING}``, tried in
  order: the first whose filter is a substring of the tensor name (or is ``*`` or
  absent) gives the value.

The settings of one parameter are looked up from the most specific place to the least
(the model's own ``parameters`` in a slice or ``models`` entry, then the slice's, then
the top-level ones); the first place that yields a value wins, else the method's
default. ``t`` is ``i / (n - 1)`` for layer ``i`` of an ``n``-layer slice (1 when the
slice has one layer) and 0 for tensors outside the layers (embeddings, final norm,
LM head), exactly as mergekit computes it.

Example:
    >>> from fastmerge.engine.params import evaluate
    >>> float_ = lambda v: float(v)
    >>> evaluate([0.0, 1.0], "model.layers.3.mlp.up_proj.weight", 0.25, float_)
    0.25
    >>> setting = [{"filter": "self_attn", "value": 0.1}, {"value": [0.0, 1.0, 0.0]}]
    >>> evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0.5, float_)
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

from .errors import ConfigError
from .registry import _short

_SCALARS = (bool, int, float, str)
#: A gradient longer than this is refused (a YAML alias bomb expands to huge lists).
MAX_GRADIENT = 4096
#: Conditional settings nested deeper than this are refused.
MAX_DEPTH = 8


def check_setting(setting: Any, where: str, depth: int = 0, _seen: Optional[set] = None) -> None:
    """Check the shape of one parameter's setting (scalar, gradient, filter list) before
    any value is used, so that a bad one is named with its key.

    Raises:
        ConfigError: a mapping without ``value``, unknown keys in a conditional
            setting, a filter that is not a string, an empty or over-long gradient, a
            gradient mixing numbers and lists, or NaN/inf in a gradient.

    Example:
        >>> check_setting([0.0, float("nan")], "parameters.weight")
        Traceback (most recent call last):
        ...
        fastmerge.engine.errors.ConfigError: parameters.weight: gradient entry 1 is not finite (nan)
    """
    if depth > MAX_DEPTH:
        raise ConfigError(f"{where}: conditional settings nested too deeply")
    # YAML aliases make one list the value of many settings: check each object once per
    # depth, or a few lines of aliases take 9**8 visits (a recursive alias still reaches
    # MAX_DEPTH).
    seen = set() if _seen is None else _seen
    if not isinstance(setting, _SCALARS):
        if (id(setting), depth) in seen:
            return
        seen.add((id(setting), depth))
    if isinstance(setting, _SCALARS):
        _check_scalar(setting, where)
        return
    if isinstance(setting, Mapping):
        setting = [setting]
    if not isinstance(setting, list):
        raise ConfigError(
            f"{where}: must be a value, a list of values (a gradient) or a list of "
            f"{{filter, value}} mappings, got a {type(setting).__name__}"
        )
    if not setting:
        raise ConfigError(f"{where}: an empty list is not a setting")
    if len(setting) > MAX_GRADIENT:
        raise ConfigError(f"{where}: a list of {len(setting)} entries is too long")
    if all(isinstance(e, _SCALARS) for e in setting):
        for i, e in enumerate(setting):
            if isinstance(e, float) and not math.isfinite(e):
                raise ConfigError(f"{where}: gradient entry {i} is not finite ({e})")
            _check_scalar(e, f"{where}: gradient entry {i}")
        return
    for i, cond in enumerate(setting):
        if not isinstance(cond, Mapping):
            raise ConfigError(
                f"{where}[{i}]: a list mixing values and {{filter, value}} mappings; use "
                "either a gradient (all values) or conditional settings (all mappings)"
            )
        bad = [k for k in cond if k not in ("filter", "value")]
        if bad:
            raise ConfigError(f"{where}[{i}]: unknown key {_short(bad[0])}; valid: filter, value")
        if "value" not in cond:
            raise ConfigError(f"{where}[{i}]: a conditional setting needs a 'value'")
        filt = cond.get("filter")
        if filt is not None and not isinstance(filt, str):
            raise ConfigError(
                f"{where}[{i}].filter: must be a string (a substring of tensor names)"
            )
        check_setting(cond["value"], f"{where}[{i}].value", depth + 1, seen)


def _check_scalar(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be finite, got {value}")
    # An int past float's range (YAML reads 0xfff... exactly) is no parameter's value,
    # even where it is never used, and no text either (repr stops at 4300 digits).
    if isinstance(value, int) and value.bit_length() > 1024:
        raise ConfigError(f"{where}: {_short(value)} is too large")


def evaluate(setting: Any, tensor_name: str, t: float, convert: Callable[[Any], Any]) -> Any:
    """The value of one setting for a tensor at layer position `t` (None when no
    conditional setting matches), converted with `convert` (a parameter's type check)."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, _SCALARS):
        return convert(setting)
    if all(isinstance(e, _SCALARS) for e in setting):
        values = [convert(e) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return convert((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        filt = cond.get("filter")
        if filt is None or filt == "*" or (tensor_name and filt in tensor_name):
            return evaluate(cond["value"], tensor_name, t, convert)
    return None


def resolve(
    name: str,
    scopes: Sequence[tuple[str, Optional[Mapping[str, Any]]]],
    tensor_name: str,
    t: float,
    convert: Callable[[Any], Any],
) -> tuple[Any, Optional[str]]:
    """The first value that `scopes` (``(label, parameters)`` from most to least
    specific) give for parameter `name`, with the label it came from; ``(None, None)``
    when none does.

    Example:
        >>> resolve("weight", [("models[0]", {"density": 0.5}), ("parameters", {"weight": 2})],
        ...         "w", 0.0, float)
        (2.0, 'parameters')
    """
    for label, params in scopes:
        if params is not None and name in params:
            try:
                value = evaluate(params[name], tensor_name, t, convert)
            except ConfigError as exc:
                raise ConfigError(f"{label}.{name}: {exc}") from None
            if value is not None:
                return value, label
    return None, None
