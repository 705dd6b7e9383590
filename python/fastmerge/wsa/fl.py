"""Federated learning with WSA on one machine: a FedAvg simulation harness.

:func:`simulate` runs K clients whose training data is split non-IID by a Dirichlet(alpha)
label split (:func:`dirichlet_split`, seeded). Every round the selected clients start from
the server's model, run E local epochs of SGD, optionally with a FedProx term or the WSA
regularizer, and the server averages their models weighted by their data sizes (FedAvg).

For WSA with ``target="fused"`` the server also fuses the clients' weight scopes each round
(:func:`fastmerge.wsa.fuse_scopes`, weighted by data size) and sends the fused scope with the
model, so that the next round's clients are pulled toward it (METHODS.md, scenario 2).

The building blocks (:func:`train_client`, :func:`fedavg`, :func:`fused_target`) are also
what the Flower integration (:mod:`fastmerge.wsa.flower`) runs.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..stats import ScopeStats
from ._display import new_figure, progress_bar, save_png
from .divergence import DIVERGENCES
from .regularizer import WeightScopeRegularizer
from .scope import FUSION_RULES, fuse_scopes, scope_of

Data = Union[Dataset, tuple]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MODES = ("plain", "fedprox", "wsa")
TARGETS = ("fused", "init")


# --------------------------------------------------------------------------------------------
# Non-IID split


def dirichlet_split(
    labels: Union[Sequence[int], torch.Tensor],
    clients: int,
    alpha: float,
    *,
    seed: int = 0,
    min_size: int = 0,
) -> list[torch.Tensor]:
    """Split sample indices among ``clients`` non-IID by a Dirichlet(alpha) label split.

    For every class, the class's samples (shuffled) are cut among the clients in proportions
    drawn from Dirichlet(alpha, ..., alpha): small alpha (0.1) gives each client few classes,
    large alpha (100) is close to IID. Every index lands in exactly one client. With
    ``min_size`` > 0 the draw is repeated until every client has at least that many
    samples. The same ``seed`` gives the same split.

    Returns:
        One sorted int64 index tensor per client (possibly empty when ``min_size`` is 0).

    Raises:
        ValueError: labels that are not 1-D integers, ``clients`` < 1, ``alpha`` not
            positive, or a ``min_size`` that cannot be met.

    Example:
        >>> labels = torch.arange(10).repeat(20)  # 200 samples, 10 classes
        >>> parts = fastmerge.wsa.fl.dirichlet_split(labels, 4, 0.5, seed=0)
        >>> sum(len(p) for p in parts), torch.cat(parts).unique().numel()
        (200, 200)
    """
    y = _check_labels(labels)
    if isinstance(clients, bool) or not isinstance(clients, numbers.Integral) or clients < 1:
        raise ValueError(f"clients must be a positive int, got {clients!r}")
    if not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, numbers.Integral) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative int, got {min_size!r}")
    if min_size * clients > y.size:
        raise ValueError(
            f"min_size={min_size} for {clients} clients needs {min_size * clients} samples; "
            f"there are {y.size}"
        )
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts = _draw_split(y, int(clients), float(alpha), rng)
        if min(len(p) for p in parts) >= min_size:
            return [torch.as_tensor(np.sort(p), dtype=torch.int64) for p in parts]
    raise ValueError(
        f"no Dirichlet({alpha}) split in 1000 draws gave every client {min_size} samples; "
        "lower min_size or raise alpha"
    )


def _check_labels(labels: Any) -> np.ndarray:
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {y.dtype}")
    return y


def _draw_split(y: np.ndarray, clients: int, alpha: float, rng) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        share = rng.dirichlet(np.full(clients, alpha))
        cuts = np.round(np.cumsum(share)[:-1] * idx.size).astype(np.int64)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in parts]


# --------------------------------------------------------------------------------------------
# Client configuration and local training


@dataclass
class ClientConfig:
    """How a client trains locally.

    * ``mode``: ``"plain"`` (FedAvg), ``"fedprox"`` (adds ``mu / 2 * ||w - w_server||^2``) or
      ``"wsa"`` (adds ``strength * wsa_penalty(weights, target)``);
    * ``target`` (WSA): ``"fused"``, the server's fused scope of the clients' models of the
      previous round (the server model's scope in round 1), or ``"init"``, the scope of the
      initial model;
    * ``divergence`` (WSA): ``"kl"``, ``"reverse_kl"`` or ``"w2"``;
    * SGD: ``local_epochs``, ``lr``, ``momentum``, ``weight_decay``, ``batch_size`` (in
      :func:`simulate`, a last batch of one sample joins the batch before it, so that
      BatchNorm models train on any client size above one).

    Example:
        >>> fastmerge.wsa.fl.ClientConfig(mode="wsa", strength=0.1).target
        'fused'
    """

    mode: str = "plain"
    mu: float = 0.01
    strength: float = 1.0
    target: str = "fused"
    divergence: str = "kl"
    local_epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be 'fused' or 'init', got {self.target!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(
                f"divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}"
            )
        for name in ("mu", "strength", "lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
        for name in ("local_epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


def train_client(
    model: nn.Module,
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    config: ClientConfig,
    *,
    target: Optional[ScopeStats] = None,
    loss_fn: Optional[LossFn] = None,
) -> float:
    """Train ``model`` in place for ``config.local_epochs`` epochs of SGD; return the mean
    task loss over the steps.

    ``batches()`` yields one epoch of ``(input, label)`` batches. The FedProx anchor is the
    model's weights on entry; the WSA target is ``target`` (needed for ``mode="wsa"``).

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> loss = fastmerge.wsa.fl.train_client(model, lambda: iter([(x, y)]),
        ...     fastmerge.wsa.fl.ClientConfig(mode="fedprox", mu=0.1))
        >>> loss > 0
        True
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    regularizer = None
    if config.mode == "wsa":
        if target is None:
            raise ValueError("mode='wsa' needs a target scope")
        regularizer = WeightScopeRegularizer(
            model, target, config.strength, divergence=config.divergence
        )
    anchor = [p.detach().clone() for p in params] if config.mode == "fedprox" else None
    model.train()
    total, steps = 0.0, 0
    for _ in range(config.local_epochs):
        for x, y in batches():
            optimizer.zero_grad(set_to_none=True)
            task = loss_fn(model(x), y)
            loss = task
            if regularizer is not None:
                loss = loss + regularizer()
            if anchor is not None:
                drift = sum((p - a).pow(2).sum() for p, a in zip(params, anchor))
                loss = loss + 0.5 * config.mu * drift
            loss.backward()
            optimizer.step()
            total += float(task.detach())
            steps += 1
    return total / max(steps, 1)


# --------------------------------------------------------------------------------------------
# Server side


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict:
    """The weighted average of several models' ``state_dict`` s (FedAvg).

    Floating-point entries are averaged with the weights (normalized to sum to 1, e.g. the
    clients' data sizes); other entries (integer counters) come from the first state.

    Example:
        >>> a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
        >>> fastmerge.wsa.fl.fedavg([a, b], [1, 3])["w"].tolist()
        [0.75, 0.75]
    """
    if not states:
        raise ValueError("states is empty: nothing to average")
    if len(weights) != len(states):
        raise ValueError(f"{len(weights)} weights for {len(states)} states")
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    w = w / w.sum()
    out = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for wk, state in zip(w.tolist(), states):
            acc.add_(state[name].to(acc), alpha=wk)
        out[name] = acc.to(first.dtype)
    return out


def fused_target(
    scopes: Sequence[ScopeStats], weights: Sequence[float], rule: str = "mean"
) -> ScopeStats:
    """The server's WSA target: the clients' scopes fused with their data sizes as weights
    (:func:`fastmerge.wsa.fuse_scopes`), checked to be usable.

    Raises:
        ValueError: a fused sigma that is not positive (naming the layer), e.g. when every
            client's layer is constant.

    Example:
        >>> a = fastmerge.ScopeStats.from_values([0.0], [1.0])
        >>> b = fastmerge.ScopeStats.from_values([1.0], [2.0])
        >>> fastmerge.wsa.fl.fused_target([a, b], [3, 1]).mean.tolist()
        [0.25]
    """
    return check_target(fuse_scopes(scopes, weights, rule))


def check_target(target: ScopeStats) -> ScopeStats:
    """``target`` itself, after checking every sigma is positive and finite."""
    bad = ~(torch.isfinite(target.std) & (target.std > 0))
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        layer = target.names[i] if target.names is not None else f"#{i}"
        raise ValueError(
            f"the WSA target has a non-positive sigma for layer {layer!r} "
            f"({float(target.std[i])}): that layer's weights are constant in every model the "
            "target was taken or fused from"
        )
    return target


# --------------------------------------------------------------------------------------------
# Data


class _Data:
    """A training or test set: ``(inputs, labels)`` tensors, or a ``Dataset`` of pairs."""

    def __init__(self, data: Data, what: str) -> None:
        self.what = what
        if isinstance(data, (tuple, list)):
            if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
                raise TypeError(f"{what} must be a Dataset or an (inputs, labels) tensor pair")
            x, y = data
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{what}: {x.shape[0]} inputs but {y.shape[0]} labels (first dimensions differ)"
                )
            self.tensors: Optional[tuple[torch.Tensor, torch.Tensor]] = (x, y)
            self.dataset: Optional[Dataset] = None
        elif isinstance(data, Dataset):
            self.tensors, self.dataset = None, data
        else:
            raise TypeError(
                f"{what} must be a Dataset or an (inputs, labels) tensor pair, "
                f"got {type(data).__name__}"
            )

    def __len__(self) -> int:
        return self.tensors[0].shape[0] if self.tensors is not None else len(self.dataset)

    def labels(self) -> torch.Tensor:
        if self.tensors is not None:
            return self.tensors[1]
        targets = getattr(self.dataset, "targets", None)  # torchvision-style datasets
        if targets is not None:
            return torch.as_tensor(targets)
        return torch.as_tensor([int(self.dataset[i][1]) for i in range(len(self.dataset))])

    def batches(
        self,
        indices: torch.Tensor,
        batch_size: int,
        device: torch.device,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over ``indices`` (shuffled when a generator is given).

        A last batch of a single sample is merged into the one before it: BatchNorm cannot
        train on one sample, and dropping it would lose data."""
        if generator is not None:
            indices = indices[torch.randperm(len(indices), generator=generator)]
        chunks = list(indices.split(batch_size))
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            chunks[-2:] = [torch.cat(chunks[-2:])]
        if self.tensors is not None:
            x, y = self.tensors
            for chunk in chunks:
                yield x[chunk].to(device), y[chunk].to(device)
            return
        loader = DataLoader(self.dataset, batch_sampler=[c.tolist() for c in chunks])
        for x, y in loader:
            yield x.to(device), y.to(device)


def _evaluate_classifier(model: nn.Module, data: _Data, device: torch.device) -> dict:
    model.eval()
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in data.batches(torch.arange(len(data)), 512, device):
            out = model(x)
            loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += y.shape[0]
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1)}


# --------------------------------------------------------------------------------------------
# History


@dataclass
class History:
    """Per-round results of :func:`simulate`.

    ``accuracy[i]`` and ``loss[i]`` are the server model's test metrics after round
    ``rounds[i]``. ``extra`` holds ``"train_loss"`` (the clients' mean local loss per round,
    weighted by data size), ``"clients"`` (the clients trained each round),
    ``"client_sizes"`` (every client's number of samples), any other metric ``evaluate``
    returned, and for WSA ``"target_std"`` (the target sent each round). ``model`` is the
    final server model (left out of :meth:`to_dict`).

    Example:
        >>> h = fastmerge.wsa.fl.History([1, 2], [0.5, 0.75], [1.0, 0.7])
        >>> h.final_accuracy
        0.75
    """

    rounds: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    model: Optional[nn.Module] = field(default=None, repr=False, compare=False)

    @property
    def final_accuracy(self) -> float:
        """Test accuracy after the last round."""
        if not self.accuracy:
            raise ValueError("the history is empty: no round was run")
        return self.accuracy[-1]

    def to_dict(self) -> dict:
        """A JSON-ready dict of the rounds, metrics and ``extra``."""
        return {
            "rounds": list(self.rounds),
            "accuracy": list(self.accuracy),
            "loss": list(self.loss),
            "extra": copy.deepcopy(self.extra),
        }

    def plot(self, path) -> None:
        """Write a PNG of test accuracy and loss per round (needs matplotlib)."""
        plot_histories({"": self}, path)


def plot_histories(histories: Mapping[str, History], path) -> None:
    """Write a PNG comparing several runs (e.g. FedAvg, FedProx, WSA): test accuracy and
    loss per round, one line per run. Needs matplotlib (``pip install 'fastmerge[plot]'``)."""
    if not histories:
        raise ValueError("histories is empty: nothing to plot")
    fig = new_figure((8.4, 3.2))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for label, history in histories.items():
            ax.plot(history.rounds, getattr(history, metric), marker="o", markersize=3, label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(f"test {metric}")
        if any(histories):
            ax.legend(fontsize=8)
    save_png(fig, path)


# --------------------------------------------------------------------------------------------
# Simulation


def simulate(
    model_fn: Callable[[], nn.Module],
    train: Data,
    test: Data,
    *,
    clients: int = 10,
    alpha: float = 0.5,
    rounds: int = 20,
    client: Optional[ClientConfig] = None,
    fraction: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    evaluate: Optional[Callable[[nn.Module], Mapping[str, float]]] = None,
    client_configs: Optional[Sequence[ClientConfig]] = None,
    splits: Optional[Sequence[Sequence[int]]] = None,
    fusion: str = "mean",
    loss_fn: Optional[LossFn] = None,
    device: Union[str, torch.device, None] = None,
) -> History:
    """Simulate federated training of ``model_fn()`` by ``clients`` clients on one machine.

    Each round, a ``fraction`` of the clients that have data (at least one) is drawn; each
    starts from the server's model and trains locally (:class:`ClientConfig`: plain SGD,
    FedProx or WSA); the server replaces its model by the average of theirs weighted by
    their data sizes (FedAvg) and evaluates it on ``test``. For WSA clients with
    ``target="fused"`` the server fuses the trained clients' scopes (weighted by data size,
    rule ``fusion``) and sends the result with the next round's model; in round 1 the
    target is the initial model's scope.

    Args:
        model_fn: builds the initial model (called once, under ``seed``).
        train, test: ``(inputs, labels)`` tensor pairs or Datasets of pairs.
        clients: K; alpha: the Dirichlet concentration of the label split (seeded).
        rounds: communication rounds; fraction: share of clients per round.
        client: every client's config (default ``ClientConfig()``); or ``client_configs``,
            one per client, to make clients differ (e.g. lr or weight decay).
        seed: seeds the model, the split, the client draws, the shuffling and dropout;
            the caller's global RNG state is restored afterwards.
        progress: a tqdm bar over the rounds (if tqdm is installed).
        evaluate: ``evaluate(model) -> {"accuracy": .., "loss": .., ...}``; default: accuracy
            and cross-entropy of a classifier on ``test``.
        splits: explicit per-client training indices instead of the Dirichlet split.
        fusion: ``"mean"`` or ``"moment"`` (see :func:`fastmerge.wsa.fuse_scopes`).
        loss_fn: the local task loss ``loss_fn(output, labels)``; default cross-entropy.
        device: where to train; default the model's device.

    Returns:
        A :class:`History`; ``history.model`` is the final server model.

    A client without data is skipped with a warning. A fused target with a non-positive
    sigma raises ``ValueError``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(120, 4); y = (x[:, 0] > 0).long()
        >>> h = fastmerge.wsa.fl.simulate(lambda: torch.nn.Linear(4, 2), (x, y), (x, y),
        ...     clients=3, rounds=2, client=fastmerge.wsa.fl.ClientConfig(mode="wsa"),
        ...     progress=False)
        >>> h.rounds, len(h.accuracy)
        ([1, 2], 2)
    """
    train_data, test_data = _Data(train, "train"), _Data(test, "test")
    configs = _client_configs(client, client_configs, clients)
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    if not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if fusion not in FUSION_RULES:
        raise ValueError(f"fusion must be 'mean' or 'moment', got {fusion!r}")
    # Dropout and shuffling draw from the global generators: seed them for the run and give
    # the caller's state back afterwards.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        server = model_fn()
        if not isinstance(server, nn.Module):
            raise TypeError(f"model_fn must return an nn.Module, got {type(server).__name__}")
        device = torch.device(device) if device is not None else _device_of(server)
        parts = _client_indices(train_data, splits, clients, alpha, seed)
        federation = _Federation(
            server.to(device), train_data, parts, configs, device, fusion, loss_fn, seed
        )
        score = evaluate or (lambda m: _evaluate_classifier(m, test_data, device))
        history = History(
            extra={"train_loss": [], "clients": [], "client_sizes": [len(p) for p in parts]}
        )
        if federation.uses_wsa:
            history.extra["target_std"] = []
        for r in progress_bar(range(1, rounds + 1), progress, "federated rounds", rounds):
            if federation.uses_wsa:
                history.extra["target_std"].append(federation.fused.std.tolist())
            chosen, losses, sizes = federation.round(fraction)
            federation.server.eval()
            _record(history, r, score(federation.server), chosen, losses, sizes)
    history.model = federation.server
    return history


class _Federation:
    """The server's state between rounds: its model and the WSA targets."""

    def __init__(self, server, data, parts, configs, device, fusion, loss_fn, seed) -> None:
        self.server, self.data, self.parts, self.configs = server, data, parts, configs
        self.device, self.fusion, self.loss_fn = device, fusion, loss_fn
        self.active = _active_clients(parts)
        self.generator = torch.Generator().manual_seed(seed)
        self.uses_wsa = any(c.mode == "wsa" for c in configs)
        self.init_scope = check_target(scope_of(server)) if self.uses_wsa else None
        self.fused = self.init_scope  # round 1 has no client scopes to fuse yet

    def round(self, fraction: float) -> tuple[list[int], list[float], list[int]]:
        """One round: train the chosen clients from the server model, then FedAvg (and fuse
        the clients' scopes into the next round's WSA target)."""
        chosen = _choose(self.active, fraction, self.generator)
        states, sizes, scopes, losses = [], [], [], []
        for k in chosen:
            local = copy.deepcopy(self.server)
            losses.append(self.train(k, local))
            states.append(local.state_dict())
            sizes.append(len(self.parts[k]))
            if self.uses_wsa:
                scopes.append(scope_of(local))
        self.server.load_state_dict(fedavg(states, sizes))
        if self.uses_wsa:
            self.fused = fused_target(scopes, sizes, self.fusion)
        return chosen, losses, sizes

    def train(self, k: int, model: nn.Module) -> float:
        cfg = self.configs[k]

        def batches():
            return self.data.batches(self.parts[k], cfg.batch_size, self.device, self.generator)

        target = self.init_scope if cfg.target == "init" else self.fused
        return train_client(model, batches, cfg, target=target, loss_fn=self.loss_fn)


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _client_configs(
    client: Optional[ClientConfig], client_configs: Optional[Sequence[ClientConfig]], k: Any
) -> list[ClientConfig]:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"clients must be a positive int, got {k!r}")
    if client_configs is not None:
        configs = list(client_configs)
        if len(configs) != k:
            raise ValueError(f"client_configs has {len(configs)} entries for {k} clients")
    else:
        configs = [client if client is not None else ClientConfig()] * int(k)
    for i, c in enumerate(configs):
        if not isinstance(c, ClientConfig):
            raise TypeError(f"client config {i} must be a ClientConfig, got {type(c).__name__}")
    return configs


