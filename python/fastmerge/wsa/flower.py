"""WSA for Flower (``flwr``) users: swap ``FedAvg`` for :class:`FedWSA`.

* :class:`FedWSA` — a Flower ``FedAvg`` strategy whose server also fuses the weight scopes
  the clients report after training (:func:`fastmerge.wsa.fuse_scopes`, weighted by their
  numbers of examples) and sends the fused target to the next round's clients in the fit
  config (key ``"wsa_target"``).
* :class:`WSAClient` — a Flower ``NumPyClient`` for a PyTorch model that trains with the WSA
  regularizer toward the target it receives (or plain / FedProx, per
  :class:`~fastmerge.wsa.fl.ClientConfig`) and reports its scope (metric ``"wsa_scope"``).
* :func:`wsa_client_fn` — the ``client_fn`` for a Flower ``ClientApp`` or simulation.
* :func:`run_in_process` — runs a strategy with in-process clients through Flower's own
  ``Server`` (no network, no Ray): a loopback deployment for tests and small experiments.

Needs Flower: ``pip install 'fastmerge[flower]'``. Uses Flower's ``NumPyClient`` /
``Strategy`` API (``flwr.client``, ``flwr.server``), available from flwr 1.8 on.

Scopes travel as JSON strings (Flower config and metric values are scalars):
``{"names": [...], "mean": [...], "std": [...], "count": [...]}``, see :func:`encode_scope`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from ..stats import ScopeStats
from .fl import ClientConfig, check_target, fused_target, train_client
from .scope import FUSION_RULES, scope_of

try:
    from flwr.client import Client, NumPyClient
    from flwr.common import (
        DisconnectRes,
        EvaluateIns,
        EvaluateRes,
        FitIns,
        FitRes,
        GetParametersIns,
        GetParametersRes,
        GetPropertiesIns,
        GetPropertiesRes,
        Parameters,
        ReconnectIns,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )
    from flwr.server import Server
    from flwr.server.client_manager import ClientManager, SimpleClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import FedAvg
except ImportError as e:  # flwr is an optional dependency
    raise ImportError(
        "fastmerge.wsa.flower needs Flower: pip install 'fastmerge[flower]' (or flwr>=1.8)"
    ) from e

TARGET_KEY = "wsa_target"
SCOPE_KEY = "wsa_scope"
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def encode_scope(scope: ScopeStats) -> str:
    """A scope as a JSON string, to travel in a Flower config or metrics dict.

    Example:
        >>> s = fastmerge.ScopeStats.from_values([0.0], [0.5])
        >>> decode_scope(encode_scope(s)).std.tolist()
        [0.5]
    """
    return json.dumps(
        {
            "names": list(scope.names) if scope.names is not None else None,
            "mean": scope.mean.tolist(),
            "std": scope.std.tolist(),
            "count": scope.count.tolist(),
        }
    )


def decode_scope(text: Union[str, bytes]) -> ScopeStats:
    """The scope back from :func:`encode_scope`; ValueError if it is not one."""
    try:
        data = json.loads(text)
        names = tuple(data["names"]) if data.get("names") is not None else None
        return ScopeStats.from_values(data["mean"], data["std"], data["count"], names)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not an encoded weight scope: {str(text)[:80]!r} ({e})") from e


# --------------------------------------------------------------------------------------------
# Server


class FedWSA(FedAvg):
    """Flower's FedAvg plus the WSA server step: fuse the clients' scopes every round.

    After each round, the scopes the clients report (metric ``"wsa_scope"``) are fused with
    weights equal to their numbers of examples (rule ``fusion``, see
    :func:`fastmerge.wsa.fuse_scopes`) into the target sent to the next round's clients in
    their fit config (``"wsa_target"``). In round 1 the target is ``initial_target`` if given,
    else absent, and :class:`WSAClient` then uses the scope of the model it receives.
    The parameters are averaged exactly as by FedAvg; every FedAvg argument is accepted.

    Attributes:
        target: the fused target for the next round (a ScopeStats), or None.
        targets: ``{round: target sent in that round}``.
        latest_parameters: the last aggregated model as numpy arrays (None before round 1).

    Raises:
        ValueError: in ``aggregate_fit``, a fused sigma that is not positive, or a client
            result without a scope.

    Example:
        >>> strategy = fastmerge.wsa.flower.FedWSA(fusion="moment", min_available_clients=3)
        >>> strategy.target is None
        True
    """

    def __init__(
        self, *, fusion: str = "mean", initial_target: Optional[ScopeStats] = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if fusion not in FUSION_RULES:
            raise ValueError(f"fusion must be 'mean' or 'moment', got {fusion!r}")
        self.fusion = fusion
        self.target = check_target(initial_target) if initial_target is not None else None
        self.targets: dict[int, Optional[ScopeStats]] = {}
        self.latest_parameters: Optional[list[np.ndarray]] = None

    def __repr__(self) -> str:
        return f"FedWSA(fusion={self.fusion!r}, accept_failures={self.accept_failures})"

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """FedAvg's client selection, with the fused target added to every fit config."""
        pairs = super().configure_fit(server_round, parameters, client_manager)
        self.targets[server_round] = self.target
        if self.target is None:
            return pairs
        encoded = encode_scope(self.target)
        return [
            (proxy, FitIns(ins.parameters, {**ins.config, TARGET_KEY: encoded}))
            for proxy, ins in pairs
        ]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list,
    ) -> tuple[Optional[Parameters], dict]:
        """FedAvg's weighted average of the parameters, then the fusion of the scopes."""
        parameters, metrics = super().aggregate_fit(
            server_round, [(p, _without_scope(r)) for p, r in results], failures
        )
        if parameters is None or not results:
            return parameters, metrics
        self.latest_parameters = parameters_to_ndarrays(parameters)
        scopes, weights = [], []
        for proxy, res in results:
            if SCOPE_KEY not in res.metrics:
                raise ValueError(
                    f"client {proxy.cid} reported no {SCOPE_KEY!r} metric: FedWSA needs "
                    "WSAClient (or a client that reports encode_scope(scope_of(model)))"
                )
            scopes.append(decode_scope(res.metrics[SCOPE_KEY]))
            weights.append(res.num_examples)
        self.target = fused_target(scopes, weights, self.fusion)
        return parameters, metrics


