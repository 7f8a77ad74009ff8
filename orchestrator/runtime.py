"""What every step of a run shares (``Runtime``), the send fence (``LeaseKeeper``) and the run-wide controls
(``Controls``: window, waves, breaker), so the steps take one object instead of a dozen arguments.

The clock: ``Runtime.now()`` is the job table's clock (the PostgreSQL server's, estimated from every
commit; this host's on SQLite). Everything written for later comparison (due times, leases) uses it, so
hosts with drifting clocks agree. Matching cloud jobs uses the cloud's clock (``cloud.clock``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol, TypeVar

from orchestrator.cloud.api import CloudApi, ProxyRef
from orchestrator.limiter import Limiter
from orchestrator.options import RunOptions
from orchestrator.policy import Policy
from orchestrator.schedule.dispatch import Start
from orchestrator.store import JobRow, JobStore, RunState

Mono = Callable[[], float]
T = TypeVar("T")


class Events(Protocol):
    """Observability hook: stable event names (``job.flagged``, ``call``) with fields, feeding the log,
    the progress display and metrics alike."""

    def emit(self, event: str, **fields: Any) -> None:
        """Report ``event`` with its fields; must not raise and must not block (it is called on the hot
        path, between a call's answer and its record)."""
        ...


class NullEvents:
    """The ``Events`` hook that drops everything (when nothing listens)."""

    def emit(self, event: str, **fields: Any) -> None:
        """Drop the event."""
        return None


class SendGate(Protocol):
    """Run-wide send permits shared by every process of a run (PostgreSQL)."""

    def slot(self) -> Any:
        """An async context manager holding one run-wide permit while the call is in flight (entered
        before the request leaves, exited once its answer came back)."""
        ...

    async def close(self) -> None:
        """Release what is still held (best effort: permits left behind free themselves when their
        leases run out)."""
        ...


class LeaseKeeper:
    """The fence between "this process recorded an intent" and "this process sends": a job may be sent
    only while this process still holds its claim, proven on this process's own monotonic clock.

    A claim is good until ``lease_s`` after the moment its claim (or its last renewal) was *submitted*
    (before the database wrote it, so the local deadline is never later than the database's), minus
    ``margin_s`` for the time a send takes to leave after the check. Only renewals the database confirmed
    for that very job extend it: a claim that lapsed once (a SIGSTOP, a database outage) is void for good,
    even if the process goes on, because another process may have taken the job over meanwhile.
    Etcd's and Chubby's lease clients keep the same rule (docs/resume.md).

    Each claim gets a token: a call whose intent was recorded under one claim may leave only under that
    claim (``holds(job, token)``). The same process claiming the job again after a lapse (the takeover put
    it back) starts a new claim, and must not reopen the fence of a stale call still waiting for a permit.
    """

    def __init__(self, lease_s: float, *, margin_s: float | None = None, mono: Mono = time.monotonic) -> None:
        self.lease_s = lease_s
        self.margin_s = margin_s if margin_s is not None else max(1.0, 0.1 * lease_s)
        self._mono = mono
        self._until: dict[int, float] = {}
        self._token: dict[int, int] = {}
        self._next_token = 0

    def claimed(self, job_ids: Iterable[int], submitted: float) -> None:
        """These jobs were claimed by a transaction submitted at ``submitted`` (this process's monotonic
        clock, seconds): each is held until ``submitted + lease_s``."""
        for j in job_ids:
            self._until[j] = submitted + self.lease_s
            self._next_token += 1
            self._token[j] = self._next_token

    def renewed(self, job_ids: Iterable[int], submitted: float) -> None:
        """The database confirmed the renewal of these jobs' claims, submitted at ``submitted`` (monotonic
        seconds). Extends only claims still held now: one that lapsed stays void."""
        until = submitted + self.lease_s
        for j in job_ids:
            if j in self._until and self._mono() < self._until[j]:
                self._until[j] = max(self._until[j], until)

    def dropped(self, job_id: int) -> None:
        """This process let the job go (it moved on or was released): it may no longer be sent."""
        self._until.pop(job_id, None)
        self._token.pop(job_id, None)

    def token(self, job_id: int) -> int | None:
        """The job's current claim (None: not held)."""
        return self._token.get(job_id)

    def holds(self, job_id: int, token: int | None = None) -> bool:
        """Whether the job may be sent now: its claim (that very claim, given its ``token``) is held for
        more than ``margin_s`` seconds still."""
        until = self._until.get(job_id)
        if until is None or (token is not None and self._token.get(job_id) != token):
            return False
        return self._mono() < until - self.margin_s

    def remaining(self, job_id: int) -> float:
        """Seconds until the job's claim lapses here (negative once lapsed; -1.0 for a job not held)."""
        until = self._until.get(job_id)
        return -1.0 if until is None else until - self._mono()


@dataclass
class Runtime:
    """What the steps of one process's work on one run share: the job table, the cloud, the limiter, the
    policy, the run's stored options, the fence (``lease``), the run-wide controls and the stop request.
    ``role`` is ``runner`` (``run``/``resume``: the process that owns the run) or ``worker`` (an extra
    ``orchestrator worker`` process). ``gate`` is set on PostgreSQL. Built by
    ``orchestrator.app.runtime.build_runtime``."""

    store: JobStore
    cloud: CloudApi
    limiter: Limiter
    policy: Policy
    options: RunOptions
    run_id: int
    worker_id: str
    role: str = "runner"
    events: Events = field(default_factory=NullEvents)
    rng: random.Random = field(default_factory=random.Random)
    gate: SendGate | None = None
    lease: LeaseKeeper = field(default_factory=lambda: LeaseKeeper(30.0))
    controls: Controls | None = None
    metrics: Any = None  # orchestrator.metrics.Metrics when --metrics-* is given
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: str | None = None
    stop_exit_code: int = 3
    stop_run_status: str | None = None
    mono: Mono = time.monotonic
    tails: set[asyncio.Future[Any]] = field(default_factory=set)
    # called once each deferred write is done, after its own follow-up (the engine: wake the feeder, and
    # report the write's error or stop on an outage), even if the worker that deferred it was cancelled
    on_commit: Callable[[asyncio.Future[Any]], None] | None = None
    _tail_room: asyncio.Event = field(default_factory=asyncio.Event)
    _calls: asyncio.Semaphore | None = None

    def now(self) -> datetime:
        """The job table's clock (see the module docstring)."""
        return self.store.db_now()

    def after(self, seconds: float) -> datetime:
        """The job table's clock ``seconds`` from now (negative counts as 0): a due time to store."""
        return self.now() + timedelta(seconds=max(0.0, seconds))

    def request_stop(self, reason: str, exit_code: int = 3, run_status: str | None = None) -> None:
        """Stop dispatching new work; the first reason wins. ``exit_code`` is the command's (see
        ``orchestrator.errors``); ``run_status`` the run status to record, None for the default."""
        if not self.stop_requested.is_set():
            self.stop_reason = reason
            self.stop_exit_code = exit_code
            self.stop_run_status = run_status
            self.stop_requested.set()

    async def defer(
        self, commit: asyncio.Future[T], then: Callable[[asyncio.Future[T]], None] | None = None
    ) -> asyncio.Future[T]:
        """Track ``commit``, a write already queued (an answer and its move: ``moves.apply_answer``), and
        let the caller take its next job: the job itself moves on only once the write committed (it stays
        claimed until then), but the worker does not wait for the commit. Once it is done, ``then(commit)``
        runs (its error, a bug, becomes a ``job.error`` event), then ``on_commit(commit)``: one loop
        callback per write. Returns ``commit``. Waits while more than ``concurrency`` writes are pending
        (back-pressure on a slow job table: at most ``concurrency`` plus the workers waiting here); the
        write is queued and tracked before that wait, so a cancelled caller (Ctrl-C, the drain timeout)
        loses neither it nor the report of its outcome."""
        tails = self.tails
        tails.add(commit)
        commit.add_done_callback(partial(self._tail_ended, then))
        cap = max(1, self.options.concurrency)
        while len(tails) > cap and not commit.done():
            self._tail_room.clear()
            await self._tail_room.wait()
        return commit

    def _tail_ended(
        self, then: Callable[[asyncio.Future[Any]], None] | None, commit: asyncio.Future[Any]
    ) -> None:
        self.tails.discard(commit)
        self._tail_room.set()
        if then is not None:
            try:
                then(commit)
            except Exception as exc:  # a bug in a follow-up must not hide the write's outcome below
                self.events.emit("job.error", error=repr(exc))
        if self.on_commit is not None:
            self.on_commit(commit)

    def may_start_upgrades(self) -> bool:
        """No stop requested and the run-wide controls let new upgrades start (checked again just before
        each upgrade call leaves, with the fence)."""
        if self.stop_requested.is_set():
            return False
        return self.controls is None or self.controls.allow_new

    def send_fence(self, job: JobRow) -> Callable[[], bool]:
        """The ``may_send`` check of an upgrade call: this process still holds the job under the claim it
        holds now (take the fence before recording the intent) and new upgrades may still start. Called by
        the cloud client immediately before the request is written."""
        token = self.lease.token(job.id)

        def may_send() -> bool:
            ok = token is not None and self.lease.holds(job.id, token) and self.may_start_upgrades()
            if not ok:
                self.events.emit("upgrade.fenced", job=job.id, proxy=job.proxy_id)
            return ok

        return may_send

    def permit(self, route: str = "call") -> Permit:
        """One call's start permit, held until its answer: one of this process's ``concurrency`` call
        slots (the engine runs more workers than that, so the next calls' intents are recorded while
        these calls are in flight), this process's limiter (which also carries the throttle slowdown) and,
        on PostgreSQL (where several processes may share the run), the run-wide gate. An async context
        manager; it yields the hook the cloud client calls when the request really leaves (None when the
        limiter keeps no send times), so the limiter's window is kept on send times. Store errors of the
        gate propagate."""
        if self._calls is None:
            self._calls = asyncio.Semaphore(max(1, self.options.concurrency))
        return Permit(self, self._calls)

    def _waited(self, t0: float) -> None:
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.limiter_wait(self.mono() - t0)

    def ref(self, job: JobRow) -> ProxyRef:
        """The cloud address of the job's proxy (``--endpoint`` overrides the inventory's endpoint)."""
        return ProxyRef(
            project_id=job.project_id,
            instance_id=job.instance_id,
            proxy_id=job.proxy_id,
            endpoint=self.options.endpoint_override or job.endpoint,
            region=job.region,
            x_language=job.x_language,
        )

    def cloud_offset_s(self) -> float | None:
        """The cloud's clock minus the job table's, when measured (stored on each attempt for reconcile)."""
        off = self.cloud.clock.offset_s
        return None if off is None else off - self.store.db_offset_s


class Permit:
    """``Runtime.permit``'s context manager, written as a class: it is entered once per cloud call, and a
    generator-based ``asynccontextmanager`` cost a generator, a wrapper and their frames each time (about
    4% of the process's CPU at 100 ms of latency, measured with py-spy)."""

    __slots__ = ("_calls", "_gate_slot", "_rt")

    def __init__(self, rt: Runtime, calls: asyncio.Semaphore) -> None:
        self._rt = rt
        self._calls = calls
        self._gate_slot: Any = None

    async def __aenter__(self) -> Callable[[], None] | None:
        rt = self._rt
        t0 = rt.mono()
        await self._calls.acquire()
        try:
            start = await rt.limiter.acquire()
            if rt.gate is not None:
                slot = rt.gate.slot()
                await slot.__aenter__()
                self._gate_slot = slot
        except BaseException:
            self._calls.release()
            raise
        rt._waited(t0)
        return start.sent if start is not None else None

    async def __aexit__(self, *exc: object) -> None:
        slot, self._gate_slot = self._gate_slot, None
        try:
            if slot is not None:
                await slot.__aexit__(*exc)
        finally:
            self._calls.release()


class Controls:
    """The run-wide controls as this process sees them: the latest ``dispatch`` answer over the latest
    ``RunState`` (read at most every ``refresh_s`` seconds, or at once after a failure this process
    recorded, so the breaker stops the next send here without waiting for a read)."""

    def __init__(
        self,
        decide: Callable[[RunState, int], Any],
        *,
        refresh_s: float = 1.0,
        mono: Mono = time.monotonic,
        now: Callable[[], datetime] | None = None,
    ):
        self._decide = decide
        self._now = now
        self._base_refresh_s = refresh_s
        self.refresh_s = refresh_s
        self._mono = mono
        self.state: RunState | None = None
        self.decision: Any = None
        self._read_at = -1e9
        self._extra_failures = 0

    @property
    def stale(self) -> bool:
        """Whether ``refresh_s`` seconds (monotonic) have passed since the last read of the run."""
        return self._mono() - self._read_at >= self.refresh_s

    def stale_in(self) -> float:
        """Seconds until the last read of the run is stale (0 when it is)."""
        return max(0.0, self._read_at + self.refresh_s - self._mono())

    def update(self, state: RunState, *, read_s: float = 0.0) -> Any:
        """A fresh read of the run (``read_s``: how long it took: on a large run the next read waits at
        least 20 times that, so the controls never cost more than a few percent of the process)."""
        self.state = state
        self._read_at = self._mono()
        self.refresh_s = max(self._base_refresh_s, 20.0 * read_s)
        self._extra_failures = 0
        self.decision = self._decide(state, 0)
        return self.decision

    def note_failure(self) -> None:
        """A failure the breaker counts was just recorded here: decide again at once with it counted."""
        if self.state is None:
            return
        self._extra_failures += 1
        self.decision = self._decide(self.state, self._extra_failures)

    def db_now(self) -> datetime:
        """The job table's clock now (``now`` when given, else the last read's clock moved on by this
        process's monotonic clock)."""
        if self._now is not None:
            return self._now()
        assert self.state is not None
        return self.state.db_now + timedelta(seconds=self._mono() - self._read_at)

    @property
    def allow_new(self) -> bool:
        """Whether a new upgrade may start now: the decision in force is a ``Start`` whose ``until`` (the
        window's end minus the cutoff) has not passed, even if the next read is still a moment away."""
        if self.decision is None:
            return True
        if not isinstance(self.decision, Start):
            return False
        return self.decision.until is None or self.state is None or self.db_now() < self.decision.until

    @property
    def open_wave(self) -> int:
        """The highest wave whose upgrades may start: the decision's when it is a ``Start``, else the
        run's stored ``wave_open`` (1 before the first read)."""
        if isinstance(self.decision, Start):
            return self.decision.open_wave
        return self.state.run.wave_open if self.state is not None else 1
