"""The background reader: order, byte budget, errors, early close."""

from __future__ import annotations

import threading

import pytest
import torch

from fastmerge import io
from fastmerge.io import TensorInfo


class Recorded(dict):
    """An in-memory model that reports sizes like a checkpoint and counts reads."""

    def __init__(self, tensors, log, lock, fail_on=None):
        super().__init__(tensors)
        self.log, self.lock, self.fail_on = log, lock, fail_on

    def info(self, name):
        t = dict.__getitem__(self, name)
        return TensorInfo(name, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())

    def __getitem__(self, name):
        if name == self.fail_on:
            raise io.CheckpointError(f"model.safetensors: truncated while reading key {name!r}")
        with self.lock:
            self.log.append(name)
        return dict.__getitem__(self, name)


def models(n_models=2, n_names=20, numel=25, fail_on=None):
    log, lock = [], threading.Lock()
    names = [f"t{i}" for i in range(n_names)]
    ms = [
        Recorded(
            {n: torch.full((numel,), float(m * 100 + i)) for i, n in enumerate(names)},
            log,
            lock,
            fail_on,
        )  # fmt: skip
        for m in range(n_models)
    ]
    return ms, names, log


def test_yields_every_name_in_order_with_all_models():
    ms, names, _ = models()
    order = names[::-1]
    with io.Prefetcher(ms, order) as items:
        got = [(n, [t[0].item() for t in ts]) for n, ts in items]
    assert [n for n, _ in got] == order
    for n, values in got:
        i = int(n[1:])
        assert values == [float(i), float(100 + i)]


@pytest.mark.parametrize("budget_items", [1, 3])
def test_read_ahead_stays_within_the_byte_budget(budget_items):
    ms, names, log = models(numel=25)  # 2 models x 100 bytes = 200 bytes per item
    item_bytes = 200
    with io.Prefetcher(ms, names, max_bytes=budget_items * item_bytes) as items:
        for consumed, (_name, tensors) in enumerate(items, start=1):
            threading.Event().wait(0.002)  # let the reader run ahead as far as it may
            read_items = len(log) // 2
            # the held item plus what was read ahead never exceeds the budget
            assert read_items - (consumed - 1) <= budget_items
            del tensors


def test_an_item_larger_than_the_budget_is_read_alone():
    ms, names, log = models(n_names=5, numel=1000)
    with io.Prefetcher(ms, names, max_bytes=10) as items:
        for consumed, (_name, tensors) in enumerate(items, start=1):
            threading.Event().wait(0.002)
            assert len(log) // 2 == consumed
            del tensors


def test_read_error_surfaces_in_the_consumer_at_its_item():
    ms, names, _ = models(fail_on="t3")
    seen = []
    with pytest.raises(io.CheckpointError, match="key 't3'"):
        with io.Prefetcher(ms, names) as items:
            for name, _ in items:
                seen.append(name)
    assert seen == ["t0", "t1", "t2"]


def test_close_stops_the_thread_early():
    ms, names, _ = models(n_names=50)
    prefetcher = io.Prefetcher(ms, names, max_bytes=400)
    items = iter(prefetcher)
    next(items)
    prefetcher.close()
    assert prefetcher._thread is None
