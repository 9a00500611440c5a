"""Embeddings cached per key under a memory budget: least recently used first out, and a key being computed is
computed once (callers asking for it meanwhile wait for that result instead of starting their own)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")


class EmbeddingCache(Generic[T]):
    """A thread-safe LRU of values with a size in bytes.

    Args:
        budget_bytes: the total size kept; an entry larger than the whole budget is returned but not kept.
        size_of: the size in bytes of a value (e.g. :attr:`imedsam.infer.segmenter.ImageState.nbytes`).
    """

    def __init__(self, budget_bytes: int, size_of: Callable[[T], int]) -> None:
        self.budget = int(budget_bytes)
        self._size_of = size_of
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, tuple[T, int]] = OrderedDict()
        self._pending: dict[Hashable, Future] = {}
        self.used = 0
        self.hits = self.misses = self.computed = 0

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The value of ``key``, computing it with ``compute()`` when absent (once, however many threads ask)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0]
            future = self._pending.get(key)
            owner = future is None
            if owner:
                future = self._pending[key] = Future()
                self.misses += 1
        if not owner:
            return future.result()
        try:
            value = compute()
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            future.set_exception(exc)
            raise
        size = int(self._size_of(value))
        with self._lock:
            self.computed += 1
            del self._pending[key]
            if size <= self.budget:
                self._items[key] = (value, size)
                self.used += size
                while self.used > self.budget:
                    _, (_, old) = self._items.popitem(last=False)
                    self.used -= old
        future.set_result(value)
        return value

    def drop(self, match: Callable[[Hashable], bool]) -> int:
        """Remove every entry whose key matches (e.g. a closed session's); returns how many."""
        with self._lock:
            keys = [k for k in self._items if match(k)]
            for k in keys:
                self.used -= self._items.pop(k)[1]
            return len(keys)
