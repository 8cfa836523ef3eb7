"""The micro-batcher: batches form from what queued while the previous batch ran, results go back to their own
callers, errors to theirs."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from bentos.batching import MicroBatcher


def test_one_caller_is_served_alone_and_queued_callers_share_a_batch():
    gate, calls = threading.Event(), []

    def fn(items):
        calls.append(list(items))
        if items == ["first"]:
            gate.wait(5)
        return [f"{x}!" for x in items]

    b = MicroBatcher(fn, max_batch=4, name="t")
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(b.submit, "first")
        while not calls:
            pass
        rest = [pool.submit(b.submit, i) for i in range(6)]
        while b._queue.qsize() < 6:
            pass
        gate.set()
        assert first.result(5) == "first!"
        assert [f.result(5) for f in rest] == [f"{i}!" for i in range(6)]
    assert calls[0] == ["first"]
    assert sorted(len(c) for c in calls[1:]) == [2, 4]   # 6 queued items, at most 4 per batch
    assert b.stats()["items"] == 7
    b.close()


def test_an_item_error_reaches_only_its_caller_and_a_batch_error_every_caller():
    def fn(items):
        if "boom" in items:
            raise RuntimeError("batch failed")
        return [ValueError(f"bad {x}") if x < 0 else x * 2 for x in items]

    b = MicroBatcher(fn, max_batch=8, name="t")
    assert b.submit(3) == 6
    with pytest.raises(ValueError, match="bad -1"):
        b.submit(-1)
    with pytest.raises(RuntimeError, match="batch failed"):
        b.submit("boom")
    assert b.submit(4) == 8     # the thread survived both
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(1)


def test_a_wrong_number_of_results_is_an_error_not_a_hang():
    b = MicroBatcher(lambda items: [], max_batch=2, name="t")
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        b.submit(1, timeout=5)
    b.close()
