"""One rate and one concurrency cap for a whole run, however many worker processes share it.

Each process's own limiter and worker pool only bound that process; with three workers on three hosts
the cloud would see three times the configured rate. On PostgreSQL every call therefore also takes a
run-wide permit from the job table (``send_log``): at most ``rate`` starts in any window of the period
and at most ``concurrency`` permits held at once. A permit is leased, so one held by a worker that died
frees itself when the lease runs out.

Cost: one transaction serves every sender of this process waiting at that moment (permits are asked for
in bulk, as many as there are waiters, and used at once: none is kept in stock, so a permit's stamp is
its send time). Finished permits are marked done by the process's next ask, in its transaction, so a
place frees when that ask commits rather than a release commit later; what no ask takes within 20 ms is
released in a statement of its own. An ask never hands the places it frees straight back to its own
process: its cap check counts them as held, and every process sees them free once that ask commits. A
refused process waits the store's answer (the oldest start leaving the window, or 20 ms at the cap)
before its next ask, whichever of its senders asks, so the processes of a run waiting at the cap or the
window take turns.

Why the window holds at the cloud: the database stamps each permit when it grants it and counts stamps
over ``period + margin``, so sends that each leave within ``margin`` of their stamp never put more than
``rate`` calls in any period. A permit whose sender was held up (a stalled process, a starved event loop)
is therefore not used late: one not taken within ``FRESH_FRACTION`` of the margin of its request (the
stamp cannot be older than the request) is released unused and another is asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from orchestrator.limiter import Rate
from orchestrator.store import JobStore

# Added to the window the permits are counted over (as the in-process limiter adds its margin): a permit
# is stamped in the database's clock when granted, and the call leaves after that commit reaches its
# sender. How much later varies (a busy database, a busy host): measured at 200/s with five processes,
# 50 ms let 201 calls into one second at the server; 100 ms held it.
SAFETY_S = 0.1
SAFETY_FRACTION = 0.1
RELEASE_EVERY_S = 0.02
# How long ``close`` waits for asks whose senders were cancelled (the store may be retrying an outage).
CLOSE_WAIT_S = 5.0
# The part of the margin a permit may age between its request and its use; the rest is left for the path
# from here to the socket (the limiter hook, the send fence, the request's first write).
FRESH_FRACTION = 0.5


class SharedGate:
    """One process's door to the run-wide permits in ``send_log`` (built on PostgreSQL by
    ``app.runtime.build_runtime``; see the module docstring). ``rate`` and ``concurrency`` are the run's;
    ``lease_s`` (seconds) is how long a permit stays held if this process dies holding it."""

    def __init__(
        self,
        store: JobStore,
        run_id: int,
        worker_id: str,
        rate: Rate,
        concurrency: int,
        *,
        lease_s: float,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._run_id = run_id
        self._worker_id = worker_id
        self._rate = rate
        self._cap = concurrency
        self._lease = lease_s
        self._mono = mono
        self._granted: deque[tuple[int, float]] = deque()
        self.stale = 0
        """Permits released unused because their sender took them too late (a count, for tests and logs)."""
        self._waiting = 0
        self._fetch = asyncio.Lock()
        self._done: list[int] = []
        self._flusher: asyncio.Task[None] | None = None
        self._asks: set[asyncio.Future[tuple[list[int], float]]] = set()
        self._closed = False

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one run-wide permit for the body. Waits until the rate window and the concurrency cap
        allow one, asking the job table again after the wait it names (the oldest start leaving the
        window, or 20 ms while the cap is full) plus the safety margin. The release rides on this
        process's next ask, or is written on its own about 20 ms after the body ends if no ask came. Store
        errors while asking propagate (``DatabaseUnavailable`` once the outage budget is spent)."""
        slot_id = await self._acquire()
        try:
            yield
        finally:
            self._release(slot_id)

    async def _acquire(self) -> int:
        margin = max(SAFETY_S, SAFETY_FRACTION * self._rate.period)
        fresh_s = FRESH_FRACTION * margin
        self._waiting += 1
        try:
            while True:
                while self._granted:
                    slot_id, asked_at = self._granted.popleft()
                    if self._mono() - asked_at <= fresh_s:
                        return slot_id
                    # too late to send under it: it still counts as a start in the window (the safe side)
                    self.stale += 1
                    self._release(slot_id)
                wait = 0.0
                async with self._fetch:
                    if self._granted:
                        continue
                    asked_at = self._mono()
                    # the permits ended since the last write are marked done by this ask (committed with
                    # it), not by a release commit of their own later
                    ended, self._done = self._done, []
                    ask = asyncio.ensure_future(
                        self._store.try_send_slots(
                            self._run_id,
                            worker_id=self._worker_id,
                            count=self._rate.count,
                            period=self._rate.period,
                            cap=self._cap,
                            lease_s=self._lease,
                            margin=margin,
                            want=max(1, self._waiting),
                            release=ended,
                        )
                    )
                    self._asks.add(ask)
                    ask.add_done_callback(self._asks.discard)
                    try:
                        # shielded: once queued the ask commits whatever happens to this sender, and the
                        # permits it grants would stay held until their lease ran out if nobody took them
                        ids, wait = await asyncio.shield(ask)
                    except asyncio.CancelledError:
                        ask.add_done_callback(self._hand_back(ended, asked_at))
                        raise
                    except BaseException:
                        self._release(*ended)  # written by the next ask or the flusher
                        raise
                    self._granted.extend((i, asked_at) for i in ids)
                    if not ids:
                        # Retry exactly when the window frees (the store answers at least 1 ms, or 20 ms
                        # while the cap is reached), not later: a process whose own limiter releases its
                        # next call at that moment would otherwise win every permit and starve the run's
                        # other processes. Waited holding the ask's lock: one ask per answer per process,
                        # not one per waiting sender (each would be a transaction on the run's lock, and
                        # the next would get the places this ask just freed)
                        await asyncio.sleep(wait)
        finally:
            self._waiting -= 1

    def _hand_back(
        self, ended: list[int], asked_at: float
    ) -> Callable[[asyncio.Future[tuple[list[int], float]]], None]:
        """The done callback of an ask whose sender was cancelled. What it granted goes to this process's
        other waiting senders (the ask was for them too; the freshness check still applies), or is
        released unused when none waits (a start in the window all the same: the safe side). If the ask
        failed, the ended permits it carried are released again (marking a permit done twice is
        harmless: the first end is kept)."""

        def done(ask: asyncio.Future[tuple[list[int], float]]) -> None:
            if ask.cancelled() or ask.exception() is not None:
                self._release(*ended)
                return
            ids = ask.result()[0]
            if self._waiting > 0 and not self._closed:
                self._granted.extend((i, asked_at) for i in ids)
                return
            self._release(*ids)

        return done

    def _release(self, *slot_ids: int) -> None:
        if not slot_ids:
            return
        self._done.extend(slot_ids)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        # until nothing is left: a permit released while a write runs is written by the next round
        while True:
            await asyncio.sleep(RELEASE_EVERY_S)
            done, self._done = self._done, []
            if not done:
                return
            # shielded: a stop must not leave permits counted as held until their leases run out
            with contextlib.suppress(Exception):
                await asyncio.shield(self._store.release_send_slots(done))

    async def close(self) -> None:
        """Write the releases still pending, permits granted but never used included. Best effort: errors
        are swallowed (a permit not released frees itself when its lease runs out). Asks still in flight
        (their senders were cancelled) are waited for first, at most ``CLOSE_WAIT_S`` seconds and without
        cancelling them (the store commits a queued ask anyway), so what they grant is released too."""
        self._closed = True
        if self._asks:
            await asyncio.wait(set(self._asks), timeout=CLOSE_WAIT_S)
            await asyncio.sleep(0)  # their done callbacks (``_hand_back``) run before the releases below
        while self._granted:
            self._done.append(self._granted.popleft()[0])
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        if self._done:
            done, self._done = self._done, []
            with contextlib.suppress(Exception):
                await self._store.release_send_slots(done)
