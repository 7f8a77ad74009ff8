"""What every step of a run shares: the store, the cloud client, the limiter, the policy and the clock.

The engine, the reconciler and the tracker each take one ``Runtime`` instead of seven arguments, and the
one place that turns a policy ``Decision`` into a job move lives here, so the three steps cannot drift
apart in how they schedule a retry or word a flag.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from orchestrator.cloud.client import CloudClient, ProxyRef
from orchestrator.limiter import Limiter
from orchestrator.options import RunOptions
from orchestrator.policy import Action, Decision, Policy
from orchestrator.states import JobStatus
from orchestrator.store import JobRow, JobStore, NewWorkflow

ACTION_STATUS: dict[Action, JobStatus] = {
    Action.ACCEPTED: JobStatus.ACCEPTED,
    Action.RETRY: JobStatus.RETRY_WAIT,
    Action.FLAG: JobStatus.FLAGGED,
    Action.FAIL: JobStatus.FAILED,
    Action.SKIP: JobStatus.SKIPPED,
    Action.RECONCILE: JobStatus.UNKNOWN,
    # the job itself did nothing wrong: it stays resendable for the resume after the credential is fixed
    Action.STOP_RUN: JobStatus.RETRY_WAIT,
}


class Events(Protocol):
    """Observability hook: stable event names (``upgrade.accepted``) with fields, for logs and progress."""

    def emit(self, event: str, **fields: Any) -> None: ...


class NullEvents:
    def emit(self, event: str, **fields: Any) -> None:
        return None


class SendGate(Protocol):
    """Run-wide send permits (rate and concurrency shared by every worker of a run on PostgreSQL)."""

    def slot(self) -> Any: ...


@dataclass
class Runtime:
    store: JobStore
    client: CloudClient
    limiter: Limiter
    policy: Policy
    options: RunOptions
    run_id: int
    worker_id: str
    events: Events = field(default_factory=NullEvents)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    rng: random.Random = field(default_factory=random.Random)
    gate: SendGate | None = None
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: str | None = None
    stop_exit_code: int = 3

    def now(self) -> datetime:
        return self.clock()

    def request_stop(self, reason: str, exit_code: int = 3) -> None:
        if not self.stop_requested.is_set():
            self.stop_reason = reason
            self.stop_exit_code = exit_code
            self.stop_requested.set()

    @asynccontextmanager
    async def permit(self) -> AsyncIterator[Callable[[], None] | None]:
        """One call's start permit: the process's limiter (which also carries the run's throttle
        slowdown) and, when several workers share the run, the run-wide gate. Yields the hook the cloud
        client calls when the request really leaves, so the window is kept on send times."""
        start = await self.limiter.acquire()
        on_sent = start.sent if start is not None else None
        if self.gate is not None:
            async with self.gate.slot():
                yield on_sent
            return
        yield on_sent

    def ref(self, job: JobRow) -> ProxyRef:
        return ProxyRef(
            project_id=job.project_id,
            instance_id=job.instance_id,
            proxy_id=job.proxy_id,
            endpoint=self.options.endpoint_override or job.endpoint,
            region=job.region,
            x_language=job.x_language,
        )

    def after(self, seconds: float) -> datetime:
        return self.now() + timedelta(seconds=max(0.0, seconds))

    def note_throttle(self, decision: Decision) -> None:
        if decision.throttle:
            self.limiter.throttled(decision.retry_after)
            self.events.emit("run.throttled", retry_after=decision.retry_after)

    def plan(self, decision: Decision) -> tuple[JobStatus, dict[str, Any]]:
        """The status and job fields a decision asks for; run-wide effects (throttle, stop) happen here
        so every step that decides also slows or stops the run the same way."""
        to = ACTION_STATUS[decision.action]
        fields: dict[str, Any] = {
            "reason": decision.reason,
            "hint": decision.hint,
            "rule": decision.rule,
            "next_attempt_at": None,
        }
        if decision.action is Action.RETRY:
            fields["next_attempt_at"] = self.after(decision.delay or 0.0)
        elif decision.action in (Action.RECONCILE, Action.STOP_RUN):
            fields["next_attempt_at"] = self.now()
        elif decision.action is Action.ACCEPTED:
            fields.update(reason=None, hint=None, next_attempt_at=self.after(self.options.poll_initial))
        self.note_throttle(decision)
        if decision.action is Action.STOP_RUN:
            self.request_stop(f"{decision.reason}. {decision.hint or ''}".strip(), exit_code=2)
        return to, fields

    async def apply(
        self,
        job: JobRow,
        decision: Decision,
        *,
        frm: JobStatus,
        extra: dict[str, Any] | None = None,
        workflows: tuple[NewWorkflow, ...] = (),
        attempt_id: int | None = None,
        attempt_values: dict[str, Any] | None = None,
    ) -> JobStatus | None:
        """Move ``job`` as ``decision`` says (guarded on ``frm``). Returns the new status, or None if the
        guard lost (someone else moved the job first)."""
        to, fields = self.plan(decision)
        if extra:
            fields.update(extra)
        if to is frm:
            # a failed read before the upgrade of a retry_wait job: reschedule, no status move
            await self.store.update_job_fields(job.id, fields, self.now())
            await self.store.release(job.id, self.worker_id)
            ok = True
        else:
            ok = await self.store.move(
                job.id,
                frm=[frm],
                to=to,
                now=self.now(),
                fields=fields,
                release=self.worker_id,
                attempt_update=(attempt_id, attempt_values) if attempt_id and attempt_values else None,
                workflows=workflows,
                attempt_for_workflows=attempt_id,
            )
        self.events.emit(
            f"job.{to.value}" if ok else "job.move_lost",
            job=job.id,
            proxy=job.proxy_id,
            reason=decision.reason,
            rule=decision.rule,
        )
        return to if ok else None
