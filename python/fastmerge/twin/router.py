"""The Twin-Merging router: an MLP from shared-model features to task logits, its training,
and the default feature function.

The router is ``Linear(E, 2E) - BatchNorm - LeakyReLU - Dropout(0.5) - Linear(2E, 2E) -
BatchNorm - LeakyReLU - Dropout(0.5) - Linear(2E, T)``, trained with cross-entropy to
tell which task an input comes from. Its softmax is the per-input mixture of the tasks'
exclusive knowledge.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import io


class Router(nn.Module):
    """Task router: features (N, E) -> logits (N, T).

    Args:
        embed_dim: E, the feature size (e.g. the shared model's hidden size).
        num_tasks: T >= 2.
        dropout: dropout probability after each hidden layer (0.5 as in Twin-Merging).
        negative_slope: of the LeakyReLUs.

    Example:
        >>> router = Router(16, 3).eval()
        >>> router(torch.randn(5, 16)).shape
        torch.Size([5, 3])
    """

    def __init__(
        self, embed_dim: int, num_tasks: int, *, dropout: float = 0.5, negative_slope: float = 0.01
    ) -> None:
        super().__init__()
        if int(num_tasks) < 2:
            raise ValueError(f"a router needs at least two tasks, got num_tasks={num_tasks}")
        if int(embed_dim) < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        self.embed_dim, self.num_tasks, self.dropout = (
            int(embed_dim),
            int(num_tasks),
            float(dropout),
        )
        hidden = 2 * self.embed_dim
        self.net = nn.Sequential(
            nn.Linear(self.embed_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(negative_slope),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(negative_slope),
            nn.Dropout(dropout),
            nn.Linear(hidden, self.num_tasks),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.embed_dim:
            raise ValueError(
                f"router features must be (N, {self.embed_dim}), got {tuple(features.shape)}"
            )
        return self.net(features)

    def gates(self, features: torch.Tensor, top_k: Optional[int] = None) -> torch.Tensor:
        """Softmax gates (N, T) of `features` (see :func:`gates_from_logits`).

        Example:
            >>> Router(4, 3).eval().gates(torch.randn(2, 4), top_k=1).count_nonzero().item()
            2
        """
        return gates_from_logits(self(features), top_k)


def gates_from_logits(logits: torch.Tensor, top_k: Optional[int] = None) -> torch.Tensor:
    """Softmax over tasks; with `top_k`, only the k largest gates of each row are kept and
    renormalised to sum to one (the others are exact zeros, which
    :func:`fastmerge.lowrank_mixture` skips).

    Example:
        >>> gates_from_logits(torch.tensor([[0.0, 1.0, 2.0]]), top_k=1)
        tensor([[0., 0., 1.]])
    """
    gates = torch.softmax(logits, dim=-1)
    if top_k is None or top_k >= gates.shape[-1]:
        return gates
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    values, index = gates.topk(int(top_k), dim=-1)
    kept = torch.zeros_like(gates).scatter(-1, index, values)
    return kept / kept.sum(dim=-1, keepdim=True)


@dataclass
class RouterHistory:
    """Per-epoch training record of :func:`fit_router`."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False


def fit_router(
    features: torch.Tensor,
    task_ids: torch.Tensor,
    *,
    num_tasks: Optional[int] = None,
    epochs: int = 100,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    val_fraction: float = 0.1,
    patience: int = 5,
    seed: int = 0,
    dropout: float = 0.5,
    router: Optional[Router] = None,
) -> Router:
    """Train a :class:`Router` to predict `task_ids` from `features` with cross-entropy.

    AdamW over shuffled minibatches; a seeded, class-stratified `val_fraction` of the
    samples is held out, and training stops once the held-out loss has not improved for
    `patience` epochs. The weights of the best held-out epoch are restored.

    Args:
        features: (N, E) float features (e.g. from :meth:`TwinModel.features`).
        task_ids: (N,) integer task of each sample, in [0, T).
        num_tasks: T (default ``max(task_ids) + 1``); at least 2.
        router: continue training this router instead of a fresh one.

    Returns:
        The trained router in eval mode; ``router.history`` is a :class:`RouterHistory`.

    Example:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> ids = torch.arange(200) % 2
        >>> feats = torch.randn(200, 4) + 3.0 * ids[:, None]
        >>> router = fit_router(feats, ids, epochs=30, lr=1e-2)
        >>> router.history.val_accuracy[router.history.best_epoch] > 0.9
        True
    """
    x, y, t_count = _check_training_data(features, task_ids, num_tasks)
    train, val = _split(y, val_fraction, seed)
    # Initialisation and dropout draw from the global RNG: seed it, and leave the
    # caller's RNG state as it was.
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        if router is None:
            router = Router(x.shape[1], t_count, dropout=dropout)
        router = router.to(device=x.device, dtype=x.dtype)
        history = _train(
            router, x, y, train, val, epochs, batch_size, lr, weight_decay, patience, seed
        )
    router.eval()
    router.history = history
    return router


def _train(
    router: Router,
    x: torch.Tensor,
    y: torch.Tensor,
    train: torch.Tensor,
    val: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    patience: int,
    seed: int,
) -> RouterHistory:
    """AdamW epochs with early stopping on the held-out loss; restores the best weights."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=weight_decay)
    history = RouterHistory()
    best_loss, best_state, waited = math.inf, copy.deepcopy(router.state_dict()), 0
    for epoch in range(int(epochs)):
        history.train_loss.append(
            _train_epoch(router, optimizer, x[train], y[train], batch_size, gen)
        )
        val_loss, val_acc = (
            _evaluate(router, x[val], y[val]) if len(val) else (history.train_loss[-1], math.nan)
        )
        history.val_loss.append(val_loss)
        history.val_accuracy.append(val_acc)
        if val_loss < best_loss:
            best_loss, best_state, waited = val_loss, copy.deepcopy(router.state_dict()), 0
            history.best_epoch = epoch
        else:
            waited += 1
            if waited >= patience:
                history.stopped_early = True
                break
    router.load_state_dict(best_state)
    return history


def _check_training_data(
    features: torch.Tensor, task_ids: torch.Tensor, num_tasks: Optional[int]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    # Detached: the router is trained on the features, never through them (features computed
    # with gradients enabled would otherwise be backpropagated into twice).
    x = torch.as_tensor(features).detach()
    y = torch.as_tensor(task_ids)
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(
            f"features must be a floating (N, E) tensor, got {x.dtype} {tuple(x.shape)}"
        )
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise ValueError(
            f"task_ids must be an integer (N,) tensor with N = {x.shape[0]}, "
            f"got {y.dtype} {tuple(y.shape)}"
        )
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"task_ids must be >= 0, got {int(y.min())}")
    t_count = int(num_tasks) if num_tasks is not None else (int(y.max()) + 1 if y.numel() else 0)
    if t_count < 2 or len(torch.unique(y)) < 2:
        raise ValueError(
            f"a router needs samples of at least two tasks; got num_tasks={t_count} and "
            f"{len(torch.unique(y))} distinct task id(s)"
        )
    if int(y.max()) >= t_count:
        raise ValueError(f"task_ids has {int(y.max())}, out of range for num_tasks={t_count}")
    return x, y.to(device=x.device, dtype=torch.long), t_count


def _split(y: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, per-task held-out split: the same fraction of every task's samples."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for task in torch.unique(y).tolist():
        idx = torch.nonzero(y.cpu() == task).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = int(round(val_fraction * len(idx))) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).to(y.device), torch.cat(val).to(y.device)


def _train_epoch(
    router: Router,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    gen: torch.Generator,
) -> float:
    router.train()
    order = torch.randperm(len(y), generator=gen).to(y.device)
    total, seen = 0.0, 0
    for start in range(0, len(order), max(2, int(batch_size))):
        batch = order[start : start + batch_size]
        if len(batch) < 2:  # BatchNorm cannot normalise a single sample
            continue
        loss = F.cross_entropy(router(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(batch)
        seen += len(batch)
    return total / max(seen, 1)


@torch.no_grad()
def _evaluate(router: Router, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    router.eval()
    logits = router(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean())


# ---- features ---------------------------------------------------------------------------


def default_features(model: nn.Module, *inputs: Any, **kwargs: Any) -> torch.Tensor:
    """Mean-pooled last hidden state of `model` on a batch: the router's input.

    * Hugging Face models (they have a ``config``): called with
      ``output_hidden_states=True``; the last of ``hidden_states`` is averaged over the
      tokens that ``attention_mask`` (if given) marks as real.
    * Other modules: the input of the last ``nn.Linear`` (in ``named_modules`` order), the
      last hidden layer feeding the output layer, averaged over all dims between the
      first (samples) and the last (features). A module without Linear layers: its output.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> default_features(model, torch.randn(4, 5, 3)).shape
        torch.Size([4, 8])
    """
    if hasattr(model, "config") and hasattr(model.config, "output_hidden_states"):
        out = model(*inputs, output_hidden_states=True, **kwargs)
        hidden = out.hidden_states[-1] if hasattr(out, "hidden_states") else out[-1][-1]
        return mean_pool(hidden, kwargs.get("attention_mask"))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return mean_pool(_first_tensor(model(*inputs, **kwargs)), None)
    captured: list[torch.Tensor] = []
    handle = linears[-1].register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    try:
        model(*inputs, **kwargs)
    finally:
        handle.remove()
    return mean_pool(captured[-1], None)


def mean_pool(hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(N, ..., E) -> (N, E): the mean over the middle dims, over ``mask``-ed tokens only
    when a (N, L) mask is given.

    Example:
        >>> mean_pool(torch.ones(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]])).shape
        torch.Size([2, 4])
    """
    if hidden.dim() == 2:
        return hidden
    if mask is not None and hidden.dim() == 3:
        m = mask.to(hidden.dtype)[..., None]
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return hidden.flatten(1, -2).mean(1)


def _first_tensor(out: Union[torch.Tensor, Any]) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):  # a Hugging Face ModelOutput
        out = out.to_tuple()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot take features from a model output of type {type(out).__name__}")


def load_router(directory: Union[str, os.PathLike], *, device: str = "cpu") -> Optional[Router]:
    """The :class:`Router` saved beside a merger (:func:`fastmerge.twin.save_twin`), in eval
    mode on `device`, or None if none was saved.

    Example:
        >>> import tempfile
        >>> base, experts = {"w": torch.zeros(2, 2)}, [{"w": torch.eye(2)}] * 2
        >>> twin = fastmerge.twin.TwinMerger(base, experts, progress=False)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     twin.save(tmp, router=fastmerge.twin.Router(4, 2))
        ...     load_router(tmp).num_tasks
        2
    """
    saved = io.read_router(directory, device=device)
    if saved is None:
        return None
    router = Router(saved.embed_dim, saved.num_tasks, dropout=saved.dropout)
    router.load_state_dict(saved.state)
    return router.to(device).eval()