def _without_scope(res: FitRes) -> FitRes:
    """The result without the scope metric, so FedAvg's metric aggregation never sees it."""
    metrics = {k: v for k, v in res.metrics.items() if k != SCOPE_KEY}
    return FitRes(res.status, res.parameters, res.num_examples, metrics)


# --------------------------------------------------------------------------------------------
# Client


class WSAClient(NumPyClient):
    """A Flower client that trains a PyTorch classifier with WSA toward the server's target.

    The parameters exchanged are the model's ``state_dict`` values in order (BatchNorm
    statistics included), as numpy arrays.

    Args:
        model: the client's model (trained in place).
        train_data: re-iterable ``(input, label)`` batches, e.g. a DataLoader.
        config: local training (default ``ClientConfig(mode="wsa")``); with ``target="init"``
            the target is the scope of the first model the client receives.
        test_data: batches for Flower's federated evaluation (optional).
        loss_fn: the task loss (default cross-entropy).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
        >>> client = fastmerge.wsa.flower.WSAClient(model, data)
        >>> params, n, metrics = client.fit(client.get_parameters({}), {})
        >>> n, sorted(metrics)
        (8, ['train_loss', 'wsa_scope'])
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Batches,
        config: Optional[ClientConfig] = None,
        *,
        test_data: Optional[Batches] = None,
        loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.train_data = train_data
        self.test_data = test_data
        self.config = config if config is not None else ClientConfig(mode="wsa")
        self.loss_fn = loss_fn
        self.initial_scope: Optional[ScopeStats] = None
        self.last_target: Optional[ScopeStats] = None

    def _device(self) -> torch.device:
        return next(iter(self.model.state_dict().values())).device

    def get_parameters(self, config: Mapping[str, Any]) -> list[np.ndarray]:
        """The model's ``state_dict`` values as numpy arrays."""
        return [t.detach().cpu().numpy() for t in self.model.state_dict().values()]

    def set_parameters(self, parameters: Sequence[np.ndarray]) -> None:
        """Load ``parameters`` (in ``state_dict`` order) into the model."""
        state = self.model.state_dict()
        if len(parameters) != len(state):
            raise ValueError(
                f"received {len(parameters)} arrays for a model with {len(state)} state entries"
            )
        # A copy: arrays deserialized by Flower can be read-only.
        new = {k: torch.tensor(np.asarray(a)) for k, a in zip(state, parameters)}
        self.model.load_state_dict(new)

    def fit(self, parameters: Sequence[np.ndarray], config: Mapping[str, Any]):
        """Load the server's model, train locally, return the model, the number of examples
        and the metrics ``train_loss`` and ``wsa_scope``."""
        self.set_parameters(parameters)
        received = scope_of(self.model)
        if self.initial_scope is None:
            self.initial_scope = received
        if self.config.target == "init":
            target = self.initial_scope
        elif TARGET_KEY in config:
            target = decode_scope(config[TARGET_KEY])
        else:
            target = received
        self.last_target = target
        device = self._device()
        n = 0

        def batches():
            nonlocal n
            n = 0
            for x, y in self.train_data:
                n += int(y.shape[0])
                yield x.to(device), y.to(device)

        loss = train_client(self.model, batches, self.config, target=target, loss_fn=self.loss_fn)
        metrics = {"train_loss": float(loss), SCOPE_KEY: encode_scope(scope_of(self.model))}
        return self.get_parameters({}), n, metrics

    def evaluate(self, parameters: Sequence[np.ndarray], config: Mapping[str, Any]):
        """Loss and accuracy of the server's model on ``test_data`` (0 examples without)."""
        self.set_parameters(parameters)
        if self.test_data is None:
            return 0.0, 0, {}
        device = self._device()
        self.model.eval()
        loss, correct, n = 0.0, 0, 0
        with torch.no_grad():
            for x, y in self.test_data:
                out = self.model(x.to(device))
                y = y.to(device)
                loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
                correct += int((out.argmax(1) == y).sum())
                n += int(y.shape[0])
        return loss / max(n, 1), n, {"accuracy": correct / max(n, 1)}


