"""Reading the next tensors of every model on a background thread, within a byte budget."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Optional

import torch

#: Default read-ahead budget: bytes of tensors read but not yet finished with.
DEFAULT_PREFETCH_BYTES = 256 << 20
#: Default size above which a tensor (per model) is merged in row blocks.
DEFAULT_BLOCK_BYTES = 64 << 20


def _nbytes(model: Mapping[str, torch.Tensor], name: str) -> int:
    info = getattr(model, "info", None)
    if info is not None:
        return int(info(name).nbytes)
    return 0  # an in-memory mapping: reading costs no new memory


class Prefetcher:
    """Iterate over ``(name, [model[name] for model in models])`` in the order of `names`,
    reading ahead on one background thread. Names in `skip` are yielded with ``None``
    instead of tensors, in their turn, without reading (the consumer reads them itself,
    e.g. block by block); nothing is read ahead while the consumer works on one.

    Memory is bounded by bytes, not by items: the item being consumed plus the items read
    ahead stay within `max_bytes`, except that one item is always allowed (an item larger
    than the budget is read alone, after the consumer has finished with the previous
    one). An item is finished with when the consumer asks for the next one: by then the
    consumer must hold no reference to its tensors (``del`` them at the end of the loop
    body), or they stay in memory beside the next ones. A read error
    is raised in the consumer, at the item that failed. Closing (or leaving the ``with``
    block) stops the thread.

    Example:
        >>> import torch
        >>> models = [{"a": torch.zeros(1), "b": torch.ones(1)},
        ...           {"a": torch.ones(1), "b": torch.zeros(1)}]
        >>> with Prefetcher(models, ["b", "a"]) as items:
        ...     [(name, [t.item() for t in ts]) for name, ts in items]
        [('b', [1.0, 0.0]), ('a', [0.0, 1.0])]
    """

    def __init__(
        self,
        models: Sequence[Mapping[str, torch.Tensor]],
        names: Sequence[str],
        *,
        max_bytes: int = DEFAULT_PREFETCH_BYTES,
        skip: Collection[str] = (),
    ) -> None:
        self.models = list(models)
        self.names = list(names)
        self.skip = frozenset(skip)
        self.max_bytes = int(max_bytes)
        self._ready: deque = deque()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._held = 0  # bytes of the item the consumer is working on
        self._stop = False
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[str, list[torch.Tensor]]]:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="fastmerge-prefetch", daemon=True
            )
            self._thread.start()
        for _ in self.names:
            self._release_held()
            with self._cond:
                while not self._ready:
                    self._cond.wait()
                name, tensors, size, error = self._ready.popleft()
                self._held = size
            if error is not None:
                raise error
            yield name, tensors
            del tensors  # the consumer's references are its own to drop
        self._release_held()

    def _release_held(self) -> None:
        with self._cond:
            self._in_flight -= self._held
            self._held = 0
            self._cond.notify_all()

    def _run(self) -> None:
        for name in self.names:
            try:
                # a skipped name fills the budget: nothing is read beside its blocks
                size = (
                    self.max_bytes
                    if name in self.skip
                    else sum(_nbytes(m, name) for m in self.models)
                )
            except Exception as exc:  # reported in the consumer, at this item
                self._push(name, [], 0, exc)
                return
            with self._cond:
                while (
                    not self._stop
                    and self._in_flight > 0
                    and (self._in_flight + size > self.max_bytes)
                ):
                    self._cond.wait()
                if self._stop:
                    return
                self._in_flight += size
            if name in self.skip:
                self._push(name, None, size, None)
                continue
            try:
                tensors = [m[name] for m in self.models]
            except Exception as exc:
                self._push(name, [], size, exc)
                return
            self._push(name, tensors, size, None)

    def _push(self, name, tensors, size, error) -> None:
        with self._cond:
            self._ready.append((name, tensors, size, error))
            self._cond.notify_all()

    def close(self) -> None:
        """Stop reading ahead and drop what was read."""
        with self._cond:
            self._stop = True
            self._ready.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
