"""Jobs: the queue. Claims, intents, answers and the one guarded move, plus the named field updates the
steps need (reschedule, preflight facts, workflow status) and the operator's re-queue.

Every status move is ``UPDATE ... WHERE id = :id AND status = :frm`` checked by row count (and, for a
process's own work, ``claimed_by`` = that process), so two processes can never both win the same move;
every move appends an event in the same transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orchestrator.store.events as events
from orchestrator.states import ACTIVE, TERMINAL, JobStatus, check_move
from orchestrator.store.decode import (
    ATTEMPT_COLS,
    JOB_COLS,
    WORKFLOW_COLS,
    attempt_row,
    job_row,
    workflow_row,
)
from orchestrator.store.rows import (
    MOVE_FIELDS,
    AttemptAnswer,
    AttemptRow,
    Claimed,
    Intent,
    JobRow,
    Move,
    NewWorkflow,
    WorkflowRow,
)
from orchestrator.store.sql import Tx, aware, in_clause, pipelined

# Claims and permits of one run are serialised on PostgreSQL by one advisory lock: under READ COMMITTED
# two claimers would each miss the other's uncommitted sibling claim (per-instance guard).
RUN_LOCK = 0x6F72_0000_0000
FINAL_WORKFLOW = ("Completed", "Failed", "Canceled", "Unauthorized")
_SENDABLE = (JobStatus.PENDING.value, JobStatus.RETRY_WAIT.value)


class UnknownProxies(ValueError):
    """``retry --proxy`` named proxies that are not in the run (nothing was changed)."""


@dataclass(frozen=True, slots=True)
class Requeued:
    """What ``retry`` did: jobs moved back to pending, and, among them, those with a workflow last seen
    running (proxy id, workflow id, last status seen, when it was seen): the upgrade step looks at that
    workflow again before anything is sent, and sends nothing while it runs."""

    moved: int
    running: list[tuple[str, str, str, datetime | None]]


def _move_values(tx: Tx, move: Move) -> tuple[str, dict[str, Any]]:
    sets = ["status = :to", "updated_at = :now"]
    params: dict[str, Any] = {}
    for key, value in move.fields.items():
        if key not in MOVE_FIELDS:
            raise ValueError(f"a move may not set jobs.{key}")
        if isinstance(value, datetime):
            value = tx.ts(value)
        elif key == "risk":
            value = tx.json(value)
        sets.append(f"{key} = :f_{key}")
        params[f"f_{key}"] = value
    if move.release:
        sets.append("claimed_by = NULL")
        sets.append("lease_expires_at = NULL")
    return ", ".join(sets), params


async def insert_workflows(
    tx: Tx, job_id: int, attempt_id: int | None, workflows: Sequence[NewWorkflow]
) -> None:
    """Insert one ``workflows`` row per item for the job (attached to ``attempt_id`` when given), created
    at the transaction's clock; nothing for an empty sequence."""
    if not workflows:
        return
    now = tx.ts(tx.now)
    await tx.executemany(
        "INSERT INTO workflows (job_id, attempt_id, workflow_id, instance_id, state, error_message, source,"
        " created_at) VALUES (:job, :att, :wid, :inst, :state, :msg, :src, :now)",
        [
            {
                "job": job_id,
                "att": attempt_id,
                "wid": w.workflow_id,
                "inst": w.instance_id,
                "state": w.state,
                "msg": w.error_message,
                "src": w.source,
                "now": now,
            }
            for w in workflows
        ],
    )


async def complete_attempt(tx: Tx, attempt_id: int, answer: AttemptAnswer) -> None:
    """Record how an attempt ended. When reconcile completes it later (``reconciled``/``lost`` with its
    rule) the first answer's facts (when it came, HTTP status, error, request id, transport failure) are
    kept: the audit keeps what the cloud answered. A ``not_sent`` attempt stays one, with its rule."""
    await tx.execute(
        "UPDATE attempts SET answered_at = COALESCE(answered_at, :now), sent_at = COALESCE(:sent, sent_at),"
        " outcome = CASE WHEN outcome = 'not_sent' THEN outcome ELSE :outcome END,"
        " http_status = COALESCE(http_status, :hs), error_code = COALESCE(error_code, :ec),"
        " error_msg = COALESCE(error_msg, :em), request_id = COALESCE(request_id, :rid),"
        " rule = CASE WHEN outcome = 'not_sent' THEN rule ELSE :rule END,"
        " transport = COALESCE(transport, :tr) WHERE id = :id",
        {
            "now": tx.ts(tx.now),
            "sent": tx.ts(answer.sent_at),
            "outcome": answer.outcome,
            "hs": answer.http_status,
            "ec": answer.error_code,
            "em": answer.error_msg,
            "rid": answer.request_id,
            "rule": answer.rule,
            "tr": answer.transport,
            "id": attempt_id,
        },
    )


