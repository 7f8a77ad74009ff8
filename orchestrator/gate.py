"""One rate and one concurrency cap for a whole run, however many worker processes share it.

Each process's own limiter and worker pool only bound that process; with three workers on three hosts
the cloud would see three times the configured rate. On PostgreSQL every call therefore also takes a
run-wide permit from the job table (``send_log``): at most ``rate`` starts in any window of the period
and at most ``concurrency`` permits held at once. A permit is leased, so one held by a worker that died
frees itself when the lease runs out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from orchestrator.limiter import Rate
from orchestrator.store import JobStore

# Added to the window the permits are counted over (as the in-process limiter adds its margin): a permit
# is stamped before the commit and the send, and the jitter of those must not squeeze N+1 arrivals into
# one window as the cloud sees it. Also the least pause between two refused attempts.
SAFETY_S = 0.05
SAFETY_FRACTION = 0.05


class SharedGate:
    def __init__(
        self, store: JobStore, run_id: int, worker_id: str, rate: Rate, concurrency: int, *, lease_s: float
    ) -> None:
        self._store = store
        self._run_id = run_id
        self._worker_id = worker_id
        self._rate = rate
        self._cap = concurrency
        self._lease = lease_s

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        slot_id = await self._acquire()
        try:
            yield
        finally:
            await asyncio.shield(self._store.release_send_slot(slot_id))

    async def _acquire(self) -> int:
        # No process-wide lock: concurrent attempts of this process's workers ride in one group-commit
        # batch, serialised by the database's per-run advisory lock, instead of one round trip each.
        margin = max(SAFETY_S, SAFETY_FRACTION * self._rate.period)
        while True:
            slot_id, wait = await self._store.try_send_slot(
                self._run_id,
                worker_id=self._worker_id,
                count=self._rate.count,
                period=self._rate.period,
                cap=self._cap,
                lease_s=self._lease,
                margin=margin,
            )
            if slot_id is not None:
                return slot_id
            await asyncio.sleep(wait + margin)
