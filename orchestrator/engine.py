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
from typing import Any

from orchestrator.errors import EXIT_STOPPED
from orchestrator.runtime import Runtime
from orchestrator.schedule.dispatch import Confirm, Start, Stop, WaitUntil
from orchestrator.states import JobStatus, RunStatus
from orchestrator.steps.reconcile import run_reconcile
from orchestrator.steps.track import run_track
from orchestrator.steps.upgrade import run_upgrade
from orchestrator.store import DatabaseUnavailable, JobRow

ERROR_BACKOFF_S = 10.0  # an unexpected error on a job: look at it again after this long
# Idle, the feeder looks at the job table again after at most this long: other processes' moves, an
# operator's re-queue and the window's boundaries are noticed by this tick (its own workers wake it at once).
IDLE_S = 1.0
# The stop reason of a process whose registration another process closed (it presumed this one dead after
# a stall): the run goes on there, so this one must not mark it.
TAKEN_OVER = "this process's registration was taken over by another process"
PRUNE_EVERY_S = 60.0
WAITING_LOG_EVERY_S = 60.0  # waiting for a window or a wave's pause: one log line a minute

Confirmer = Callable[[Confirm], Awaitable[bool | None]]
"""Asks an operator about a wave: True yes, False no, None nobody can be asked (not a terminal)."""


@dataclass(frozen=True, slots=True)
class EngineResult:
    """How ``Engine.run`` ended: whether the run has no active job left and, when a stop was requested,
    its reason, the exit code it asks for (``orchestrator.errors``) and the run status to record."""

    finished: bool  # no job of the run is active any more
    stop_reason: str | None
    exit_code: int | None  # set when the run was stopped
    run_status: str | None = None  # the run status the stop asks for (paused, halted, stopped)