def _answer_values(tx: Tx, answer: AttemptAnswer) -> dict[str, Any]:
    return {
        "sent": tx.ts(answer.sent_at),
        "outcome": answer.outcome,
        "hs": answer.http_status,
        "ec": answer.error_code,
        "em": answer.error_msg,
        "rid": answer.request_id,
        "rule": answer.rule,
        "tr": answer.transport,
    }


async def _answer_pg(
    tx: Tx,
    job: JobRow,
    attempt_id: int,
    answer: AttemptAnswer,
    move: Move,
    worker_id: str,
    workflows: Sequence[NewWorkflow],
) -> bool:
    """PostgreSQL: the attempt's answer, its workflows and the job's guarded move in one statement (one
    round trip); the attempt and its workflows are recorded whether or not the move wins, as on SQLite."""
    sets, params = _move_values(tx, move)
    n = await tx.fetchone(
        "WITH a AS (UPDATE attempts SET answered_at = :now, sent_at = COALESCE(:sent, sent_at),"
        " outcome = :outcome, http_status = :hs, error_code = :ec, error_msg = :em, request_id = :rid,"
        " rule = :rule, transport = :tr WHERE id = :aid RETURNING id),"
        " w AS (INSERT INTO workflows (job_id, attempt_id, workflow_id, instance_id, state, error_message,"
        " source, created_at) SELECT :id, :aid, x.wid, x.inst, x.state, x.msg, x.src, :now"
        " FROM unnest(:wids::text[], :insts::text[], :states::text[], :msgs::text[], :srcs::text[])"
        " AS x(wid, inst, state, msg, src) RETURNING 1),"
        f" j AS (UPDATE jobs SET {sets} WHERE id = :id AND status = :frm"
        " AND (claimed_by = :me OR claimed_by IS NULL) RETURNING id)"
        " SELECT CAST(:id AS bigint), (SELECT count(*) FROM j), (SELECT count(*) FROM a),"
        " (SELECT count(*) FROM w)",
        {
            **params,
            **_answer_values(tx, answer),
            "aid": attempt_id,
            "to": move.to.value,
            "now": tx.ts(tx.now),
            "id": job.id,
            "frm": move.frm.value,
            "me": worker_id,
            "wids": [w.workflow_id for w in workflows],
            "insts": [w.instance_id for w in workflows],
            "states": [w.state for w in workflows],
            "msgs": [w.error_message for w in workflows],
            "srcs": [w.source for w in workflows],
        },
    )
    if not n or int(n[1]) != 1:
        return False
    await events.append(
        tx,
        run_id=job.run_id,
        job_id=job.id,
        kind="move",
        from_status=move.frm.value,
        to_status=move.to.value,
        rule=move.fields.get("rule"),
        reason=move.event_reason or move.fields.get("reason"),
    )
    return True


async def apply_move(tx: Tx, job: JobRow, move: Move, worker_id: str | None) -> bool:
    """The one guarded move (see the module docstring); returns whether it won."""
    check_move(move.frm, move.to)
    sets, params = _move_values(tx, move)
    guard = ""
    if worker_id is not None:
        guard = " AND (claimed_by = :me OR claimed_by IS NULL)"
        params["me"] = worker_id
    n = await tx.execute(
        f"UPDATE jobs SET {sets} WHERE id = :id AND status = :frm{guard}",
        {**params, "to": move.to.value, "now": tx.ts(tx.now), "id": job.id, "frm": move.frm.value},
    )
    if n != 1:
        return False
    if move.attempt_id is not None and move.attempt_answer is not None:
        await complete_attempt(tx, move.attempt_id, move.attempt_answer)
    await insert_workflows(tx, job.id, move.attempt_id, move.workflows)
    await events.append(
        tx,
        run_id=job.run_id,
        job_id=job.id,
        kind="move",
        from_status=move.frm.value,
        to_status=move.to.value,
        rule=move.fields.get("rule"),
        reason=move.event_reason or move.fields.get("reason"),
    )
    return True


