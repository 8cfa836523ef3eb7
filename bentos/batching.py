"""Micro-batching of the per-request work that costs less per item in a batch: online feature reads, the user
tower and the ANN search (one Milvus call with nq = batch searches a FLAT collection ~4x cheaper per query).

A ``MicroBatcher`` runs its function on one thread over whatever requests queued while its previous batch ran.
It never waits to fill a batch: one client sees no added latency; under load, batches form by themselves and
the cost per request falls (bench/bench_service.py measures both).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """``submit(item)`` -> ``fn([items...])[i]``, with ``fn`` called on one thread over the queued items.

    ``fn`` returns one result per item, in order; a result that is an exception is raised to that item's caller
    only; an exception raised by ``fn`` itself is raised to every caller of the batch."""

    def __init__(self, fn: Callable[[list[Item]], Sequence[Result | BaseException]], max_batch: int, name: str):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._fn = fn
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Item, Future] | None] = queue.SimpleQueue()
        self._closed = False
        self.batches = 0
        self.items = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Item, timeout: float | None = None) -> Result:
        if self._closed:
            raise RuntimeError("the batcher is closed")
        future: Future = Future()
        self._queue.put((item, future))
        return future.result(timeout)

    def close(self) -> None:
        """Finish the queued items, then stop the thread."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._process(batch)
            if stop:
                return

    def _process(self, batch: list[tuple[Item, Future]]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            results = self._fn([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
        except BaseException as e:  # noqa: BLE001 - every caller of the batch gets the error
            for _, future in batch:
                future.set_exception(e)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "items": self.items,
                "mean_batch": round(self.items / self.batches, 3) if self.batches else 0.0}
