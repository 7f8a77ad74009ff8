"""Group commit: every write of the process goes through one task that commits in batches.

SQLite allows one writer at a time; hundreds of workers each committing their own row collapse to a few
hundred rows per second and start failing with "database is locked". Funnelling writes through one task
that applies whatever is queued in a single transaction keeps the durability of a commit per answer (the
caller's await returns only after its batch committed) at a fraction of the cost. No transaction is ever
open across a network call: operations are short synchronous functions of a session.

The batch itself runs where the dialect makes it cheapest (see ``JobStore``): on SQLite in one dedicated
thread with the synchronous driver, so a batch costs one thread hand-off instead of one per statement
(which on a loaded machine is milliseconds each); on PostgreSQL through the async session's ``run_sync``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.orm import Session

T = TypeVar("T")
Op = Callable[[Session], Any]
BatchRunner = Callable[[Sequence[Op]], Awaitable[list[Any]]]


@dataclass
class WriterStats:
    batches: int = 0
    ops: int = 0
    max_batch: int = 0
    retried_alone: int = 0


@dataclass
class _Item:
    op: Op
    future: asyncio.Future[Any] = field(repr=False)


class GroupCommitWriter:
    def __init__(self, run_batch: BatchRunner, *, max_batch: int = 200) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.stats = WriterStats()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="store-writer")

    async def submit(self, op: Callable[[Session], T]) -> T:
        """Queue ``op`` and wait until the batch holding it has committed; returns what ``op`` returned."""
        if self._task is None or self._task.done():
            raise RuntimeError("the store writer is not running")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(op, fut))
        # shield: a worker cancelled while its answer is being committed must not cancel the commit
        return await asyncio.shield(fut)

    async def close(self) -> None:
        if self._task is None:
            return
        self._queue.put_nowait(None)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            await self._apply(batch)

    async def _apply(self, batch: list[_Item]) -> None:
        try:
            results = await self._run_batch([item.op for item in batch])
        except Exception as exc:
            # One bad op must not fail its neighbours: replay each alone to find it.
            if len(batch) == 1:
                _fail(batch[0], exc)
                return
            self.stats.retried_alone += len(batch)
            for item in batch:
                try:
                    (result,) = await self._run_batch([item.op])
                except Exception as exc_one:
                    _fail(item, exc_one)
                else:
                    if not item.future.done():
                        item.future.set_result(result)
            return
        self.stats.batches += 1
        self.stats.ops += len(batch)
        self.stats.max_batch = max(self.stats.max_batch, len(batch))
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)


def _fail(item: _Item, exc: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(exc)
