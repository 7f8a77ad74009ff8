"""The run loop: claim due jobs from the job table, hand each to its step, until the run is done.

The job table is the queue. A feeder claims small batches (never the whole fleet: memory stays flat
however large the inventory) into a queue no longer than the worker pool, and ``concurrency`` workers
take jobs from it. Each job goes to the step its status calls for:

    pending / retry_wait -> preflight (proxy-version) -> record intent -> upgrade call -> decide -> move
    unknown              -> reconcile (did the lost call start an upgrade?)     see reconcile.py
    accepted             -> track the workflows, then postflight                  see tracker.py

The engine never parses HTTP (cloud/), never writes SQL (store/) and never decides policy (policy/).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from orchestrator import preflight
from orchestrator.outcomes import Answered, HttpFailure, TransportFailure
from orchestrator.policy import Action, Decision, Stage, decide
from orchestrator.reconcile import reconcile
from orchestrator.runtime import Runtime
from orchestrator.states import JobStatus
from orchestrator.store import JobRow, NewWorkflow
from orchestrator.tracker import track

ERROR_BACKOFF_S = 10.0  # an unexpected error on a job: look at it again after this long


@dataclass(frozen=True, slots=True)
class EngineResult:
    finished: bool  # no job of the run is active any more
    stop_reason: str | None
    exit_code: int | None  # set when the run was stopped (3 signal/lost lock, 2 auth)


class Engine:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        n = rt.options.concurrency
        self._queue: asyncio.Queue[JobRow | None] = asyncio.Queue(maxsize=n)
        self._wake = asyncio.Event()
        self._busy = 0
        self._current: set[int] = set()

    async def run(self) -> EngineResult:
        rt = self.rt
        n = rt.options.concurrency
        workers = [asyncio.create_task(self._worker(), name=f"worker-{i}") for i in range(n)]
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        finished = False
        try:
            finished = await self._feed()
        finally:
            for _ in workers:
                await self._queue.put(None)
            done, pending = await asyncio.wait(workers, timeout=rt.options.drain_timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for t in done:
                if t.exception() is not None:
                    rt.events.emit("engine.worker_crashed", error=repr(t.exception()))
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            # jobs claimed but never started go back to the table for whoever resumes
            while not self._queue.empty():
                job = self._queue.get_nowait()
                if job is not None:
                    await rt.store.release(job.id, rt.worker_id)
        if rt.stop_requested.is_set():
            return EngineResult(finished, rt.stop_reason, rt.stop_exit_code)
        return EngineResult(finished, None, None)

    async def _feed(self) -> bool:
        """Claim jobs while workers are free. True when the run has no active job left."""
        rt = self.rt
        track = rt.options.wait
        while not rt.stop_requested.is_set():
            free = rt.options.concurrency - self._busy - self._queue.qsize()
            if free > 0:
                jobs = await rt.store.claim(
                    rt.run_id,
                    worker_id=rt.worker_id,
                    limit=free,
                    now=rt.now(),
                    lease_s=rt.options.lease,
                    track=track,
                )
                for job in jobs:
                    self._busy += 1  # counted before the queue hand-off so `free` never overshoots
                    await self._queue.put(job)
                if jobs:
                    continue
            if free > 0 and self._busy == 0 and await rt.store.active_count(rt.run_id, track=track) == 0:
                return True
            await self._idle(track)
        return False

    async def _idle(self, track: bool) -> None:
        rt = self.rt
        delay = 1.0
        nd = await rt.store.next_due(rt.run_id, track=track)
        if nd is not None:
            delay = min(delay, max(0.02, (nd - rt.now()).total_seconds()))
        self._wake.clear()
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(rt.stop_requested.wait())]
        await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()

    async def _heartbeat(self) -> None:
        rt = self.rt
        while True:
            await asyncio.sleep(rt.options.heartbeat)
            try:
                alive = await rt.store.heartbeat(rt.worker_id, rt.now(), rt.options.lease)
            except Exception as exc:  # the database may be briefly unreachable: keep trying
                rt.events.emit("worker.heartbeat_failed", error=type(exc).__name__)
                continue
            if not alive:
                rt.request_stop("this process's registration was taken over by another process", 3)
                return

    async def _worker(self) -> None:
        rt = self.rt
        while True:
            job = await self._queue.get()
            if job is None:
                return
            try:
                if not rt.stop_requested.is_set():
                    await self.process(job)
                else:
                    await rt.store.release(job.id, rt.worker_id)
            except Exception as exc:
                # A bug or a lost database must not kill the pool. The job keeps its status (an
                # in-flight one is reconciled once released, never blindly resent) and waits a while,
                # so a job that trips over the same error does not spin.
                rt.events.emit("job.error", job=job.id, proxy=job.proxy_id, error=repr(exc))
                with contextlib.suppress(Exception):
                    await rt.store.update_job_fields(
                        job.id, {"next_attempt_at": rt.after(ERROR_BACKOFF_S)}, rt.now()
                    )
                with contextlib.suppress(Exception):
                    await rt.store.release(job.id, rt.worker_id)
            finally:
                self._busy -= 1
                self._wake.set()

    async def process(self, job: JobRow) -> None:
        if job.status in (JobStatus.PENDING, JobStatus.RETRY_WAIT):
            await self._upgrade_step(job)
        elif job.status is JobStatus.UNKNOWN:
            await reconcile(self.rt, job)
        elif job.status is JobStatus.ACCEPTED:
            await track(self.rt, job)
        else:
            await self.rt.store.release(job.id, self.rt.worker_id)

    async def _upgrade_step(self, job: JobRow) -> None:
        rt = self.rt
        source = job.source_version
        if rt.options.preflight and (job.status is JobStatus.PENDING or job.current_version is None):
            verdict = await self._preflight(job)
            if verdict is None:
                return
            source = verdict
        if source is None:
            # --no-preflight and no source_version: there is nothing safe to send
            await rt.apply(
                job,
                Decision(
                    Action.FLAG,
                    "no source_version in the inventory and preflight is off",
                    "default:no-source",
                    "give source_version in the inventory or run with preflight",
                ),
                frm=job.status,
            )
            return
        if rt.stop_requested.is_set():
            await rt.store.release(job.id, rt.worker_id)
            return
        # Intent first, then the permit, then the call at once: a commit's latency between permit and
        # send would let the cloud see calls bunched closer than the limiter spaced them.
        attempt_id = await rt.store.record_intent(job, worker_id=rt.worker_id, now=rt.now())
        if attempt_id is None:
            rt.events.emit("job.intent_lost", job=job.id, proxy=job.proxy_id)
            await rt.store.release(job.id, rt.worker_id)
            return
        number = job.attempt_count + 1
        async with rt.permit() as sent:
            if rt.stop_requested.is_set():
                await rt.store.cancel_intent(job.id, attempt_id, worker_id=rt.worker_id, now=rt.now())
                return
            sent_at = rt.now()
            rt.events.emit("upgrade.sent", job=job.id, proxy=job.proxy_id, attempt=number)
            outcome = await rt.client.upgrade(rt.ref(job), source, job.target_version, on_sent=sent)
        decision = decide(outcome, attempt=number, policy=rt.policy, rng=rt.rng, stage=Stage.UPGRADE)
        workflows: tuple[NewWorkflow, ...] = ()
        values: dict[str, object] = {"outcome": decision.action.value, "rule": decision.rule}
        if isinstance(outcome, Answered):
            workflows = tuple(
                NewWorkflow(
                    workflow_id=i.workflow_id,
                    state=i.state,
                    error_message=i.error_message,
                    instance_id=i.instance_id,
                )
                for i in outcome.items
            )
            values.update(http_status=outcome.http_status, request_id=outcome.request_id)
        elif isinstance(outcome, HttpFailure):
            values.update(
                http_status=outcome.http_status,
                error_code=outcome.error_code,
                error_msg=outcome.error_msg,
                request_id=outcome.request_id,
            )
        elif isinstance(outcome, TransportFailure):
            values.update(
                transport=outcome.kind.value,
                error_msg=outcome.detail,
                http_status=outcome.http_status,
                request_id=outcome.request_id,
            )
        # shield: Ctrl-C must not skip the write that records what the cloud answered
        values["sent_at"] = sent_at
        await asyncio.shield(self._record(job, attempt_id, decision, values, workflows))

    async def _record(
        self,
        job: JobRow,
        attempt_id: int,
        decision: Decision,
        values: dict[str, object],
        workflows: tuple[NewWorkflow, ...],
    ) -> None:
        rt = self.rt
        to, fields = rt.plan(decision)
        ok = await rt.store.record_answer(
            job_id=job.id,
            attempt_id=attempt_id,
            now=rt.now(),
            outcome=str(values.pop("outcome")),
            rule=decision.rule,
            http_status=_int(values.get("http_status")),
            error_code=_str(values.get("error_code")),
            error_msg=_str(values.get("error_msg")),
            request_id=_str(values.get("request_id")),
            transport=_str(values.get("transport")),
            sent_at=values.get("sent_at"),  # type: ignore[arg-type]
            workflows=workflows,
            move_to=to,
            job_fields=fields,
            worker_id=rt.worker_id,
        )
        rt.events.emit(
            f"job.{to.value}" if ok else "job.move_lost",
            job=job.id,
            proxy=job.proxy_id,
            reason=decision.reason,
            rule=decision.rule,
            workflows=[w.workflow_id for w in workflows],
        )

    async def _preflight(self, job: JobRow) -> str | None:
        """Read the proxy's version. Returns the source version to send, or None when the job was
        finished (skipped/flagged) or rescheduled here."""
        rt = self.rt
        async with rt.permit() as sent:
            info = await rt.client.proxy_version(rt.ref(job), on_sent=sent)
        if isinstance(info, HttpFailure | TransportFailure):
            decision = decide(
                info, attempt=job.read_failures + 1, policy=rt.policy, rng=rt.rng, stage=Stage.PREFLIGHT
            )
            await rt.apply(job, decision, frm=job.status, extra={"read_failures": job.read_failures + 1})
            return None
        facts = {
            "current_version": info.current_version,
            "latest_version": info.latest_version,
            "risk": info.risk or None,
            "read_failures": 0,
        }
        result = preflight.judge(info, source_version=job.source_version, target_version=job.target_version)
        rt.events.emit(
            "preflight.done",
            job=job.id,
            proxy=job.proxy_id,
            verdict=result.verdict.value,
            current=info.current_version,
        )
        if result.verdict is preflight.Verdict.UPGRADE:
            await rt.store.update_job_fields(job.id, facts, rt.now())
            return result.source_version
        action = Action.SKIP if result.verdict is preflight.Verdict.SKIP else Action.FLAG
        await rt.apply(
            job,
            Decision(action, result.reason, f"preflight:{result.verdict.value}", result.hint),
            frm=job.status,
            extra=facts,
        )
        return None


def _int(v: object) -> int | None:
    return v if isinstance(v, int) else None


def _str(v: object) -> str | None:
    return v if isinstance(v, str) else None
