"""The inputs of a model's Linear layers, streamed into Gram accumulators (RegMean).

One forward per batch feeds every layer: a forward pre-hook per layer copies the layer's
input rows into a per-layer buffer, and a full buffer goes through
:meth:`fastmerge.LeastSquares.update` (float32 GEMMs of the upper block triangle of
``X^T X`` into float64 sums), so small batches still make large GEMMs. Once the first
batch has shown the order of the layers, the forward stops at the last one: a
:class:`~fastmerge.merge._data.StopForward` raised in its pre-hook, after its input is
taken, skips the rest of the model (a classifier head or language-model head outside the
selection is not run).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from ..least_squares import LeastSquares
from . import _data

#: Input rows buffered per layer before a GEMM: at most this many, and all layers' buffers
#: together at most BUFFER_ELEMENTS values (fewer than MIN_BUFFER_ROWS: no buffering).
MAX_BUFFER_ROWS = 4096
MIN_BUFFER_ROWS = 256
BUFFER_ELEMENTS = 1 << 25


class _Rows:
    """Buffers one layer's input rows into blocks for the accumulator's GEMMs."""

    def __init__(self, ls: LeastSquares, rows: int) -> None:
        self.ls, self.rows, self.fill = ls, rows, 0
        self.buf: Optional[torch.Tensor] = None
        self.zeros: Optional[torch.Tensor] = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        n = x.shape[0]
        if n >= self.rows:
            self.flush()
            self.ls.update(x, x.new_zeros(n, 1))  # the target is unused: d_out = 1, zeros
            return
        if self.buf is None or self.buf.dtype != x.dtype or self.buf.device != x.device:
            self.flush()
            self.buf = torch.empty(self.rows, x.shape[1], dtype=x.dtype, device=x.device)
            self.zeros = torch.zeros(self.rows, 1, dtype=x.dtype, device=x.device)
        if self.fill + n > self.rows:
            self.flush()
        self.buf[self.fill : self.fill + n].copy_(x)
        self.fill += n

    def flush(self) -> None:
        if self.fill:
            self.ls.update(self.buf[: self.fill], self.zeros[: self.fill])
            self.fill = 0


def collect_inputs(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    data: Iterable[Any],
    bias: str,
    stop_at: Optional[str] = None,
) -> tuple[dict[str, LeastSquares], list[str], int]:
    """Feed the inputs of `layers` on `data` into accumulators; returns them, the layers'
    calls on the first batch in order, and the number of batches. The forward stops at
    `stop_at` once its input is taken (a layer called once per forward); by default, after
    the first batch, at the last layer of the first batch when every layer ran exactly once
    in it (the layers after it are not run)."""
    accs = {n: LeastSquares(m.in_features, 1, bias=bias == "solve" and m.bias is not None)
            for n, m in layers.items()}  # fmt: skip
    per_layer = BUFFER_ELEMENTS // max(1, sum(m.in_features for m in layers.values()))
    rows = min(MAX_BUFFER_ROWS, per_layer)
    buffers = {n: _Rows(acc, rows if rows >= MIN_BUFFER_ROWS else 0) for n, acc in accs.items()}
    order: list[str] = []
    state = {"first": True, "stop": stop_at, "explicit": stop_at is not None}

    def hook_for(name: str):
        def hook(_module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                raise TypeError(f"regmean: layer {name!r} was called without a tensor input")
            buffers[name].add(args[0])
            if state["first"]:
                order.append(name)
            if name == state["stop"] and (state["explicit"] or not state["first"]):
                raise _data.StopForward

        return hook

    device = _data.device_of(model)
    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    flags = [(m, m.training) for m in model.modules()]
    n = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in data:
                inputs, _ = _data.split_batch(batch)
                try:
                    _data.call(model, _data.to_device(inputs, device))
                except _data.StopForward:
                    pass
                if state["first"]:
                    state["first"] = False
                    once = len(order) == len(set(order)) == len(layers)
                    if state["stop"] is None and once:
                        state["stop"] = order[-1]
                n += 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    for buf in buffers.values():
        buf.flush()
    return accs, order, n


def forward_order(order: list[str], layers: Iterable[str]) -> list[str]:
    """The layers in the order they first ran, then those that did not run."""
    seen = list(dict.fromkeys(order))
    return seen + [n for n in layers if n not in seen]
