"""One call for everything asked in one event-loop turn: Redis commands of requests that arrive
together, in one pipeline.

When 32 streams end on the same GPU step, their callers send 32 new requests that reach the router
in the same poll; queued one ``XADD`` at a time, the 32nd job waits for 31 round trips before the
dispatcher can read it, and a GPU that started its next step meanwhile makes it wait a whole step
more. :class:`TurnBatch` lets every caller of the turn add its item, and the first of them runs
``flush`` once for all of them after one yield to the loop (no timer: the cost is one loop
iteration).

Each caller gets its own result, or its own exception (``flush`` returns one result or exception
per item, in order); an exception raised by ``flush`` itself goes to every caller of the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class TurnBatch(Generic[T, R]):
    """Parameters:
    flush: runs the items of one turn; returns one result (or an exception instance) per item.
    max_items: a batch that reaches this size is flushed without waiting for the turn to end.
    """

    __slots__ = ("_flush", "_max", "_pending", "batches", "items")

    def __init__(
        self, flush: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]], max_items: int = 256
    ) -> None:
        self._flush = flush
        self._max = max_items
        self._pending: list[tuple[T, asyncio.Future[R]]] | None = None
        self.batches = 0  # flushes run (for benchmarks and tests)
        self.items = 0  # items flushed

    async def submit(self, item: T) -> R:
        """Add ``item`` to this turn's batch and return its result once the batch ran."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        pending = self._pending
        if pending is not None:
            pending.append((item, future))
            if len(pending) >= self._max:  # full: the next caller starts a new batch
                self._pending = None
            return await asyncio.shield(future)
        pending = self._pending = [(item, future)]
        # the first caller runs the batch in a task, so that its own cancellation (caller gone)
        # never strands the others' items
        task = asyncio.get_running_loop().create_task(self._run(pending))
        task.add_done_callback(_retrieve)
        return await asyncio.shield(future)

    async def _run(self, pending: list[tuple[T, asyncio.Future[R]]]) -> None:
        await asyncio.sleep(0)  # the other callers woken in this turn add their items now
        if self._pending is pending:
            self._pending = None
        items = [item for item, _ in pending]
        self.batches += 1
        self.items += len(items)
        try:
            results = await self._flush(items)
        except BaseException as exc:  # every caller of the batch gets the error
            for _, future in pending:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("flush cancelled"))
                    future.add_done_callback(_retrieve_future)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(pending, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
                future.add_done_callback(_retrieve_future)
            else:
                future.set_result(result)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def _retrieve_future(future: asyncio.Future[Any]) -> None:
    # a caller that was cancelled meanwhile never reads its exception: no "never retrieved" noise
    if not future.cancelled():
        future.exception()
