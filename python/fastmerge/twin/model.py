"""TwinModel: the shared model whose linear layers mix every task's low-rank knowledge per
input, in one batch, without building per-sample weights.

Every ``nn.Linear`` whose weight has factors in the :class:`TwinMerger` becomes a
:class:`RoutedLinear`. For a batch with gates ``g`` (N, T), sample n's output is::

    y_n = W_s x_n + b_s + sum_t g[n, t] (U_t S_t (V_t^T x_n) + Delta_b_t)

computed by :func:`fastmerge.lowrank_mixture` (two batched GEMMs over the stacked factors,
zero gates skipped) plus ``g @ Delta_b`` for the bias. What is *not* routed: per-task
deltas of tensors that are not the weight or bias of a routed Linear (norm weights,
embeddings, convolutions, Linear layers whose weight was not factored); those keep the
shared value (:attr:`TwinModel.unrouted_keys` lists them).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.lowrank_mixture import lowrank_mixture, merge_lowrank
from .merger import TwinMerger
from .router import Router, _first_tensor, default_features, gates_from_logits

MODES = ("routed", "per_batch")
FeatureFn = Callable[..., torch.Tensor]


class GateContext:
    """The gates of the forward pass in progress, per thread (two threads can run one
    TwinModel with different batches). Shared by a TwinModel and its routed layers."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> GateContext:
        return GateContext()  # a copied model routes on its own

    @property
    def gates(self) -> Optional[torch.Tensor]:
        return getattr(self._local, "gates", None)

    @property
    def mode(self) -> str:
        return getattr(self._local, "mode", "routed")

    @contextlib.contextmanager
    def use(self, gates: Optional[torch.Tensor], mode: str) -> Iterator[None]:
        """Route with `gates` (None: plain shared weights) inside the block.

        Example:
            >>> context = GateContext()
            >>> with context.use(torch.ones(1, 2), "routed"):
            ...     context.gates.shape
            torch.Size([1, 2])
            >>> context.gates is None
            True
        """
        previous = (self.gates, self.mode)
        self._local.gates, self._local.mode = gates, mode
        try:
            yield
        finally:
            self._local.gates, self._local.mode = previous


class RoutedLinear(nn.Linear):
    """An ``nn.Linear`` with the shared weight plus per-task factors, mixed per sample.

    Keeps the Linear's parameters (same state-dict keys); the stacked factors ``us``
    (T, d_out, r), ``vs`` (T, r, d_in) and bias deltas (T, d_out) are non-persistent
    buffers that follow ``.to()``. Without gates it is exactly the shared Linear.

    Example:
        >>> linear = torch.nn.Linear(4, 3)
        >>> us, vs = torch.zeros(2, 3, 1), torch.zeros(2, 1, 4)
        >>> routed = RoutedLinear(linear, us, vs, None, GateContext())
        >>> x = torch.randn(5, 4)
        >>> with routed.context.use(torch.full((5, 2), 0.5), "routed"):
        ...     torch.allclose(routed(x), linear(x))
        True
    """

    def __init__(
        self,
        linear: nn.Linear,
        us: torch.Tensor,
        vs: torch.Tensor,
        bias_deltas: Optional[torch.Tensor],
        context: GateContext,
        backend: Optional[str] = None,
    ) -> None:
        nn.Module.__init__(self)  # reuse the Linear's parameters, do not initialise new ones
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        like = {"dtype": linear.weight.dtype, "device": linear.weight.device}
        self.register_buffer("us", us.to(**like), persistent=False)
        self.register_buffer("vs", vs.to(**like), persistent=False)
        self.register_buffer(
            "bias_deltas", None if bias_deltas is None else bias_deltas.to(**like), persistent=False
        )
        self.context = context
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.context.gates
        if gates is None:
            return F.linear(x, self.weight, self.bias)
        gates = gates.to(dtype=x.dtype, device=x.device)
        if self.context.mode == "per_batch":
            return self._forward_merged(x, gates.mean(0))
        if x.dim() < 2 or x.shape[0] != gates.shape[0]:
            raise ValueError(
                f"a routed Linear got input of shape {tuple(x.shape)} for {gates.shape[0]} "
                "gate rows: its first dim must be the batch (samples)"
            )
        y = lowrank_mixture(
            x, self.weight, self.bias, self.us, self.vs, gates, backend=self.backend
        )
        if self.bias_deltas is not None:
            per_sample = gates @ self.bias_deltas  # (N, d_out)
            per_sample = per_sample.view(gates.shape[0], *([1] * (y.dim() - 2)), -1)
            recording = torch.is_grad_enabled() and (y.requires_grad or per_sample.requires_grad)
            # y is the op's fresh output: add in place unless autograd needs it as it is
            y = y + per_sample if recording else y.add_(per_sample)
        return y

    def _forward_merged(self, x: torch.Tensor, gate_row: torch.Tensor) -> torch.Tensor:
        """One merge for the whole batch from the mean gate row, then a plain Linear."""
        weight = merge_lowrank(self.weight, self.us, self.vs, gate_row)
        bias = self.bias
        if self.bias_deltas is not None:
            delta = gate_row @ self.bias_deltas
            bias = delta if bias is None else bias + delta
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        tasks, _, rank = self.us.shape
        return f"{super().extra_repr()}, tasks={tasks}, rank={rank}"


