"""The server's parts on their own: the embedding cache, the inference gate."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from imedsam.serve.cache import EmbeddingCache
from imedsam.serve.gate import Busy, InferenceGate, TimedOut


def test_cache_computes_a_key_once_under_concurrency():
    cache: EmbeddingCache[str] = EmbeddingCache(1000, len)
    calls = []

    def compute():
        calls.append(1)
        time.sleep(0.2)
        return "value"

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", compute))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["value"] * 8 and len(calls) == 1
    assert cache.get("k", compute) == "value" and len(calls) == 1 and cache.hits >= 1


def test_cache_evicts_least_recently_used_within_budget():
    cache: EmbeddingCache[str] = EmbeddingCache(10, len)
    cache.get("a", lambda: "aaaa")
    cache.get("b", lambda: "bbbb")
    cache.get("a", lambda: "xxxx")  # a is now the most recent
    cache.get("c", lambda: "cccc")  # over budget: b goes
    assert "a" in cache and "c" in cache and "b" not in cache and cache.used == 8
    assert cache.get("huge", lambda: "h" * 50) == "h" * 50 and "huge" not in cache  # larger than the budget
    assert cache.drop(lambda k: k == "a") == 1 and cache.used == 4


def test_cache_failure_is_not_cached_and_reaches_every_waiter():
    cache: EmbeddingCache[str] = EmbeddingCache(100, len)

    def fail():
        raise ValueError("boom")

    with pytest.raises(ValueError):
        cache.get("k", fail)
    assert cache.get("k", lambda: "ok") == "ok"


def test_gate_rejects_beyond_the_queue_and_times_out():
    async def scenario():
        gate = InferenceGate(max_inflight=1, max_queue=1, timeout_s=0.5)
        release = threading.Event()
        first = asyncio.ensure_future(gate.run(release.wait))
        second = asyncio.ensure_future(gate.run(lambda: "queued"))
        await asyncio.sleep(0.05)
        with pytest.raises(Busy) as busy:
            await gate.run(lambda: "third")
        assert busy.value.retry_after >= 1 and gate.rejected == 1
        release.set()
        assert await first is True and await second == "queued"
        with pytest.raises(TimedOut):
            await gate.run(time.sleep, 1.0)
        assert gate.admitted == 1  # the timed-out call keeps its slot until its thread returns
        await asyncio.sleep(0.7)
        assert gate.admitted == 0

    asyncio.run(scenario())