class JobOps:
    """Mixin of ``JobStore``: the queue."""

    async def _submit(
        self, op: Any, *, urgent: bool = False, run_lock: bool = False
    ) -> Any:  # provided by JobStore
        raise NotImplementedError

    def _submit_soon(
        self, op: Any, *, urgent: bool = False, run_lock: bool = False
    ) -> asyncio.Future[Any]:  # provided by JobStore
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- claims
    async def claim(
        self,
        run_id: int,
        *,
        worker_id: str,
        limit: int,
        lease_s: float,
        track: bool,
        allow_new: bool = True,
        open_wave: int = 1_000_000,
        per_instance: int = 1,
    ) -> Claimed:
        """Claim up to ``limit`` due jobs for ``worker_id`` (leased ``lease_s`` seconds, database clock).

        Order: lost answers and running workflows first (their timing matters), then due retries, then
        pending jobs of open waves in inventory order. Upgrades (pending/retry_wait) are claimed only when
        ``allow_new`` (the window is open and the breaker has not tripped), and only while fewer than
        ``per_instance`` proxies of the instance are being upgraded (from the call until the workflow
        ends when tracking). In-flight jobs whose holder is gone (lease expired or released) become
        ``unknown`` first, keeping the holder's last lease as the intent's send deadline."""
        S = JobStatus

        async def op(tx: Tx) -> Claimed:
            now = tx.now
            nts = tx.ts(now)
            await tx.lock_run(RUN_LOCK + run_id)
            expired = (
                "run_id = :run AND status = 'in_flight' AND (claimed_by IS NULL OR"
                " (claimed_by != :me AND lease_expires_at <= :now))"
            )
            a = events.this_actor()
            n = await tx.execute(
                events.insert_from_jobs_sql(expired),
                {
                    "run": run_id,
                    "me": worker_id,
                    "now": nts,
                    "at": nts,
                    "kind": "move",
                    "to_status": S.UNKNOWN.value,
                    "rule": "claim:holder-gone",
                    "reason": "the process that sent this upgrade stopped: checking what the cloud did",
                    "os_user": a.os_user,
                    "host": a.host,
                    "pid": a.pid,
                },
            )
            if n:
                await tx.execute(
                    "UPDATE jobs SET status = 'unknown', intent_deadline = COALESCE(lease_expires_at, :now),"
                    " claimed_by = NULL, lease_expires_at = NULL, next_attempt_at = :now, updated_at = :now,"
                    " reason = 'the process that sent this upgrade stopped: checking what the cloud did'"
                    f" WHERE {expired}",
                    {"run": run_id, "me": worker_id, "now": nts},
                )
            free = "(claimed_by IS NULL OR lease_expires_at <= :now)"
            due = "(next_attempt_at IS NULL OR next_attempt_at <= :now)"
            follow = [S.UNKNOWN.value] + ([S.ACCEPTED.value] if track else [])
            fsql, fparams = in_clause("fs", follow)
            # candidates as (id, project, instance, sendable) only: full rows come back from the claim itself
            chosen: list[int] = [
                int(r[0])
                for r in await tx.fetch(
                    f"SELECT id FROM jobs WHERE run_id = :run AND status IN {fsql} AND {due} AND {free}"
                    " ORDER BY next_attempt_at LIMIT :lim",
                    {"run": run_id, "now": nts, "lim": limit, **fparams},
                )
            ]
            room = limit - len(chosen)
            if allow_new and room > 0:
                # only candidates whose instance has room: a LIMIT over all pending jobs could be filled
                # with siblings of busy instances and starve the instances listed after them
                # each candidate comes with its instance's busy count, so the siblings among the
                # candidates are held to the bound below without another query
                busy_n, room_params = _busy_count_sql(track, tx.dialect)
                has_room = f"{busy_n} < :per"
                cands = await tx.fetch(
                    f"SELECT id, project_id, instance_id, {busy_n} FROM jobs"
                    " WHERE run_id = :run AND status = 'retry_wait'"
                    f" AND next_attempt_at <= :now AND {free} AND {has_room}"
                    " ORDER BY next_attempt_at LIMIT :lim",
                    {"run": run_id, "now": nts, "lim": room * 2, "per": per_instance, **room_params},
                )
                cands += await tx.fetch(
                    f"SELECT id, project_id, instance_id, {busy_n} FROM jobs"
                    " WHERE run_id = :run AND status = 'pending'"
                    f" AND wave <= :open AND {due} AND {free} AND {has_room}"
                    " ORDER BY wave, id LIMIT :lim",
                    {
                        "run": run_id,
                        "now": nts,
                        "lim": room * 2,
                        "open": open_wave,
                        "per": per_instance,
                        **room_params,
                    },
                )
                if cands:
                    busy: dict[tuple[str, str], int] = {}
                    for job_id, project, instance, n in cands:
                        key = (str(project), str(instance))
                        held = busy.setdefault(key, int(n))
                        if held >= per_instance:
                            continue
                        busy[key] = held + 1
                        chosen.append(int(job_id))
                        if len(chosen) >= limit:
                            break
            if not chosen:
                return Claimed([], now)
            until = tx.ts(now + timedelta(seconds=lease_s))
            ids_sql, ids = in_clause("j", chosen)
            rows = await tx.fetch(
                f"UPDATE jobs SET claimed_by = :me, lease_expires_at = :until WHERE id IN {ids_sql}"
                f" AND {free} RETURNING {JOB_COLS}",
                {"me": worker_id, "until": until, "now": nts, **ids},
            )
            # a heartbeat never waits for a claim's rows (SKIP LOCKED), so taking the worker row here,
            # after the job rows, cannot close a wait cycle between parallel batches
            await tx.execute(
                "UPDATE workers SET claimed = claimed + :n WHERE id = :me", {"n": len(rows), "me": worker_id}
            )
            order = {job_id: i for i, job_id in enumerate(chosen)}
            out = sorted((job_row(r) for r in rows), key=lambda j: order[j.id])
            return Claimed(out, now)

        result: Claimed = await self._submit(op, run_lock=True)
        return result

    async def release(self, job_id: int, worker_id: str) -> None:
        """Give back ``worker_id``'s claim on the job: no status move, due time unchanged; nothing
        happens when another process holds it."""

        async def op(tx: Tx) -> None:
            await tx.execute(
                "UPDATE jobs SET claimed_by = NULL, lease_expires_at = NULL"
                " WHERE id = :id AND claimed_by = :me",
                {"id": job_id, "me": worker_id},
            )

        await self._submit(op)

    # --------------------------------------------------------------------------------------- upgrade
    async def record_intent(
        self, job: JobRow, *, worker_id: str, cloud_offset_s: float | None
    ) -> Intent | None:
        """Durably record that an upgrade call is about to leave, before it leaves. None: the job was moved
        or its claim lapsed meanwhile (the guard lost), so the call must not be sent."""
        number = job.attempt_count + 1

        async def op(tx: Tx) -> Intent | None:
            nts = tx.ts(tx.now)
            params = {
                "n": number,
                "now": nts,
                "id": job.id,
                "me": worker_id,
                "prev": job.attempt_count,
                "off": cloud_offset_s,
            }
            if tx.dialect == "postgresql":
                # one round trip: the guarded move and the attempt row in one statement
                # exactly one row, led by the job's id, (id, NULL, NULL) when the guard lost: the statement
                # can be pipelined
                both = await tx.fetchone(
                    "WITH j AS (UPDATE jobs SET status = 'in_flight', attempt_count = :n, updated_at = :now,"
                    " next_attempt_at = NULL, intent_deadline = lease_expires_at WHERE id = :id"
                    " AND status IN ('pending', 'retry_wait') AND claimed_by = :me AND attempt_count = :prev"
                    " AND lease_expires_at > :now RETURNING id, intent_deadline),"
                    " a AS (INSERT INTO attempts (job_id, number, worker, sent_at, outcome, cloud_offset_s)"
                    " SELECT j.id, :n, :me, :now, 'in_flight', :off FROM j RETURNING id)"
                    " SELECT CAST(:id AS bigint), (SELECT id FROM a), (SELECT intent_deadline FROM j)",
                    params,
                )
                if both is None or both[1] is None:
                    return None
                attempt_id, deadline = int(both[1]), aware(both[2])
            else:
                won = await tx.fetchone(
                    "UPDATE jobs SET status = 'in_flight', attempt_count = :n, updated_at = :now,"
                    " next_attempt_at = NULL, intent_deadline = lease_expires_at WHERE id = :id"
                    " AND status IN ('pending', 'retry_wait') AND claimed_by = :me AND attempt_count = :prev"
                    " AND lease_expires_at > :now RETURNING intent_deadline",
                    params,
                )
                if won is None:
                    return None
                row = await tx.fetchone(
                    "INSERT INTO attempts (job_id, number, worker, sent_at, outcome, cloud_offset_s)"
                    " VALUES (:job, :n, :me, :now, 'in_flight', :off) RETURNING id",
                    {"job": job.id, "n": number, "me": worker_id, "now": nts, "off": cloud_offset_s},
                )
                assert row is not None
                attempt_id, deadline = int(row[0]), aware(won[0])
            await events.append(
                tx,
                run_id=job.run_id,
                job_id=job.id,
                kind="move",
                from_status=job.status.value,
                to_status=JobStatus.IN_FLIGHT.value,
                reason=f"upgrade call {number}",
            )
            return Intent(attempt_id, number, deadline)

        result: Intent | None = await self._submit(pipelined(op), urgent=True)
        return result

    def record_answer(
        self,
        job: JobRow,
        attempt_id: int,
        answer: AttemptAnswer,
        *,
        workflows: Sequence[NewWorkflow],
        move: Move,
        worker_id: str,
    ) -> asyncio.Future[bool]:
        """The answer to an attempt, every ``update_result`` item, and the job's move, in one commit,
        queued now; returns the commit's future (True: the move won): await it, or let it commit behind
        the caller's back as the upgrade step does (``Runtime.defer``).

        The attempt and its workflows are facts and are recorded even if the move loses (the job was taken
        over meanwhile): no workflow id the cloud issued is ever dropped. Raises ``IllegalMove`` for a move
        the state table forbids, before anything is queued."""
        check_move(move.frm, move.to)  # a bug fails here, before it can fail a whole commit batch
        # the move alone: its own attempt and workflows (none from moves.apply_answer) would be recorded twice
        plain = (
            move
            if move.attempt_id is None and not move.workflows
            else Move(
                frm=move.frm,
                to=move.to,
                fields=move.fields,
                release=move.release,
                event_reason=move.event_reason,
            )
        )

        async def op(tx: Tx) -> bool:
            if tx.dialect == "postgresql":
                return await _answer_pg(tx, job, attempt_id, answer, move, worker_id, workflows)
            await complete_attempt(tx, attempt_id, answer)
            await insert_workflows(tx, job.id, attempt_id, workflows)
            return await apply_move(tx, job, plain, worker_id)

        fut: asyncio.Future[bool] = self._submit_soon(pipelined(op))
        return fut

    async def move(self, job: JobRow, move: Move, *, worker_id: str | None) -> bool:
        """Apply one guarded move in its own commit (see :func:`apply_move`: guarded on ``move.frm`` and,
        with ``worker_id``, on that process's claim; the attempt's answer, the workflows and the event in
        the same commit). Returns whether it won. Raises ``IllegalMove`` before anything is queued for a
        move the state table forbids, and ``ValueError`` for a column a move may not set."""
        check_move(move.frm, move.to)

        async def op(tx: Tx) -> bool:
            return await apply_move(tx, job, move, worker_id)

        result: bool = await self._submit(op)
        return result

    async def reschedule(
        self,
        job: JobRow,
        *,
        worker_id: str,
        due: datetime,
        reason: str | None = None,
        read_failures: int | None = None,
    ) -> None:
        """Look at the job again at ``due`` (database clock), releasing the claim; no status move."""

        async def op(tx: Tx) -> None:
            sets = ["next_attempt_at = :due", "claimed_by = NULL", "lease_expires_at = NULL"]
            params: dict[str, Any] = {"due": tx.ts(due), "id": job.id, "me": worker_id}
            if reason is not None:
                sets.append("reason = :reason")
                params["reason"] = reason
            if read_failures is not None:
                sets.append("read_failures = :rf")
                params["rf"] = read_failures
            await tx.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = :id AND claimed_by = :me", params)

        await self._submit(op)

    async def set_preflight_facts(
        self,
        job: JobRow,
        *,
        worker_id: str,
        current_version: str,
        latest_version: str | None,
        risk: dict[str, Any] | None,
    ) -> None:
        """What the latest version read said (kept: a retry sends the version it read)."""

        async def op(tx: Tx) -> None:
            await tx.execute(
                "UPDATE jobs SET current_version = :cur, latest_version = :lat, risk = :risk,"
                " read_failures = 0, updated_at = :now WHERE id = :id AND claimed_by = :me",
                {
                    "cur": current_version,
                    "lat": latest_version,
                    "risk": tx.json(risk),
                    "now": tx.ts(tx.now),
                    "id": job.id,
                    "me": worker_id,
                },
            )

        await self._submit(op)

    async def record_workflow_status(
        self,
        row_id: int,
        *,
        status: str | None,
        progress: str | None,
        fail_reason: str | None,
        ended_at: datetime | None,
    ) -> None:
        """A poll's answer for one workflow row (``status`` None: the poll failed; only the check time)."""

        async def op(tx: Tx) -> None:
            if status is None:
                await tx.execute(
                    "UPDATE workflows SET checked_at = :now WHERE id = :id",
                    {"now": tx.ts(tx.now), "id": row_id},
                )
                return
            await tx.execute(
                "UPDATE workflows SET job_status = :st, progress = :pr, fail_reason = :fr, checked_at = :now,"
                " ended_at = :end WHERE id = :id",
                {
                    "st": status,
                    "pr": progress,
                    "fr": fail_reason,
                    "now": tx.ts(tx.now),
                    "end": tx.ts(ended_at),
                    "id": row_id,
                },
            )

        await self._submit(op)

    async def skip_removed(self, job: JobRow, reason: str) -> bool:
        """A proxy removed from the inventory before anything was sent for it: pending -> skipped."""
        move = Move(
            frm=JobStatus.PENDING,
            to=JobStatus.SKIPPED,
            fields={"reason": reason, "rule": "inventory:removed"},
        )

        async def op(tx: Tx) -> bool:
            if job.attempt_count:
                return False
            return await apply_move(tx, job, move, None)

        result: bool = await self._submit(op)
        return result

    async def retarget(self, job: JobRow, target_version: str, reason: str) -> bool:
        """A changed inventory target for a job never sent (guarded: pending, no attempt yet)."""

        async def op(tx: Tx) -> bool:
            n = await tx.execute(
                "UPDATE jobs SET target_version = :t, updated_at = :now WHERE id = :id AND status = 'pending'"
                " AND attempt_count = 0",
                {"t": target_version, "now": tx.ts(tx.now), "id": job.id},
            )
            if n:
                await events.append(tx, run_id=job.run_id, job_id=job.id, kind="retarget", reason=reason)
            return n == 1

        result: bool = await self._submit(op)
        return result

    # -------------------------------------------------------------------------------------- operator
    async def requeue(
        self,
        run_id: int,
        *,
        statuses: Iterable[JobStatus],
        proxy_ids: Sequence[str] = (),
        rules: Sequence[str] = (),
    ) -> Requeued:
        """Operator re-queue (``orchestrator retry``): chosen flagged/failed jobs back to pending, history
        kept, one ``retry`` event each with who did it. Validated first: unknown ``proxy_ids`` raise
        ``UnknownProxies`` before anything changes. A job with a workflow last seen Pending/Running is
        re-queued too, and reported: nobody follows a flagged job's workflow, so that status is only as
        fresh as its ``checked_at``, and refusing on it would refuse for good. The upgrade step polls the
        workflow before sending and sends nothing while it runs (``steps/upgrade.py``)."""
        chosen = list(statuses)
        for st in chosen:
            check_move(st, JobStatus.PENDING)

        async def op(tx: Tx) -> Requeued:
            nts = tx.ts(tx.now)
            if proxy_ids:
                psql, pparams = in_clause("p", proxy_ids)
                known = {
                    str(r[0])
                    for r in await tx.fetch(
                        f"SELECT proxy_id FROM jobs WHERE run_id = :run AND proxy_id IN {psql}",
                        {"run": run_id, **pparams},
                    )
                }
                missing = [p for p in proxy_ids if p not in known]
                if missing:
                    raise UnknownProxies(f"not in run {run_id}: {', '.join(missing)}")
            ssql, sparams = in_clause("s", [s.value for s in chosen])
            where = [f"run_id = :run AND status IN {ssql}"]
            params: dict[str, Any] = {"run": run_id, **sparams}
            if proxy_ids:
                psql, pparams = in_clause("p", proxy_ids)
                where.append(f"proxy_id IN {psql}")
                params.update(pparams)
            if rules:
                rsql, rparams = in_clause("r", rules)
                where.append(f"rule IN {rsql}")
                params.update(rparams)
            cond = " AND ".join(where)
            fsql, fparams = in_clause("fw", FINAL_WORKFLOW)
            running_rows = await tx.fetch(
                f"SELECT j.id, j.proxy_id, w.workflow_id, w.job_status, w.checked_at FROM jobs j"
                f" JOIN workflows w ON w.job_id = j.id WHERE j.{cond.replace(' AND ', ' AND j.')}"
                f" AND w.state = 'ACCEPT' AND w.job_status IS NOT NULL AND w.job_status NOT IN {fsql}",
                {**params, **fparams},
            )
            running = [(str(r[1]), str(r[2]), str(r[3]), aware(r[4])) for r in running_rows]
            a = events.this_actor()
            await tx.execute(
                events.insert_from_jobs_sql(cond),
                {
                    **params,
                    "at": nts,
                    "kind": "retry",
                    "to_status": JobStatus.PENDING.value,
                    "rule": None,
                    "reason": "re-queued by an operator",
                    "os_user": a.os_user,
                    "host": a.host,
                    "pid": a.pid,
                },
            )
            moved = await tx.execute(
                "UPDATE jobs SET status = 'pending', next_attempt_at = NULL, claimed_by = NULL,"
                " lease_expires_at = NULL, reason = NULL, hint = NULL, rule = NULL, counts_failure = :f,"
                f" read_failures = 0, updated_at = :now WHERE {cond}",
                {**params, "now": nts, "f": False},
            )
            if moved:
                reopened = await tx.execute(
                    "UPDATE runs SET status = 'stopped', finished_at = NULL, stop_reason = 're-queued'"
                    " WHERE id = :run AND status = 'finished'",
                    {"run": run_id},
                )
                if reopened:  # the run's own move is in the log too (its next one starts from 'stopped')
                    await events.append(
                        tx,
                        run_id=run_id,
                        kind="run",
                        from_status="finished",
                        to_status="stopped",
                        reason="re-queued",
                    )
            return Requeued(moved, running)

        result: Requeued = await self._submit(op)
        return result

    # ----------------------------------------------------------------------------------------- reads
    async def get_job(self, job_id: int) -> JobRow | None:
        """The job with this id, or None."""

        async def op(tx: Tx) -> JobRow | None:
            r = await tx.fetchone(f"SELECT {JOB_COLS} FROM jobs WHERE id = :id", {"id": job_id})
            return job_row(r) if r else None

        result: JobRow | None = await self._submit(op)
        return result

    async def jobs(
        self, run_id: int, statuses: Iterable[JobStatus] | None = None, *, limit: int = 100_000
    ) -> list[JobRow]:
        """The run's jobs (only those in ``statuses`` when given), in id (inventory) order, at most
        ``limit``."""

        async def op(tx: Tx) -> list[JobRow]:
            where = "run_id = :run"
            params: dict[str, Any] = {"run": run_id, "lim": limit}
            if statuses is not None:
                ssql, sparams = in_clause("s", [s.value for s in statuses])
                where += f" AND status IN {ssql}"
                params.update(sparams)
            rows = await tx.fetch(f"SELECT {JOB_COLS} FROM jobs WHERE {where} ORDER BY id LIMIT :lim", params)
            return [job_row(r) for r in rows]

        result: list[JobRow] = await self._submit(op)
        return result

    async def first_job(self, run_id: int, statuses: Iterable[JobStatus]) -> JobRow | None:
        """The run's lowest-id job in one of ``statuses``, or None."""
        found = await self.jobs(run_id, statuses, limit=1)
        return found[0] if found else None

    async def job_keys(self, run_id: int) -> dict[tuple[str, str, str], JobRow]:
        """(project, instance, proxy) -> job: to compare the run with a changed inventory."""
        return {(j.project_id, j.instance_id, j.proxy_id): j for j in await self.jobs(run_id)}

    async def attempts(self, job_id: int) -> list[AttemptRow]:
        """The job's upgrade calls, by number (first call first)."""

        async def op(tx: Tx) -> list[AttemptRow]:
            rows = await tx.fetch(
                f"SELECT {ATTEMPT_COLS} FROM attempts WHERE job_id = :j ORDER BY number", {"j": job_id}
            )
            return [attempt_row(r) for r in rows]

        result: list[AttemptRow] = await self._submit(op)
        return result

    async def workflows_of(self, job_id: int) -> list[WorkflowRow]:
        """The job's workflow rows, in the order they were recorded."""

        async def op(tx: Tx) -> list[WorkflowRow]:
            rows = await tx.fetch(
                f"SELECT {WORKFLOW_COLS} FROM workflows WHERE job_id = :j ORDER BY id", {"j": job_id}
            )
            return [workflow_row(r) for r in rows]

        result: list[WorkflowRow] = await self._submit(op)
        return result

    async def attempts_and_workflows(self, job_id: int) -> tuple[list[AttemptRow], list[WorkflowRow]]:
        """Both in one transaction (one round trip on the hot path of reconcile and track)."""

        async def op(tx: Tx) -> tuple[list[AttemptRow], list[WorkflowRow]]:
            a = await tx.fetch(
                f"SELECT {ATTEMPT_COLS} FROM attempts WHERE job_id = :j ORDER BY number", {"j": job_id}
            )
            w = await tx.fetch(
                f"SELECT {WORKFLOW_COLS} FROM workflows WHERE job_id = :j ORDER BY id", {"j": job_id}
            )
            return [attempt_row(r) for r in a], [workflow_row(r) for r in w]

        result: tuple[list[AttemptRow], list[WorkflowRow]] = await self._submit(op)
        return result

    async def known_workflow_ids(self, candidates: Iterable[str]) -> set[str]:
        """Which of ``candidates`` the job table already records (any run): reconcile never takes a
        workflow another job already owns for this one."""
        ids = sorted(set(candidates))
        if not ids:
            return set()

        async def op(tx: Tx) -> set[str]:
            out: set[str] = set()
            for i in range(0, len(ids), 500):
                wsql, wparams = in_clause("w", ids[i : i + 500])
                out |= {
                    str(r[0])
                    for r in await tx.fetch(
                        f"SELECT workflow_id FROM workflows WHERE workflow_id IN {wsql}", wparams
                    )
                }
            return out

        result: set[str] = await self._submit(op)
        return result

    async def next_due(self, run_id: int, *, track: bool) -> datetime | None:
        """The earliest moment a job of this run may become claimable (the engine's idle sleep)."""
        wanted = [JobStatus.RETRY_WAIT.value, JobStatus.UNKNOWN.value, JobStatus.PENDING.value] + (
            [JobStatus.ACCEPTED.value] if track else []
        )

        async def op(tx: Tx) -> datetime | None:
            best: datetime | None = None
            for st in wanted:
                r = await tx.fetchone(
                    "SELECT min(next_attempt_at) FROM jobs WHERE run_id = :run AND status = :st",
                    {"run": run_id, "st": st},
                )
                v = aware(r[0]) if r else None
                if v is not None and (best is None or v < best):
                    best = v
            return best

        result: datetime | None = await self._submit(op)
        return result

    async def active_count(self, run_id: int, *, track: bool) -> int:
        """How many jobs of the run are still active (``states.ACTIVE``; ``accepted`` counts only when
        ``track``, i.e. without ``--no-wait``): 0 means the run is finished."""
        active = [s.value for s in ACTIVE if track or s is not JobStatus.ACCEPTED]

        async def op(tx: Tx) -> int:
            asql, aparams = in_clause("a", active)
            r = await tx.fetchone(
                f"SELECT count(*) FROM jobs WHERE run_id = :run AND status IN {asql}",
                {"run": run_id, **aparams},
            )
            return int(r[0]) if r else 0

        result: int = await self._submit(op)
        return result


