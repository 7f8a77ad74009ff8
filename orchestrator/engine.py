"""The run loop: claim due jobs from the job table, hand each to its step, until the run is done.

The job table is the queue. A feeder claims small batches (never the whole fleet: memory stays flat
however large the inventory) into a queue no longer than the worker pool, and ``concurrency`` workers
take jobs from it. Each job goes to the step its status calls for:

    pending / retry_wait -> the upgrade step      steps/upgrade.py
    unknown              -> the reconcile step    steps/reconcile.py
    accepted             -> the track step        steps/track.py

Before claiming upgrades the feeder asks the run-wide controls (``schedule.dispatch``: the window, the
waves, the failure breaker): they only ever withhold NEW upgrades; reconcile and tracking of work already
sent go on. A heartbeat renews this process's lease and its claims' leases; the fence (``LeaseKeeper``)
keeps a job whose claim lapsed from being sent. A job table that goes away is waited for (the writer
retries) up to ``--db-outage-timeout``, then the run stops cleanly (exit 3).

The engine never parses HTTP (cloud/), never writes SQL (store/) and never decides policy (policy/).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from orchestrator.errors import EXIT_STOPPED
from orchestrator.runtime import Runtime
from orchestrator.schedule.dispatch import Confirm, Start, Stop, WaitUntil
from orchestrator.states import JobStatus
from orchestrator.steps.reconcile import run_reconcile
from orchestrator.steps.track import run_track
from orchestrator.steps.upgrade import run_upgrade
from orchestrator.store import DatabaseUnavailable, JobRow

ERROR_BACKOFF_S = 10.0  # an unexpected error on a job: look at it again after this long
PRUNE_EVERY_S = 60.0

Confirmer = Callable[[Confirm], Awaitable[bool | None]]
"""Asks an operator about a wave: True yes, False no, None nobody can be asked (not a terminal)."""


@dataclass(frozen=True, slots=True)
class EngineResult:
    finished: bool  # no job of the run is active any more
    stop_reason: str | None
    exit_code: int | None  # set when the run was stopped
    run_status: str | None = None  # the run status the stop asks for (paused, halted, stopped)


class Engine:
    def __init__(self, rt: Runtime, *, confirm: Confirmer | None = None) -> None:
        self.rt = rt
        self._confirm = confirm
        n = rt.options.concurrency
        self._queue: asyncio.Queue[JobRow | None] = asyncio.Queue(maxsize=n)
        self._wake = asyncio.Event()
        self._busy = 0
        self._db_down: DatabaseUnavailable | None = None

    async def run(self) -> EngineResult:
        rt = self.rt
        n = rt.options.concurrency
        workers = [asyncio.create_task(self._worker(), name=f"worker-{i}") for i in range(n)]
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        finished = False
        try:
            finished = await self._feed()
        except DatabaseUnavailable as exc:
            self._db_down = exc
            rt.request_stop(str(exc), EXIT_STOPPED)
        finally:
            for _ in workers:
                with contextlib.suppress(asyncio.QueueFull):
                    self._queue.put_nowait(None)
            done, pending = await asyncio.wait(workers, timeout=rt.options.drain_timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for t in done:
                crashed = t.exception()
                if crashed is not None:
                    rt.events.emit("engine.worker_crashed", error=repr(crashed))
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await heartbeat
            # jobs claimed but never started go back to the table for whoever resumes
            while not self._queue.empty():
                job = self._queue.get_nowait()
                if job is not None:
                    with contextlib.suppress(Exception):
                        await rt.store.release(job.id, rt.worker_id)
        if rt.stop_requested.is_set():
            return EngineResult(finished, rt.stop_reason, rt.stop_exit_code, rt.stop_run_status)
        return EngineResult(finished, None, None)

    # ------------------------------------------------------------------------------------- feeder
    async def _feed(self) -> bool:
        """Claim jobs while workers are free. True when the run has no active job left."""
        rt = self.rt
        track = rt.options.wait
        while not rt.stop_requested.is_set():
            decision = await self._controls()
            if rt.stop_requested.is_set():
                break
            allow_new = isinstance(decision, Start)
            free = rt.options.concurrency - self._busy - self._queue.qsize()
            if free > 0:
                submitted = rt.mono()
                claimed = await rt.store.claim(
                    rt.run_id,
                    worker_id=rt.worker_id,
                    limit=free,
                    lease_s=rt.options.lease,
                    track=track,
                    allow_new=allow_new,
                    open_wave=rt.controls.open_wave if rt.controls else 1_000_000,
                    per_instance=rt.options.per_instance,
                )
                rt.lease.claimed((j.id for j in claimed.jobs), submitted)
                for job in claimed.jobs:
                    self._busy += 1  # counted before the queue hand-off so `free` never overshoots
                    await self._queue.put(job)
                if claimed.jobs:
                    continue
            if free > 0 and self._busy == 0 and await rt.store.active_count(rt.run_id, track=track) == 0:
                return True
            await self._idle(track, decision)
        return False

    async def _controls(self) -> object:
        """The run-wide controls' answer (read at most once a second); acts on stops, wave openings and
        confirmations. Returns the dispatch decision in force."""
        rt = self.rt
        ctl = rt.controls
        if ctl is None:
            return Start(1_000_000)
        if ctl.stale or ctl.decision is None:
            ctl.update(await rt.store.run_state(rt.run_id))
        decision = ctl.decision
        state = ctl.state
        assert state is not None
        if state.open_unfinished == 0 and state.total > 0 and state.waves > state.run.wave_open:
            await rt.store.mark_wave_done(rt.run_id, state.run.wave_open)
            if state.last_wave_finished_at is None:
                # read before the wave's end was recorded (here or by another process): decided on that
                # read, the next wave would open at once, without its --pause-between
                ctl.update(await rt.store.run_state(rt.run_id))
                decision, state = ctl.decision, ctl.state
                assert state is not None
        if isinstance(decision, Stop) and not decision.new_upgrades_only:
            rt.request_stop(decision.reason, decision.exit_code, decision.run_status.value)
            return decision
        if isinstance(decision, Confirm):
            answer = None if self._confirm is None or rt.role != "runner" else await self._confirm(decision)
            if answer is None and rt.role != "runner":
                return decision  # workers wait for the runner to open the wave
            if answer:
                if await rt.store.open_wave(
                    rt.run_id, frm=state.run.wave_open, to=decision.wave, reason="confirmed by the operator"
                ):
                    rt.events.emit("wave.opened", wave=decision.wave, size=decision.size)
                ctl.update(await rt.store.run_state(rt.run_id))
                return ctl.decision
            stop = decision.declined()
            rt.request_stop(stop.reason, stop.exit_code, stop.run_status.value)
            return stop
        if isinstance(decision, Start) and decision.opens and decision.open_wave > state.run.wave_open:
            if await rt.store.open_wave(
                rt.run_id, frm=state.run.wave_open, to=decision.open_wave, reason="the previous wave finished"
            ):
                rt.events.emit("wave.opened", wave=decision.open_wave)
            ctl.update(await rt.store.run_state(rt.run_id))
            return ctl.decision
        return decision

    async def _idle(self, track: bool, decision: object) -> None:
        rt = self.rt
        delay = 1.0
        nd = await rt.store.next_due(rt.run_id, track=track)
        if nd is not None:
            delay = min(delay, max(0.02, (nd - rt.now()).total_seconds()))
        if isinstance(decision, WaitUntil):
            rt.events.emit("run.waiting", until=decision.at.isoformat(), reason=decision.reason)
            delay = min(delay, max(0.02, (decision.at - _now_utc()).total_seconds()))
        self._wake.clear()
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(rt.stop_requested.wait())]
        await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()

    # ---------------------------------------------------------------------------------- heartbeat
    async def _heartbeat(self) -> None:
        rt = self.rt
        since_prune = 0.0
        while True:
            await asyncio.sleep(rt.options.heartbeat)
            submitted = rt.mono()
            try:
                alive, renewed, _db_now = await rt.store.heartbeat(rt.worker_id, rt.options.lease)
            except DatabaseUnavailable as exc:
                self._db_down = exc
                rt.request_stop(str(exc), EXIT_STOPPED)
                return
            except Exception as exc:  # a passing failure: the fence stops sends if it lasts
                rt.events.emit("worker.heartbeat_failed", error=type(exc).__name__)
                continue
            if not alive:
                rt.request_stop("this process's registration was taken over by another process", EXIT_STOPPED)
                return
            rt.lease.renewed(renewed, submitted)
            since_prune += rt.options.heartbeat
            if rt.gate is not None and since_prune >= PRUNE_EVERY_S:
                since_prune = 0.0
                with contextlib.suppress(Exception):
                    await rt.store.prune_send_log(rt.run_id, keep_s=max(PRUNE_EVERY_S, 3 * rt.options.lease))

    # ------------------------------------------------------------------------------------ workers
    async def _worker(self) -> None:
        rt = self.rt
        while True:
            job = await self._queue.get()
            if job is None:
                return
            try:
                if rt.stop_requested.is_set():
                    await rt.store.release(job.id, rt.worker_id)
                else:
                    await self.process(job)
            except DatabaseUnavailable as exc:
                self._db_down = exc
                rt.request_stop(str(exc), EXIT_STOPPED)
            except Exception as exc:
                # A bug must not kill the pool. The job keeps its status (an in-flight one is reconciled
                # once released, never blindly resent) and waits a while, so it does not spin.
                rt.events.emit("job.error", job=job.id, proxy=job.proxy_id, error=repr(exc))
                with contextlib.suppress(Exception):
                    await rt.store.reschedule(
                        job, worker_id=rt.worker_id, due=rt.after(ERROR_BACKOFF_S), reason=f"error: {exc!r}"[:300]
                    )
            finally:
                rt.lease.dropped(job.id)
                self._busy -= 1
                self._wake.set()

    async def process(self, job: JobRow) -> None:
        if job.status in (JobStatus.PENDING, JobStatus.RETRY_WAIT):
            await run_upgrade(self.rt, job)
        elif job.status is JobStatus.UNKNOWN:
            await run_reconcile(self.rt, job)
        elif job.status is JobStatus.ACCEPTED:
            await run_track(self.rt, job)
        else:
            await self.rt.store.release(job.id, self.rt.worker_id)


def _now_utc() -> datetime:
    from datetime import UTC

    return datetime.now(UTC)
