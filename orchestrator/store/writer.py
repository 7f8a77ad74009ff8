"""Group commit: every store operation of the process goes through one task that commits in batches.

SQLite allows one writer at a time: hundreds of workers each committing their own row collapse to a few
hundred rows a second and start failing with "database is locked". One task that applies whatever is
queued in a single transaction keeps the durability of a commit per answer (a caller's await returns only
after its batch committed) at a fraction of the cost. No transaction is ever open across a network call:
an op is a short coroutine of a transaction.

Outages: when the database cannot be used (``DatabaseDown``), the batch is kept and retried with capped
backoff for up to ``outage_timeout`` seconds; callers just wait. If it comes back the run goes on; if not,
every waiting and later operation fails with ``DatabaseUnavailable`` naming the cause, and the engine
stops cleanly. One failing op (a bug, a constraint) must not fail its neighbours: the batch is then
replayed op by op.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from orchestrator.errors import DatabaseUnavailable
from orchestrator.store.sql import Backend, DatabaseDown, Op

T = TypeVar("T")
SQLITE_GATHER_S = 0.002  # see GroupCommitWriter: the wait of a small urgent batch for company, SQLite
OutageHook = Callable[[str, str], None]  # (event, cause): "db.down" / "db.recovered"


@dataclass
class WriterStats:
    """Counters of one writer: batches committed, ops in them, the largest batch, ops replayed one by
    one after their batch failed, and outages met (each counted once, however long)."""

    batches: int = 0
    ops: int = 0
    max_batch: int = 0
    retried_alone: int = 0
    outages: int = 0


@dataclass
class _Item:
    op: Op[Any]
    future: asyncio.Future[Any] = field(repr=False)


class GroupCommitWriter:
    """One task applying queued ops in batches (see the module docstring).

    Two lanes: ``urgent`` ops (an intent that a call waits for, a claim that workers wait for) are
    committed before the others: a batch holds every urgent op queued and, only when none is, the rest.
    On SQLite an urgent batch also carries up to ``riders`` of the other ops queued behind it (64 by
    default; they are applied after the urgent ones): a commit costs its fsync, its thread hand-off and
    its wake-ups far more than a few more statements do, and answers are queued the moment they arrive,
    so batches of their own were mostly one or two answers long (measured, 3,000 calls at 100 ms of
    latency: 835 commits instead of 2,076, and a sixth less CPU per call). An intent therefore waits for
    at most ``riders`` answers' statements besides its own batch (about 4 ms for 64 here), never for a
    batch of answers queued ahead of it. PostgreSQL keeps the lanes apart: there a batch is a chain of
    round trips, and a longer chain is a later intent.

    Gathering (SQLite on its writer thread): when fewer than ``gather_below`` urgent ops are queued, the
    idle writer waits ``gather_s`` (2 ms) before it takes them. Answers come back in bursts, and each one
    frees a call slot whose next intent is queued a few loop turns later; without the wait, the first
    intent of a burst left alone and the rest needed a commit of their own. Measured, 3,000 calls at
    100 ms of latency: 298-373 commits instead of 617-635; 10,000 calls, six pairs: 0.93x the CPU per
    call (0.75x-1.03x), calls per second unchanged (0.996x). A call's intent waits at most ``gather_s``
    longer, against a cloud call of tens of milliseconds or more; nothing waits when the batch is full
    anyway (``gather_below`` urgent ops queued, as when the writer is the bottleneck at 0 ms of latency,
    or ``riders`` other ops), nor while closing. Not on PostgreSQL (unmeasured there, and its batches
    commit in parallel), nor for a backend run on the loop's own thread (``inline``: tests on a
    virtual-time loop, whose clock the wait would move).

    Ops that take the run's lock (``run_lock``: claims and send permits, which serialise across the
    processes of a run on PostgreSQL) are urgent too, but when batches commit in parallel they go in
    batches of their own, one such batch at a time: the lock is then held for those ops and their commit
    only, not for a whole batch of intents and answers, and no connection sits waiting for it."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_batch: int = 256,
        riders: int = 64,
        outage_timeout: float = 60.0,
        on_outage: OutageHook | None = None,
        gather_s: float | None = None,
        gather_below: int = 8,
    ) -> None:
        """``gather_s``: the wait for company of a small urgent batch (see the class docstring); None: 2 ms
        on SQLite's writer thread, else none."""
        self._backend = backend
        self._max_batch = max_batch
        sqlite = getattr(backend, "dialect", None) == "sqlite"
        if gather_s is None:
            gather_s = SQLITE_GATHER_S if sqlite and not getattr(backend, "inline", False) else 0.0
        self.gather_s = gather_s
        self._gather_below = gather_below
        self.outage_timeout = outage_timeout
        self._on_outage = on_outage
        self._urgent: deque[_Item] = deque()
        self._normal: deque[_Item] = deque()
        self._locking: deque[_Item] = deque()  # run_lock ops, when batches commit in parallel
        self._parallel = max(1, getattr(backend, "parallel", 1))
        # the run's lock is held for a batch's whole commit on PostgreSQL: nothing rides along there
        self._riders = riders if sqlite else 0
        self._ready = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._dead: DatabaseUnavailable | None = None
        self.stats = WriterStats()

    def start(self) -> None:
        """Start the writer task on the running loop (once: later calls do nothing)."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="store-writer")

    def set_outage_hook(self, hook: OutageHook | None) -> None:
        """Call ``hook(event, cause)`` with ``db.down`` when an outage starts and ``db.recovered`` when it
        ends (None: no hook). The hook's own errors are ignored."""
        self._on_outage = hook

    async def submit(self, op: Op[T], *, urgent: bool = False, run_lock: bool = False) -> T:
        """Queue ``op`` and wait until the batch holding it committed; returns what ``op`` returned.
        ``run_lock``: the op takes the run's lock (an urgent op, batched apart; see the class docstring).

        Raises ``DatabaseUnavailable`` once an outage outlasted the budget, and whatever ``op`` raised."""
        # No shield needed: the op is queued and will run and commit whatever happens to this caller;
        # a cancelled caller only stops waiting for its result (``_apply`` skips done futures).
        return await self.submit_soon(op, urgent=urgent, run_lock=run_lock)

    def submit_soon(self, op: Op[T], *, urgent: bool = False, run_lock: bool = False) -> asyncio.Future[T]:
        """Queue ``op`` now and return the future of its result, set once the batch holding it committed
        (``submit`` without the wait: for a write nobody waits for, whose follow-up is a done callback).
        Raises ``DatabaseUnavailable`` at once when the budget of an outage is already spent; later errors
        (the op's own, an outage) are set on the future."""
        if self._dead is not None:
            raise self._dead
        if self._task is None or self._task.done():
            raise RuntimeError("the store writer is not running")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if run_lock and self._parallel > 1:
            self._locking.append(_Item(op, fut))
        else:
            (self._urgent if urgent or run_lock else self._normal).append(_Item(op, fut))
        self._ready.set()
        return fut

    async def close(self) -> None:
        """Commit what is queued (outages are still retried up to the budget), then stop the task."""
        if self._task is None:
            return
        self._closing = True
        self._ready.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def _lane(self, locking_running: bool) -> deque[_Item] | None:
        """The lane the next batch comes from: run-lock ops first (when none of theirs is committing),
        then urgent ops, then the rest; None when nothing can go now."""
        if self._locking and not locking_running:
            return self._locking
        return self._urgent or self._normal or None

    def _take(self, lane: deque[_Item], free: int) -> list[_Item]:
        # in parallel, what is queued is shared out over the free connections: on PostgreSQL a batch is
        # a chain of round trips, so one batch of everything would keep the others idle and its last op
        # waiting for all the others
        size = min(self._max_batch, -(-len(lane) // max(1, free)))
        batch = [lane.popleft() for _ in range(min(size, len(lane)))]
        if lane is self._urgent and self._riders:
            # SQLite: the other ops queued ride in the urgent batch (see the class docstring)
            normal = self._normal
            batch += [
                normal.popleft() for _ in range(min(self._riders, self._max_batch - len(batch), len(normal)))
            ]
        return batch

    async def _loop(self) -> None:
        # SQLite: one batch at a time (one writer). PostgreSQL: up to `parallel` batches commit at once
        # on their own connections (each batch is an independent unit of work), of which at most one
        # holds run-lock ops.
        parallel = self._parallel
        running: set[asyncio.Task[None]] = set()
        locking: set[asyncio.Task[None]] = set()

        def finished(t: asyncio.Task[None]) -> None:
            running.discard(t)
            locking.discard(t)
            self._ready.set()

        while True:
            self._ready.clear()
            while len(running) < parallel and (lane := self._lane(bool(locking))) is not None:
                if (
                    lane is self._urgent
                    and self.gather_s > 0
                    and len(lane) < self._gather_below
                    and (not self._riders or len(self._normal) < self._riders)
                    and not running
                    and not self._closing
                ):
                    await asyncio.sleep(self.gather_s)
                    lane = self._lane(bool(locking)) or lane
                # run-lock ops: all of them in the one batch that may hold the lock
                free = 1 if lane is self._locking else parallel - len(running)
                batch = self._take(lane, free)
                if parallel == 1:
                    await self._apply(batch)
                    continue
                task = asyncio.create_task(self._apply(batch))
                running.add(task)
                if lane is self._locking:
                    locking.add(task)
                task.add_done_callback(finished)
            if not running and self._lane(False) is None and self._closing:
                return
            if len(running) < parallel and self._lane(bool(locking)) is not None:
                continue
            await self._ready.wait()

    async def _apply(self, batch: list[_Item]) -> None:
        if self._dead is not None:
            for item in batch:
                _fail(item, self._dead)
            return
        try:
            results = await self._with_outage_retry([item.op for item in batch])
        except DatabaseUnavailable as dead:
            self._dead = dead
            for item in batch:
                _fail(item, dead)
            self._drain(dead)
            return
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch[0], exc)
                return
            # ops are replay-safe (pure functions of the transaction): run each alone to find the bad one
            self.stats.retried_alone += len(batch)
            for item in batch:
                try:
                    (result,) = await self._with_outage_retry([item.op])
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

    async def _with_outage_retry(self, ops: Sequence[Op[Any]]) -> list[Any]:
        started: float | None = None
        delay = 0.1
        while True:
            try:
                results = await self._backend.run_batch(ops)
            except DatabaseDown as down:
                now = time.monotonic()
                if started is None:
                    started = now
                    self.stats.outages += 1
                    self._hook("db.down", str(down))
                if now - started >= self.outage_timeout:
                    raise DatabaseUnavailable(
                        f"the job table is unreachable for {now - started:.0f}s: {down}"
                    ) from down
                await asyncio.sleep(min(delay, max(0.0, self.outage_timeout - (now - started))))
                delay = min(delay * 2, 5.0)
                continue
            if started is not None:
                self._hook("db.recovered", f"after {time.monotonic() - started:.1f}s")
            return results

    def _hook(self, event: str, cause: str) -> None:
        if self._on_outage is not None:
            with contextlib.suppress(Exception):
                self._on_outage(event, cause)

    def _drain(self, dead: DatabaseUnavailable) -> None:
        for lane in (self._locking, self._urgent, self._normal):
            while lane:
                _fail(lane.popleft(), dead)


def _fail(item: _Item, exc: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(exc)