def wsa_client_fn(
    make_client: Callable[[int], WSAClient],
) -> Callable[[Any], Client]:
    """A Flower ``client_fn`` building client ``i`` with ``make_client(i)``.

    Accepts what Flower passes: a ``Context`` (``node_config["partition-id"]``, newer Flower)
    or a client id string (older Flower).

    Example:
        >>> import flwr.client
        >>> fn = fastmerge.wsa.flower.wsa_client_fn(
        ...     lambda i: fastmerge.wsa.flower.WSAClient(torch.nn.Linear(2, 2), []))
        >>> isinstance(fn("0"), flwr.client.Client)
        True
    """

    def client_fn(context_or_cid: Any) -> Client:
        if isinstance(context_or_cid, (str, int)):
            index = int(context_or_cid)
        else:
            node_config = getattr(context_or_cid, "node_config", {}) or {}
            index = int(node_config.get("partition-id", getattr(context_or_cid, "node_id", 0)))
        return make_client(index).to_client()

    return client_fn


# --------------------------------------------------------------------------------------------
# Loopback deployment


class _InProcessProxy(ClientProxy):
    """A ClientProxy that calls a client object directly (no network)."""

    def __init__(self, cid: str, client: Client) -> None:
        super().__init__(cid)
        self.client = client

    def get_properties(self, ins: GetPropertiesIns, timeout, group_id) -> GetPropertiesRes:
        return self.client.get_properties(ins)

    def get_parameters(self, ins: GetParametersIns, timeout, group_id) -> GetParametersRes:
        return self.client.get_parameters(ins)

    def fit(self, ins: FitIns, timeout, group_id) -> FitRes:
        return self.client.fit(ins)

    def evaluate(self, ins: EvaluateIns, timeout, group_id) -> EvaluateRes:
        return self.client.evaluate(ins)

    def reconnect(self, ins: ReconnectIns, timeout, group_id) -> DisconnectRes:
        return DisconnectRes(reason="")


def run_in_process(
    strategy: FedAvg,
    clients: Sequence[Union[Client, NumPyClient]],
    rounds: int,
    *,
    initial_parameters: Optional[Sequence[np.ndarray]] = None,
):
    """Run ``rounds`` rounds of ``strategy`` with in-process ``clients`` through Flower's own
    ``Server`` loop (sampling, configure/aggregate fit and evaluate): a loopback deployment
    without network or Ray. Clients run one at a time. Returns Flower's ``History``.

    ``initial_parameters`` (numpy arrays) start the server; default: the strategy's own, or
    the first client's.
    """
    if not clients:
        raise ValueError("clients is empty")
    if initial_parameters is not None:
        strategy.initial_parameters = ndarrays_to_parameters(list(initial_parameters))
    manager = SimpleClientManager()
    for i, client in enumerate(clients):
        as_client = client.to_client() if isinstance(client, NumPyClient) else client
        manager.register(_InProcessProxy(str(i), as_client))
    server = Server(client_manager=manager, strategy=strategy)
    server.set_max_workers(1)
    history, _ = server.fit(num_rounds=rounds, timeout=None)
    return history
