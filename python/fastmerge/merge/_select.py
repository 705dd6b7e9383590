"""Key selection (include/exclude regexes) and the checks every static merge shares."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Callable, Optional, Union

import torch

StateDict = Mapping[str, torch.Tensor]
Patterns = Optional[Union[str, Sequence[str]]]
#: A key filter: a regular expression (``re.search``), a list of them, a callable
#: ``(key, tensor) -> bool``, or None (no filter).
KeyFilter = Union[Patterns, Callable[[str, Optional[torch.Tensor]], bool]]
#: What :func:`key_selector` returns: ``selected(key, tensor=None) -> bool``.
KeySelector = Callable[..., bool]


def compile_patterns(patterns: Patterns, name: str) -> list[re.Pattern]:
    """Compiled regexes of `patterns` (one or a list; None: none), errors naming `name`."""
    if patterns is None:
        return []
    items = [patterns] if isinstance(patterns, str) else list(patterns)
    compiled = []
    for p in items:
        if not isinstance(p, str):
            raise TypeError(f"{name} must be a regex string or a list of them, got {p!r}")
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"{name} pattern {p!r} is not a valid regex: {exc}") from exc
    return compiled


def key_selector(include: KeyFilter = None, exclude: KeyFilter = None) -> KeySelector:
    """fastmerge's one key selector: a predicate ``selected(key, tensor=None)`` that is True
    when `include` selects the key (every key when `include` is None or an empty list) and
    `exclude` does not. Strings are regular expressions searched in the key (``re.search``);
    a list selects a key that one of them matches; a callable gets ``(key, tensor)``
    (``tensor`` is None when the caller passes only the key).

    Used by every static merge, the ``fastmerge merge`` engine and Twin-Merging.

    Example:
        >>> from fastmerge.merge import key_selector
        >>> selected = key_selector(include=r"\\.weight$", exclude=["^embed"])
        >>> [selected(k) for k in ("fc.weight", "fc.bias", "embed.weight")]
        [True, False, False]
        >>> big = key_selector(lambda key, tensor: tensor.numel() > 2)
        >>> big("w", torch.zeros(3)), big("b", torch.zeros(2))
        (True, False)
    """
    inc, exc = _key_filter(include, "include"), _key_filter(exclude, "exclude")

    def selected(key: str, tensor: Optional[torch.Tensor] = None) -> bool:
        if inc is not None and not inc(key, tensor):
            return False
        return exc is None or not exc(key, tensor)

    return selected


def _key_filter(spec: KeyFilter, name: str) -> Optional[KeySelector]:
    """`spec` as a ``(key, tensor) -> bool`` predicate; None for no filter (None or [])."""
    if spec is None:
        return None
    if callable(spec):
        return lambda key, tensor: bool(spec(key, tensor))
    if not isinstance(spec, (str, Iterable)):
        raise TypeError(
            f"{name} must be a regex string, a list of them or a callable, got {spec!r}"
        )
    regexes = compile_patterns(spec, name)
    if not regexes:
        return None
    return lambda key, tensor: any(r.search(key) for r in regexes)


def mergeable(tensor: torch.Tensor) -> bool:
    """Floating tensors are merged; integer and boolean buffers are copied."""
    return tensor.dtype.is_floating_point


def compute_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 when any tensor is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_models(base: StateDict, models: Sequence[StateDict], what: str) -> list[str]:
    """The base's keys, after checking that there is at least one model and every model
    has exactly the base's keys; the ValueError names the key and the model."""
    if isinstance(models, Mapping) or not isinstance(models, Sequence):
        raise TypeError(f"{what} must be a list of state dicts, got {type(models).__name__}")
    if len(models) < 1:
        raise ValueError(f"{what} is empty; at least one is needed")
    keys = list(base.keys())
    key_set = set(keys)
    for i, model in enumerate(models):
        other = set(model.keys())
        missing = [k for k in keys if k not in other]
        if missing:
            raise ValueError(f"{what}[{i}] has no key {missing[0]!r} (and {len(missing) - 1} more)")
        extra = sorted(other - key_set)
        if extra:
            raise ValueError(f"{what}[{i}] has key {extra[0]!r}, which the base does not have")
    return keys


def load_key(key: str, base: torch.Tensor, models: Sequence[StateDict], what: str):
    """Read `key` once from each model and check its shape against the base's."""
    tensors = []
    for i, model in enumerate(models):
        t = model[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}][{key!r}] is a {type(t).__name__}, not a tensor")
        if t.shape != base.shape:
            raise ValueError(
                f"{what}[{i}][{key!r}] has shape {tuple(t.shape)} but the base has "
                f"{tuple(base.shape)}"
            )
        tensors.append(t)
    return tensors


def merge_selected(
    base: StateDict,
    experts: Sequence[StateDict],
    include: Patterns,
    exclude: Patterns,
    merge_key: Callable[[str, torch.Tensor, list], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The per-key loop every static merge shares: ``merge_key(key, base_tensor,
    expert_tensors)`` for selected floating keys (each expert's tensor read once), a copy of
    the base tensor for the rest. Raises like :func:`check_models` and :func:`load_key`.

    Example:
        >>> base, expert = {"w": torch.zeros(2), "n": torch.tensor(3)}, {"w": torch.ones(2)}
        >>> expert["n"] = torch.tensor(5)
        >>> out = merge_selected(base, [expert], None, None, lambda k, b, ts: b + ts[0])
        >>> out["w"].tolist(), out["n"].item()
        ([1.0, 1.0], 3)
    """
    keys = check_models(base, experts, "experts")
    selected = key_selector(include, exclude)
    merged = {}
    for key in keys:
        b = base[key]
        if selected(key, b) and mergeable(b):
            merged[key] = merge_key(key, b, load_key(key, b, experts, "experts"))
        else:
            merged[key] = b.clone()
    return merged