def _busy_count_sql(track: bool, dialect: str) -> tuple[str, dict[str, Any]]:
    """How many proxies of a ``jobs`` row's instance are being upgraded now (the availability guard), as
    a scalar subquery on that row, with its parameters (``:now`` bound by the caller): jobs in flight,
    unknown (or accepted, when tracking), and sendable jobs under a live claim."""
    busy_states = [JobStatus.IN_FLIGHT.value, JobStatus.UNKNOWN.value] + (
        [JobStatus.ACCEPTED.value] if track else []
    )
    bsql, bparams = in_clause("rb", busy_states)
    ssql, sparams = in_clause("rs", _SENDABLE)
    # SQLite's planner otherwise walks the (run, status) index over every pending job of the run
    hint = " INDEXED BY ix_jobs_run_instance" if dialect == "sqlite" else ""
    return (
        f"(SELECT count(*) FROM jobs o{hint} WHERE o.run_id = jobs.run_id"
        " AND o.instance_id = jobs.instance_id AND o.project_id = jobs.project_id"
        f" AND (o.status IN {bsql} OR (o.status IN {ssql}"
        " AND o.claimed_by IS NOT NULL AND o.lease_expires_at > :now)))",
        {**bparams, **sparams},
    )


TERMINAL_VALUES = tuple(sorted(s.value for s in TERMINAL))
