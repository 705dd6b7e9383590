"""TwinMerger: the shared expert plus every task's exclusive knowledge as SVD factors.

Stage 1 of Twin-Merging merges T fine-tuned experts of one base model into a shared expert
``theta_s`` (task arithmetic by default, any :mod:`fastmerge.merge` method or a callable).
What the shared expert misses of task t, ``Delta_t = theta_t - theta_s``, is kept per task:

* every selected 2-D floating tensor (``include``/``exclude``, default: all of them) as
  rank-r factors ``us = U_r S_r`` (m, r) and ``vs = V_r^T`` (r, n), stacked over tasks into
  ``(T, m, r)`` and ``(T, r, n)``: the form :func:`fastmerge.lowrank_mixture` consumes;
* every other floating tensor (biases, norms, non-selected matrices) densely as a stacked
  ``(T, *shape)`` delta, or not at all when no task differs from the shared value;
* non-floating tensors (integer buffers) only in the shared state.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..merge._select import KeyFilter, key_selector
from . import io
from .router import Router
from .svd import Rank, check_rank, resolve_rank, truncated_svd

StateDict = Mapping[str, torch.Tensor]
SharedMerge = Union[str, Callable[..., Mapping[str, torch.Tensor]]]


@dataclass(frozen=True)
class TwinSizes:
    """Bytes held by a :class:`TwinMerger`, and what the dense experts would take.

    ``exclusive`` (factors + dense deltas) over ``experts`` is the compression of the
    per-task knowledge; Twin-Merging's goal is at most 0.2 at rank 10%.
    """

    shared: int
    factors: int
    dense_deltas: int
    experts: int

    @property
    def exclusive(self) -> int:
        """Bytes of all per-task knowledge: factors plus dense deltas."""
        return self.factors + self.dense_deltas

    @property
    def ratio(self) -> float:
        """``exclusive / experts`` (0 when there are no expert bytes)."""
        return self.exclusive / self.experts if self.experts else 0.0


def as_state_dict(model: Union[nn.Module, StateDict], name: str) -> dict[str, torch.Tensor]:
    """A detached ``{key: tensor}`` view of a module's state dict or of a mapping.

    Example:
        >>> sorted(as_state_dict(torch.nn.Linear(2, 3), "base"))
        ['bias', 'weight']
    """
    if isinstance(model, nn.Module):
        return {k: v.detach() for k, v in model.state_dict().items()}
    if not isinstance(model, Mapping):
        raise TypeError(f"{name} must be an nn.Module or a state dict, got {type(model).__name__}")
    out = {}
    for key, value in model.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}[{key!r}] is a {type(value).__name__}, not a tensor")
        out[key] = value.detach()
    return out


def _nothing(key: str, tensor: Optional[torch.Tensor]) -> bool:
    return False


SHARED_METHODS = ("task_arithmetic", "ties", "dare", "average")


def _shared_merge(shared: SharedMerge) -> Callable[..., Mapping[str, torch.Tensor]]:
    if callable(shared):
        return shared
    if shared not in SHARED_METHODS:
        raise ValueError(
            f"shared={shared!r} is not one of the fastmerge.merge methods {SHARED_METHODS} "
            "nor a callable"
        )
    from .. import merge as merge_methods  # imported late: a sibling package

    return getattr(merge_methods, shared)


def _check_experts(base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]]) -> None:
    """Every expert has exactly the base's keys and shapes; the message names the key."""
    for i, expert in enumerate(experts):
        missing = [k for k in base if k not in expert]
        if missing:
            raise ValueError(f"expert {i} has no key {missing[0]!r} (the base has it)")
        extra = [k for k in expert if k not in base]
        if extra:
            raise ValueError(f"expert {i} has key {extra[0]!r}, which the base does not have")
        for key, tensor in base.items():
            if expert[key].shape != tensor.shape:
                raise ValueError(
                    f"expert {i} key {key!r} has shape {tuple(expert[key].shape)}, "
                    f"the base has {tuple(tensor.shape)}"
                )