class TwinModel(nn.Module):
    """The shared model with routed linear layers: Twin-Merging at inference.

    Args:
        model: the architecture (its weights are replaced by the shared expert's).
        merger: a :class:`TwinMerger` built from models of this architecture.
        router: a :class:`Router` from :func:`fit_router` (or None: pass ``gates=``).
        feature_fn: ``feature_fn(model, *inputs, **kwargs) -> (N, E)``, run on the shared
            model to feed the router (default :func:`default_features`).
        top_k: keep only the k largest gates per sample (renormalised).
        mode: ``"routed"`` (per-sample mixture) or ``"per_batch"`` (one merge per batch
            from the mean gate row: what a per-batch merge would give, for comparison).
        heads: optional T task heads applied to the model's output (a tensor, or the first
            element of a tuple/ModelOutput) with each sample's task: ``task_ids=`` if
            given, else the largest gate.
        copy: work on a deep copy of `model` (default) or convert it in place.
        backend: backend of :func:`fastmerge.lowrank_mixture` (default: automatic).

    Example:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> base = net.state_dict()
        >>> experts = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for t in "abc"]
        >>> twin = TwinModel(net, TwinMerger(base, experts, rank=2, progress=False))
        >>> twin(torch.randn(5, 4), gates=torch.softmax(torch.randn(5, 3), -1)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        model: nn.Module,
        merger: TwinMerger,
        router: Optional[Router] = None,
        *,
        feature_fn: Optional[FeatureFn] = None,
        top_k: Optional[int] = None,
        mode: str = "routed",
        heads: Optional[Sequence[nn.Module]] = None,
        copy: bool = True,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if top_k is not None and not 1 <= int(top_k):
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if router is not None and router.num_tasks != merger.num_tasks:
            raise ValueError(
                f"the router has {router.num_tasks} tasks but the merger {merger.num_tasks}"
            )
        if heads is not None and len(heads) != merger.num_tasks:
            raise ValueError(f"heads has {len(heads)} modules for {merger.num_tasks} tasks")
        self.model = _copy_module(model) if copy else model
        _load_shared(self.model, merger)
        self.merger = merger
        self.router = router
        self.heads = None if heads is None else nn.ModuleList(heads)
        self.feature_fn = feature_fn or default_features
        self.top_k, self.mode, self.backend = top_k, mode, backend
        self.context = GateContext()
        self.routed_keys: tuple[str, ...] = self._route_linears()
        stored = set(merger.factors) | set(merger.dense_deltas)
        self.unrouted_keys: tuple[str, ...] = tuple(
            k for k in merger.shared_state if k in stored and k not in self.routed_keys
        )

    @property
    def num_tasks(self) -> int:
        """T."""
        return self.merger.num_tasks

    def _route_linears(self) -> tuple[str, ...]:
        routed: list[str] = []
        for name, module in list(self.model.named_modules()):
            key = f"{name}.weight" if name else "weight"
            if type(module) is not nn.Linear or key not in self.merger.factors:
                continue
            us, vs = self.merger.factors[key]
            bias_key = f"{name}.bias" if name else "bias"
            bias_deltas = (
                self.merger.dense_deltas.get(bias_key) if module.bias is not None else None
            )
            layer = RoutedLinear(module, us, vs, bias_deltas, self.context, self.backend)
            if name:
                _set_submodule(self.model, name, layer)
            else:  # the model is itself a Linear
                self.model = layer
            routed.append(key)
            if bias_deltas is not None:
                routed.append(bias_key)
        return tuple(routed)

    def features(self, *inputs: Any, **kwargs: Any) -> torch.Tensor:
        """Router features of a batch, from the shared model (routed layers off).

        Example:
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
            >>> merger = TwinMerger(net, [net, net], progress=False)
            >>> TwinModel(net, merger).features(torch.randn(3, 4)).shape
            torch.Size([3, 8])
        """
        with self.context.use(None, "routed"):
            return self.feature_fn(self.model, *inputs, **kwargs)

    def gates(self, *inputs: Any, **kwargs: Any) -> torch.Tensor:
        """The router's gates (N, T) for a batch (softmax, top-k if set), from features of
        the shared model.

        Example:
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
            >>> merger = TwinMerger(net, [net, net], progress=False)
            >>> twin = TwinModel(net, merger, Router(8, 2), top_k=1).eval()
            >>> twin.gates(torch.randn(3, 4)).sum(1)
            tensor([1., 1., 1.])
        """
        if self.router is None:
            raise ValueError("this TwinModel has no router: pass gates= to forward, or a router")
        with torch.no_grad():
            features = self.features(*inputs, **kwargs)
            weight = self.router.net[0].weight  # e.g. a float32 router on a bf16 model
            logits = self.router(features.to(dtype=weight.dtype, device=weight.device))
        return gates_from_logits(logits, self.top_k)

    def check_gates(self, gates: Any) -> torch.Tensor:
        """`gates` as an (N, T) float tensor (ValueError otherwise).

        Example:
            >>> net = torch.nn.Linear(4, 2)
            >>> twin = TwinModel(net, TwinMerger(net, [net, net], progress=False))
            >>> twin.check_gates([[1, 0]])
            tensor([[1., 0.]])
        """
        g = torch.as_tensor(gates)
        if g.dim() != 2 or g.shape[1] != self.num_tasks:
            raise ValueError(
                f"gates must be (N, T) with T = {self.num_tasks} tasks, got shape {tuple(g.shape)}"
            )
        if not g.is_floating_point():
            g = g.float()
        return g

    def forward(
        self,
        *inputs: Any,
        gates: Optional[torch.Tensor] = None,
        task_ids: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> Any:
        """Run the model with per-sample routed weights. `gates` (N, T) replace the
        router's; `task_ids` (N,) pick the task heads (default: the largest gate).

        Example:
            >>> net = torch.nn.Linear(4, 2)
            >>> twin = TwinModel(net, TwinMerger(net, [net, net], progress=False))
            >>> twin(torch.randn(3, 4), gates=torch.tensor([[1.0, 0.0]] * 3)).shape
            torch.Size([3, 2])
        """
        g = self.gates(*inputs, **kwargs) if gates is None else self.check_gates(gates)
        with self.context.use(g, self.mode):
            out = self.model(*inputs, **kwargs)
        if self.heads is None:
            return out
        tasks = g.argmax(dim=1) if task_ids is None else torch.as_tensor(task_ids)
        return self._apply_heads(_first_tensor(out), tasks)

    def _apply_heads(self, hidden: torch.Tensor, tasks: torch.Tensor) -> Union[torch.Tensor, list]:
        """Each sample through its task's head; one tensor when all heads agree in shape,
        else a list of per-sample outputs."""
        if tasks.shape != (hidden.shape[0],):
            raise ValueError(f"task_ids must be ({hidden.shape[0]},), got {tuple(tasks.shape)}")
        results: list[Any] = [None] * hidden.shape[0]
        for task in torch.unique(tasks).tolist():
            index = torch.nonzero(tasks == task).flatten()
            outputs = self.heads[task](hidden[index.to(hidden.device)])
            for j, i in enumerate(index.tolist()):
                results[i] = outputs[j]
        if len({tuple(r.shape) for r in results}) == 1:
            return torch.stack(results)
        return results

    def reference_state(self, gate_row: Any) -> dict[str, torch.Tensor]:
        """The state dict this model computes with for one sample's gates, built the slow
        way (``theta_s + sum_t g_t Delta~_t`` over the routed keys): for tests and
        comparisons, loaded into the original architecture at batch size 1.

        Example:
            >>> net = torch.nn.Linear(4, 2)
            >>> twin = TwinModel(net, TwinMerger(net, [net, net], progress=False))
            >>> sorted(twin.reference_state([0.5, 0.5]))
            ['bias', 'weight']
        """
        return self.merger.merged_state(gate_row, keys=self.routed_keys)


def _copy_module(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def _load_shared(model: nn.Module, merger: TwinMerger) -> None:
    """Load the shared expert into `model`; ValueError naming a key that does not fit."""
    own = model.state_dict()
    for key in own:
        if key not in merger.shared_state:
            raise ValueError(f"the model has key {key!r}, which the merger does not have")
    for key, value in merger.shared_state.items():
        if key not in own:
            raise ValueError(f"the merger has key {key!r}, which the model does not have")
        if own[key].shape != value.shape:
            raise ValueError(
                f"key {key!r} has shape {tuple(value.shape)} in the merger but "
                f"{tuple(own[key].shape)} in the model"
            )
    model.load_state_dict(merger.shared_state)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