class Engine:
    """The run loop of one process on one run (see the module docstring): a feeder that claims due jobs,
    ``2 * concurrency`` workers that hand each job to its step, and a heartbeat. ``confirm`` asks the
    operator before a wave when ``--confirm`` is set (only the runner asks; workers wait for it)."""

    def __init__(self, rt: Runtime, *, confirm: Confirmer | None = None, idle_s: float = IDLE_S) -> None:
        """``idle_s``: the feeder's idle tick (seconds; tests of long windows on virtual time raise it)."""
        self.rt = rt
        self._confirm = confirm
        self._idle_s = idle_s
        n = rt.options.concurrency
        # claimed jobs wait here for a free worker: up to one more pool's worth, so a claim (a commit)
        # brings a batch of work instead of one job each time a worker frees up
        self._queue: asyncio.Queue[JobRow | None] = asyncio.Queue(maxsize=4 * n)
        self._wake = asyncio.Event()
        self._busy = 0  # jobs claimed by the feeder and still queued or in a worker
        self._room_wait = False  # the feeder waits for room in the queue (see _room_changed)
        self._db_down: DatabaseUnavailable | None = None
        self._marked_wave = 0  # the last wave this process recorded as finished
        self._waiting_logged: tuple[str, float] | None = None  # (reason, monotonic time) of the last line
        rt.on_commit = self._commit_done

    async def run(self) -> EngineResult:
        """Work on the run until no job of it is active or a stop is requested (a signal, the run-wide
        controls, refused credentials, this process's registration taken over, or the job table down for
        longer than ``--db-outage-timeout``: ``DatabaseUnavailable`` becomes a stop with exit 3).

        On the way out it waits up to ``drain_timeout`` seconds for the workers' calls, then up to
        ``max(drain_timeout, db_outage_timeout)`` for answers still being committed, and gives back the
        claims of jobs queued but never started. Any other error of the feeder propagates after that
        clean-up; a worker's error is logged (``job.error``) and its job looked at again later."""
        rt = self.rt
        # twice as many workers as call slots (Runtime.permit caps calls in flight at --concurrency): a
        # worker records its job's intent while the others' calls are in flight, so a commit's latency
        # never leaves a call slot idle
        n = 2 * rt.options.concurrency
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
            if rt.tails:  # answers still being committed: they are never abandoned while the table works
                await asyncio.wait(
                    set(rt.tails), timeout=max(rt.options.drain_timeout, rt.options.db_outage_timeout)
                )
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
            # cleared before the job table is read, never just before a wait: a worker's or a commit's
            # wake-up that lands while this loop awaits the table (a claim, next_due) must end the wait
            # that follows, or the feeder sleeps its whole tick with a job due (a reconcile started a
            # second late, and its first listing of the cloud's jobs came after the settle time)
            self._wake.clear()
            decision = await self._controls()
            if rt.stop_requested.is_set():
                break
            allow_new = isinstance(decision, Start) and (rt.controls is None or rt.controls.allow_new)
            # jobs held (queued or in a worker) stay under two pools' worth; claim again once less than
            # half a pool's worth waits in the queue, so a claim takes at least half a pool: each claim
            # walks past the pending siblings of busy instances once, and fewer, larger claims walk it
            # less often (measured at 10,000 proxies, 0 ms: 86 claims instead of 162, their CPU 0.40 s
            # instead of 0.66 s)
            free = 4 * rt.options.concurrency - self._busy
            if free <= 0 or self._queue.qsize() >= rt.options.concurrency:
                # enough work is queued: wait until a worker takes some (no database round trip)
                await self._wait_for_room()
                continue
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
            # answers still committing: their jobs are active until then, and each wakes the feeder
            if self._busy == 0 and not rt.tails and await rt.store.active_count(rt.run_id, track=track) == 0:
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
        fresh = ctl.stale or ctl.decision is None
        if fresh:
            t0 = rt.mono()
            read = await rt.store.run_state(rt.run_id, track=rt.options.wait)
            ctl.update(read, read_s=rt.mono() - t0)
        decision = ctl.decision
        state = ctl.state
        assert state is not None
        if (
            fresh
            and state.open_unfinished == 0
            and state.total > 0
            and state.waves > state.run.wave_open
            and self._marked_wave != state.run.wave_open
        ):
            await rt.store.mark_wave_done(rt.run_id, state.run.wave_open)
            self._marked_wave = state.run.wave_open
            # --pause-between counts from that mark: decide again on a state that has it (the one read
            # before knew no end of this wave, and the next wave opened at once)
            ctl.update(await rt.store.run_state(rt.run_id, track=rt.options.wait))
            decision = ctl.decision
            state = ctl.state
            assert state is not None
        if isinstance(decision, Stop) and not decision.new_upgrades_only:
            rt.request_stop(decision.reason, decision.exit_code, decision.run_status.value)
            return decision
        if isinstance(decision, Confirm):
            answer = None if self._confirm is None or rt.role != "runner" else await self._confirm(decision)
            if answer is None and rt.role != "runner":
                if state.run.status is not RunStatus.HALTED:
                    return decision  # workers wait for the runner to open the wave
                # the runner could not ask (off a terminal) and stopped the run: nobody will open it
                stop = decision.declined()
                rt.request_stop(stop.reason, stop.exit_code, stop.run_status.value)
                return stop
            if answer:
                if await rt.store.open_wave(
                    rt.run_id, frm=state.run.wave_open, to=decision.wave, reason="confirmed by the operator"
                ):
                    rt.events.emit("wave.opened", wave=decision.wave, size=decision.size)
                ctl.update(await rt.store.run_state(rt.run_id, track=rt.options.wait))
                return ctl.decision
            stop = decision.declined()
            rt.request_stop(stop.reason, stop.exit_code, stop.run_status.value)
            return stop
        if isinstance(decision, Start) and decision.opens and decision.open_wave > state.run.wave_open:
            if await rt.store.open_wave(
                rt.run_id, frm=state.run.wave_open, to=decision.open_wave, reason="the previous wave finished"
            ):
                rt.events.emit("wave.opened", wave=decision.open_wave)
            ctl.update(await rt.store.run_state(rt.run_id, track=rt.options.wait))
            return ctl.decision
        return decision

    async def _woken(self, within_s: float) -> None:
        """Wait until a worker wakes the feeder (``_wake``, cleared at the top of the feeder's loop: a
        wake-up since then returns at once), a stop is requested, or ``within_s`` seconds pass."""
        waiters = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self.rt.stop_requested.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _wait_for_room(self) -> None:
        # no later than the run-wide controls go stale: the feeder reads them (stops, pauses, waves), and
        # a full queue no longer wakes it for every job taken
        ctl = self.rt.controls
        self._room_wait = True
        try:
            await self._woken(1.0 if ctl is None else min(1.0, ctl.stale_in()))
        finally:
            self._room_wait = False

    async def _idle(self, track: bool, decision: object) -> None:
        rt = self.rt
        delay = self._idle_s
        nd = await rt.store.next_due(rt.run_id, track=track)
        now = rt.now()
        # a job already due was just offered to the claim (or every worker is busy): what holds it (the
        # availability guard, a closed wave, the controls) changes when a job ends (the wake event) or on
        # the tick, so waiting 20 ms for it again would only spin on the job table
        if nd is not None and nd > now:
            delay = min(delay, max(0.02, (nd - now).total_seconds()))
        if isinstance(decision, WaitUntil):
            left = (decision.at - rt.now()).total_seconds()
            last = self._waiting_logged
            if last is None or last[0] != decision.reason or rt.mono() - last[1] >= WAITING_LOG_EVERY_S:
                self._waiting_logged = (decision.reason, rt.mono())
                rt.events.emit(
                    "run.waiting",
                    until=decision.at.isoformat(),
                    reason=decision.reason,
                    left_s=round(max(0.0, left)),
                )
            delay = min(delay, max(0.02, left))
        await self._woken(delay)

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
                rt.request_stop(TAKEN_OVER, EXIT_STOPPED)
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
            self._room_changed()
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
                        job,
                        worker_id=rt.worker_id,
                        due=rt.after(ERROR_BACKOFF_S),
                        reason=f"error: {exc!r}"[:300],
                    )
            finally:
                rt.lease.dropped(job.id)
                self._busy -= 1
                self._room_changed()

    def _room_changed(self) -> None:
        """A job left the queue or ended: wake the feeder, unless it waits for room in the queue and a
        pool's worth is still queued (it would only look and wait again: at 100 ms of latency that was
        a wake, two tasks and a timer per call, for one claim per half a pool)."""
        if self._room_wait and self._queue.qsize() >= self.rt.options.concurrency:
            return
        self._wake.set()

    def _commit_done(self, commit: asyncio.Future[Any]) -> None:
        """``Runtime.on_commit``: an answer's write (``Runtime.defer``) is done; its job may be claimable
        again or the run finished, and its error is reported (an outage stops the run)."""
        self._room_changed()
        if commit.cancelled():
            return
        exc = commit.exception()
        if isinstance(exc, DatabaseUnavailable):
            self._db_down = exc
            self.rt.request_stop(str(exc), EXIT_STOPPED)
        elif exc is not None:
            self.rt.events.emit("job.error", error=repr(exc))

    async def process(self, job: JobRow) -> None:
        """Hand ``job`` to its step. The upgrade step may leave its answer's commit pending
        (``Runtime.defer``): the engine hears of its end through ``Runtime.on_commit``."""
        if job.status in (JobStatus.PENDING, JobStatus.RETRY_WAIT):
            await run_upgrade(self.rt, job)
        elif job.status is JobStatus.UNKNOWN:
            await run_reconcile(self.rt, job)
        elif job.status is JobStatus.ACCEPTED:
            await run_track(self.rt, job)
        else:
            await self.rt.store.release(job.id, self.rt.worker_id)