def _progress(items: list[str], enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return items
    return tqdm(items, desc=desc, leave=False)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class TwinMerger:
    """The shared expert and per-task exclusive knowledge of T experts of one base model.

    Args:
        base: the pre-trained model (``nn.Module`` or state dict).
        experts: the T fine-tuned models of the same architecture, as a sequence (task
            names ``task0``, ``task1``, ...) or a mapping ``{task name: model}``.
        shared: name of a :mod:`fastmerge.merge` method (``"task_arithmetic"``, ``"ties"``,
            ``"dare"``, ``"average"``) or a callable ``(base, experts, **shared_kwargs)``
            returning the shared state dict. ``"average"`` is called without the base.
        shared_kwargs: keyword arguments of the shared merge, e.g. ``{"scale": 0.3}``.
        rank: per-matrix rank of the factors: a float in (0, 1] is a fraction of
            ``min(shape)`` (rounded up), an int the rank itself (clamped, with a warning,
            to ``min(shape)``).
        include, exclude: which 2-D tensors get factors (regexes searched in the key, or
            a callable ``(key, tensor) -> bool``); others are kept as dense deltas. They do
            not restrict the shared merge (pass its own in `shared_kwargs`).
        svd: ``"auto"``, ``"exact"`` or ``"randomized"`` (see :func:`truncated_svd`).
        seed: seed of the randomized SVD sketches.
        progress: a tqdm bar over the tensors when tqdm is installed.

    Example:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> base = {"w": torch.randn(8, 6), "b": torch.zeros(8)}
        >>> experts = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for t in "abc"]
        >>> twin = TwinMerger(base, experts, rank=2, progress=False)
        >>> twin.factors["w"][0].shape, twin.factors["w"][1].shape, twin.dense_deltas["b"].shape
        (torch.Size([3, 8, 2]), torch.Size([3, 2, 6]), torch.Size([3, 8]))
    """

    def __init__(
        self,
        base: Union[nn.Module, StateDict],
        experts: Union[Sequence[Union[nn.Module, StateDict]], Mapping[str, Any]],
        *,
        shared: SharedMerge = "task_arithmetic",
        shared_kwargs: Optional[Mapping[str, Any]] = None,
        rank: Rank = 0.1,
        include: KeyFilter = None,
        exclude: KeyFilter = None,
        svd: str = "auto",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        base_sd = as_state_dict(base, "base")
        names, expert_sds = self._named_experts(experts)
        _check_experts(base_sd, expert_sds)
        check_rank(rank)  # reject a bad rank before any work
        self.task_names: tuple[str, ...] = tuple(names)
        self.rank: Rank = rank
        self.shared_method = (
            shared if isinstance(shared, str) else getattr(shared, "__name__", "callable")
        )
        self.shared_state = self._shared_state(
            base_sd, expert_sds, shared, dict(shared_kwargs or {})
        )
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.dense_deltas: dict[str, torch.Tensor] = {}
        if isinstance(include, Collection) and not isinstance(include, str) and not include:
            include = _nothing  # here an empty include list selects no key, as it always did
        selected = key_selector(include, exclude)
        for key in _progress(list(base_sd), progress, "twin: factoring deltas"):
            self._compress(key, [e[key] for e in expert_sds], selected, svd, seed)

    # ---------------------------------------------------------------------------- building

    @staticmethod
    def _named_experts(experts: Any) -> tuple[list[str], list[dict[str, torch.Tensor]]]:
        if isinstance(experts, Mapping) and not all(
            isinstance(v, torch.Tensor) for v in experts.values()
        ):
            names = [str(k) for k in experts]
            models = list(experts.values())
        elif isinstance(experts, Sequence) and not isinstance(experts, (str, torch.Tensor)):
            names = [f"task{i}" for i in range(len(experts))]
            models = list(experts)
        else:
            raise TypeError(
                "experts must be a sequence of models/state dicts or a {task name: model} "
                f"mapping, got {type(experts).__name__}"
            )
        if not models:
            raise ValueError("experts is empty: Twin-Merging needs at least one expert")
        return names, [as_state_dict(m, f"experts[{i}]") for i, m in enumerate(models)]

    @staticmethod
    def _shared_state(
        base: dict[str, torch.Tensor],
        experts: list[dict[str, torch.Tensor]],
        shared: SharedMerge,
        kwargs: dict[str, Any],
    ) -> dict[str, torch.Tensor]:
        fn = _shared_merge(shared)
        merged = fn(experts, **kwargs) if shared == "average" else fn(base, experts, **kwargs)
        if not isinstance(merged, Mapping):
            raise TypeError(f"the shared merge returned {type(merged).__name__}, not a state dict")
        out = {}
        for key, tensor in base.items():
            value = merged.get(key)
            if value is None or not tensor.is_floating_point():
                value = tensor  # integer buffers and keys the merge left out keep the base
            if value.shape != tensor.shape:
                raise ValueError(
                    f"the shared merge changed the shape of {key!r}: "
                    f"{tuple(value.shape)} instead of {tuple(tensor.shape)}"
                )
            out[key] = value.detach().to(tensor.dtype)
        return out

    def _compress(
        self,
        key: str,
        values: list[torch.Tensor],
        selected: Callable[[str, torch.Tensor], bool],
        svd: str,
        seed: int,
    ) -> None:
        shared = self.shared_state[key]
        if not shared.is_floating_point():
            return
        work = _compute_dtype(shared.dtype)
        deltas = torch.stack([v.to(work) - shared.to(work) for v in values])
        if not bool(deltas.any()):
            return  # no task differs here: nothing to keep
        if shared.dim() == 2 and min(shared.shape) > 0 and selected(key, shared):
            r = resolve_rank(self.rank, tuple(shared.shape), key)
            parts = [truncated_svd(d, r, method=svd, seed=seed) for d in deltas]
            us = torch.stack([p.u * p.s for p in parts]).to(shared.dtype)
            vs = torch.stack([p.vh for p in parts]).to(shared.dtype)
            self.factors[key] = (us.contiguous(), vs.contiguous())
        else:
            self.dense_deltas[key] = deltas.to(shared.dtype)

    # ------------------------------------------------------------------------------ using

    @property
    def num_tasks(self) -> int:
        """T, the number of experts."""
        return len(self.task_names)

    @property
    def ranks(self) -> dict[str, int]:
        """The rank of every factored tensor.

        Example:
            >>> base = {"w": torch.zeros(4, 4)}
            >>> experts = [{"w": torch.eye(4)}, {"w": -torch.eye(4)}]
            >>> TwinMerger(base, experts, rank=0.5, progress=False).ranks
            {'w': 2}
        """
        return {key: us.shape[-1] for key, (us, _) in self.factors.items()}

    def check_gates(self, gates: Any, name: str = "gates") -> torch.Tensor:
        """`gates` as a 1-D tensor of length T (ValueError otherwise).

        Example:
            >>> twin = TwinMerger({"w": torch.zeros(2, 2)}, [{"w": torch.eye(2)}], progress=False)
            >>> twin.check_gates([1.0])
            tensor([1.])
        """
        g = torch.as_tensor(gates)
        if g.dim() != 1 or g.numel() != self.num_tasks:
            raise ValueError(
                f"{name} must hold one weight per task (T = {self.num_tasks}), "
                f"got shape {tuple(g.shape)}"
            )
        return g

    def delta(self, key: str, gates: Any) -> Optional[torch.Tensor]:
        """``sum_t gates[t] * Delta~_t`` of one tensor in its dtype, or None when no task
        differs from the shared value there.

        Example:
            >>> experts = [{"w": torch.eye(2)}, {"w": -torch.eye(2)}]
            >>> twin = TwinMerger({"w": torch.zeros(2, 2)}, experts, rank=2, progress=False)
            >>> torch.allclose(twin.delta("w", [0.5, 0.0]), 0.5 * torch.eye(2))
            True
        """
        g = self.check_gates(gates)
        shared = self.shared_state[key]
        work = _compute_dtype(shared.dtype)
        g = g.to(device=shared.device, dtype=work)
        if key in self.factors:
            us, vs = self.factors[key]
            return torch.einsum("t,tmr,trn->mn", g, us.to(work), vs.to(work)).to(shared.dtype)
        if key in self.dense_deltas:
            return torch.tensordot(g, self.dense_deltas[key].to(work), dims=1).to(shared.dtype)
        return None

    def merged_state(
        self, gates: Any, keys: Optional[Sequence[str]] = None
    ) -> dict[str, torch.Tensor]:
        """The full state dict ``theta_s + sum_t gates[t] * Delta~_t``: what the reference
        materializes per input. `keys` limits the deltas applied (others keep the shared
        value), e.g. to the tensors a :class:`TwinModel` routes.

        Example:
            >>> base = {"w": torch.zeros(2, 2)}
            >>> experts = [{"w": torch.eye(2)}]
            >>> twin = TwinMerger(base, experts, shared="average", rank=2, progress=False)
            >>> twin.merged_state([1.0])["w"]
            tensor([[1., 0.],
                    [0., 1.]])
        """
        self.check_gates(gates)
        allowed = None if keys is None else set(keys)
        out = {}
        for key, value in self.shared_state.items():
            d = self.delta(key, gates) if allowed is None or key in allowed else None
            out[key] = value if d is None else value + d
        return out

    def task_state(self, task: Union[int, str]) -> dict[str, torch.Tensor]:
        """The reconstructed expert of one task (index or name): ``theta_s + Delta~_t``.

        Example:
            >>> experts = {"up": {"w": torch.eye(2)}, "down": {"w": -torch.eye(2)}}
            >>> twin = TwinMerger({"w": torch.zeros(2, 2)}, experts, rank=2, progress=False)
            >>> torch.allclose(twin.task_state("down")["w"], -torch.eye(2))
            True
        """
        t = self.task_names.index(task) if isinstance(task, str) else int(task)
        return self.merged_state(torch.nn.functional.one_hot(torch.tensor(t), self.num_tasks))

    def nbytes(self) -> TwinSizes:
        """Bytes of the shared state, the factors, the dense deltas, and of the T dense
        experts' floating tensors (for the compression ratio).

        Example:
            >>> base = {"w": torch.zeros(100, 100)}
            >>> experts = [{"w": torch.eye(100)}] * 2
            >>> sizes = TwinMerger(base, experts, rank=0.1, progress=False).nbytes()
            >>> sizes.factors, sizes.experts, round(sizes.ratio, 2)
            (16000, 80000, 0.2)
        """

        def size(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        return TwinSizes(
            shared=sum(size(t) for t in self.shared_state.values()),
            factors=sum(size(u) + size(v) for u, v in self.factors.values()),
            dense_deltas=sum(size(d) for d in self.dense_deltas.values()),
            experts=self.num_tasks
            * sum(size(t) for t in self.shared_state.values() if t.is_floating_point()),
        )

    def to(self, device: Union[str, torch.device]) -> TwinMerger:
        """Move every tensor to `device` (in place); returns self.

        Example:
            >>> twin = TwinMerger({"w": torch.zeros(2, 2)}, [{"w": torch.eye(2)}], progress=False)
            >>> twin.to("cpu").shared_state["w"].device
            device(type='cpu')
        """
        self.shared_state = {k: v.to(device) for k, v in self.shared_state.items()}
        self.factors = {k: (u.to(device), v.to(device)) for k, (u, v) in self.factors.items()}
        self.dense_deltas = {k: v.to(device) for k, v in self.dense_deltas.items()}
        return self

    def save(
        self, directory: Union[str, os.PathLike], *, router: Optional[nn.Module] = None
    ) -> None:
        """Write the merger (and optionally a :class:`Router`) to `directory` as safetensors
        files and a ``manifest.json``; atomic (see :func:`save_twin`).

        Example:
            >>> import tempfile
            >>> twin = TwinMerger({"w": torch.zeros(2, 2)}, [{"w": torch.eye(2)}], progress=False)
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     twin.save(tmp)
            ...     TwinMerger.load(tmp).task_names
            ('task0',)
        """
        save_twin(self, directory, router=router)

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], *, device: str = "cpu") -> TwinMerger:
        """Read a merger written by :meth:`save` (example: :meth:`save`)."""
        return load_twin(directory, device=device)

    def __repr__(self) -> str:
        sizes = self.nbytes()
        return (
            f"TwinMerger(tasks={list(self.task_names)}, shared={self.shared_method!r}, "
            f"rank={self.rank}, factored={len(self.factors)}, dense={len(self.dense_deltas)}, "
            f"exclusive/experts={sizes.ratio:.3f})"
        )


# ---- save / load (the file format is fastmerge.twin.io's) ---------------------------------


def save_twin(
    merger: TwinMerger, directory: Union[str, os.PathLike], *, router: Optional[nn.Module] = None
) -> None:
    """Write `merger` (and `router`) to `directory`, atomically (layout:
    :mod:`fastmerge.twin.io`).

    `directory` must not exist, be empty, or hold an earlier save (it is then replaced once
    the new one is complete); anything else raises FileExistsError rather than deleting a
    user's files.

    Example:
        >>> import tempfile, os
        >>> base, experts = {"w": torch.zeros(3, 3)}, [{"w": torch.eye(3)}]
        >>> twin = fastmerge.twin.TwinMerger(base, experts, progress=False)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_twin(twin, os.path.join(tmp, "twin"))
        ...     sorted(os.listdir(os.path.join(tmp, "twin")))
        ['deltas.safetensors', 'factors.safetensors', 'manifest.json', 'shared.safetensors']
    """
    if router is not None and not isinstance(router, Router):
        raise TypeError(f"router must be a fastmerge.twin.Router, got {type(router).__name__}")
    io.write_save(merger, directory, router=router)


def load_twin(directory: Union[str, os.PathLike], *, device: str = "cpu") -> TwinMerger:
    """Read a :class:`TwinMerger` written by :func:`save_twin`, tensors on `device`.

    Example:
        >>> import tempfile
        >>> twin = fastmerge.twin.TwinMerger({"w": torch.zeros(2, 2)}, [{"w": torch.eye(2)}])
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_twin(twin, tmp)
        ...     load_twin(tmp).num_tasks
        1
    """
    saved = io.read_save(directory, device=device)
    merger = TwinMerger.__new__(TwinMerger)  # the stored fields, without merging again
    merger.task_names = saved.task_names
    merger.rank = saved.rank
    merger.shared_method = saved.shared_method
    merger.shared_state = saved.shared_state
    merger.factors, merger.dense_deltas = saved.factors, saved.dense_deltas
    return merger