def _client_indices(
    data: _Data, splits: Optional[Sequence[Sequence[int]]], clients: int, alpha: float, seed: int
) -> list[torch.Tensor]:
    if splits is None:
        return dirichlet_split(data.labels(), clients, alpha, seed=seed)
    if len(splits) != clients:
        raise ValueError(f"splits has {len(splits)} entries for {clients} clients")
    parts = [torch.as_tensor(list(s), dtype=torch.int64) for s in splits]
    n = len(data)
    for k, p in enumerate(parts):
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= n):
            raise ValueError(f"splits[{k}] has indices outside the training set (0..{n - 1})")
    return parts


def _active_clients(parts: Sequence[torch.Tensor]) -> list[int]:
    active = []
    for k, p in enumerate(parts):
        if len(p) == 0:
            warnings.warn(f"client {k} has no training data; it is skipped", stacklevel=4)
        else:
            active.append(k)
    if not active:
        raise ValueError("no client has training data")
    return active


def _choose(active: list[int], fraction: float, generator: torch.Generator) -> list[int]:
    m = max(1, round(fraction * len(active)))
    if m >= len(active):
        return list(active)
    picked = torch.randperm(len(active), generator=generator)[:m].sort().values
    return [active[i] for i in picked.tolist()]


def _record(
    history: History,
    r: int,
    metrics: Mapping[str, float],
    chosen: list[int],
    losses: list[float],
    sizes: list[int],
) -> None:
    metrics = {str(k): float(v) for k, v in metrics.items()}
    history.rounds.append(r)
    history.accuracy.append(metrics.pop("accuracy", math.nan))
    history.loss.append(metrics.pop("loss", math.nan))
    for name, value in metrics.items():
        history.extra.setdefault(name, []).append(value)
    total = sum(sizes)
    history.extra["train_loss"].append(sum(loss * n for loss, n in zip(losses, sizes)) / total)
    history.extra["clients"].append(list(chosen))
