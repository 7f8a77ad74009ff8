"""Processes working on runs: registration (the runner lock and the proxy hold), heartbeats, leaving.

A proxy may be held by one live run at a time, on both backends. "Live" means a registered process that
has not left, whose lease has not run out (in the database's clock on PostgreSQL; in the one host's clock
on SQLite, a local file), and whose process still exists when it is on this host. A stalled process whose
lease ran out may be taken over: the send fence (``runtime.LeaseKeeper``) keeps it from sending after.
Registering checks, in the same transaction that registers (SQLite: one ``BEGIN IMMEDIATE``; PostgreSQL:
a global advisory lock), that no other live run has an unfinished job on any of this run's unfinished
proxies, so two runs started at once cannot both win.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import orchestrator.store.events as events
from orchestrator.states import TERMINAL
from orchestrator.store.decode import WORKER_COLS, worker_row
from orchestrator.store.rows import Registration, WorkerRow
from orchestrator.store.sql import Tx, in_clause

# One advisory lock key for every registration on a PostgreSQL job table (the proxy-hold check spans runs).
REGISTRY_LOCK = 0x6F72_FFFF_0001
_TERMINAL = in_clause("t", sorted(s.value for s in TERMINAL))


class RunLocked(RuntimeError):
    """Another live process is this run's runner; the message names it (host, pid, since)."""

    def __init__(self, holder: WorkerRow) -> None:
        self.holder = holder
        super().__init__(
            f"run {holder.run_id} is held by pid {holder.pid} on {holder.host} since "
            f"{holder.started_at:%Y-%m-%d %H:%M:%S} UTC (last heartbeat {holder.heartbeat_at:%H:%M:%S} UTC)"
        )


class ProxiesHeld(RuntimeError):
    """Another live run holds unfinished jobs on proxies of this run; the message names it and a process."""

    def __init__(self, run_id: int, run_name: str, holder: WorkerRow, count: int) -> None:
        self.run_id = run_id
        self.holder = holder
        self.count = count
        super().__init__(
            f"{count} of these proxies are held by run {run_id} ({run_name}), live in pid {holder.pid} on "
            f"{holder.host} (last heartbeat {holder.heartbeat_at:%H:%M:%S} UTC)"
        )


def new_worker_id() -> str:
    """A fresh worker id: ``host:pid:`` and 8 random hex digits."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0; one owned by another user counts
    as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_live(w: WorkerRow, now: datetime, dialect: str) -> bool:
    """Whether a registration still holds (see the module docstring for the rule per backend)."""
    if w.left_at is not None:
        return False
    here = w.host == socket.gethostname()
    if here and not pid_alive(w.pid):
        return False
    return w.lease_expires_at > now


async def workers_of(tx: Tx, run_id: int) -> list[WorkerRow]:
    """The run's registrations that have not left (live or not), oldest first."""
    rows = await tx.fetch(
        f"SELECT {WORKER_COLS} FROM workers WHERE run_id = :run AND left_at IS NULL ORDER BY started_at",
        {"run": run_id},
    )
    return [worker_row(r) for r in rows]


async def lock_registry(tx: Tx) -> None:
    """Serialise registrations: on PostgreSQL the registry's advisory lock, held until the transaction
    ends; on SQLite nothing (the batch's ``BEGIN IMMEDIATE`` already serialises writers)."""
    if tx.dialect == "postgresql":
        await tx.execute("SELECT pg_advisory_xact_lock(:k)", {"k": REGISTRY_LOCK})


async def check_holds(tx: Tx, run_id: int) -> None:
    """Raise ``ProxiesHeld`` if another live run has an unfinished job on one of this run's unfinished
    proxies. Cheap when no other run is live (the usual case): one small query."""
    rows = await tx.fetch(
        f"SELECT {WORKER_COLS} FROM workers WHERE run_id != :run AND left_at IS NULL", {"run": run_id}
    )
    live: dict[int, WorkerRow] = {}
    for r in rows:
        w = worker_row(r)
        if is_live(w, tx.now, tx.dialect) and w.run_id not in live:
            live[w.run_id] = w
    if not live:
        return
    runs_sql, runs_params = in_clause("r", sorted(live))
    term_sql, term_params = _TERMINAL
    found = await tx.fetch(
        "SELECT o.run_id, count(*) FROM jobs m JOIN jobs o ON o.project_id = m.project_id"
        " AND o.instance_id = m.instance_id AND o.proxy_id = m.proxy_id"
        f" WHERE m.run_id = :run AND o.run_id IN {runs_sql}"
        f" AND m.status NOT IN {term_sql} AND o.status NOT IN {term_sql} GROUP BY o.run_id ORDER BY o.run_id",
        {"run": run_id, **runs_params, **term_params},
    )
    if found:
        other, count = found[0]
        name_row = await tx.fetchone("SELECT name FROM runs WHERE id = :id", {"id": other})
        raise ProxiesHeld(other, str(name_row[0]) if name_row else "?", live[other], int(count))


async def register_in(
    tx: Tx, run_id: int, *, worker_id: str, role: str, lease_s: float, exclusive: bool
) -> Registration:
    """Join ``run_id`` inside an open transaction (the caller holds the registry lock).

    ``exclusive`` (the runner of run/resume) refuses while another live runner holds the run
    (``RunLocked``); any role refuses while another live run holds its proxies (``ProxiesHeld``). Dead
    holders are closed and their claims released at once (their in-flight jobs are then reconciled).
    """
    now = tx.now
    dead: list[WorkerRow] = []
    for w in await workers_of(tx, run_id):
        if not is_live(w, now, tx.dialect):
            dead.append(w)
        elif exclusive and w.role == "runner":
            raise RunLocked(w)
    await check_holds(tx, run_id)
    if dead:
        ids_sql, ids = in_clause("w", [w.id for w in dead])
        await tx.execute(
            f"UPDATE workers SET left_at = :now WHERE id IN {ids_sql}", {"now": tx.ts(now), **ids}
        )
        # the dead cannot send any more (their leases ran out, or their processes are gone): claims free now
        await tx.execute(
            f"UPDATE jobs SET lease_expires_at = :now WHERE claimed_by IN {ids_sql}"
            " AND lease_expires_at > :now",
            {"now": tx.ts(now), **ids},
        )
        await tx.execute(
            f"UPDATE send_log SET done_at = :now WHERE worker IN {ids_sql} AND done_at IS NULL",
            {"now": tx.ts(now), **ids},
        )
    until = now + timedelta(seconds=lease_s)
    await tx.execute(
        "INSERT INTO workers (id, run_id, role, host, pid, started_at, heartbeat_at, lease_expires_at,"
        " claimed) VALUES (:id, :run, :role, :host, :pid, :now, :now, :until, 0)",
        {
            "id": worker_id,
            "run": run_id,
            "role": role,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "now": tx.ts(now),
            "until": tx.ts(until),
        },
    )
    for w in dead:
        await events.append(
            tx,
            run_id=run_id,
            kind="takeover",
            reason=f"took over from pid {w.pid} on {w.host} "
            f"(no heartbeat since {w.heartbeat_at:%H:%M:%S} UTC)",
        )
    return Registration(worker_id=worker_id, taken_over=tuple(dead), db_now=now, lease_until=until)


class WorkerOps:
    """Mixin of ``JobStore``: registration, heartbeats, leaving, live workers."""

    async def _submit(
        self, op: Any, *, urgent: bool = False, run_lock: bool = False
    ) -> Any:  # provided by JobStore
        raise NotImplementedError

    async def register(
        self, run_id: int, *, role: str, lease_s: float, exclusive: bool, worker_id: str | None = None
    ) -> Registration:
        """Join a run (see :func:`register_in`). Raises ``RunLocked`` or ``ProxiesHeld``."""
        wid = worker_id or new_worker_id()

        async def op(tx: Tx) -> Registration:
            await lock_registry(tx)
            return await register_in(
                tx, run_id, worker_id=wid, role=role, lease_s=lease_s, exclusive=exclusive
            )

        result: Registration = await self._submit(op)
        return result

    async def heartbeat(
        self, worker_id: str, lease_s: float, *, claimed: int = 0
    ) -> tuple[bool, set[int], datetime]:
        """Extend this process's lease and its claims' leases (only claims still unexpired); ``claimed``
        adds the jobs claimed since the last heartbeat to the worker's total (``status``).

        Returns (alive, ids of the jobs whose claims were renewed, the database's now). ``alive`` False:
        the registration was closed by another process that presumed this one dead: stop at once.
        On PostgreSQL rows another batch of this process is moving right now are skipped, not waited
        for (``SKIP LOCKED``: batches commit in parallel and must never wait on each other in a cycle);
        those jobs are being released by that batch."""

        async def op(tx: Tx) -> tuple[bool, set[int], datetime]:
            until = tx.ts(tx.now + timedelta(seconds=lease_s))
            n = await tx.execute(
                "UPDATE workers SET heartbeat_at = :now, lease_expires_at = :until, claimed = claimed + :c"
                " WHERE id = :me AND left_at IS NULL",
                {"now": tx.ts(tx.now), "until": until, "me": worker_id, "c": claimed},
            )
            if n == 0:
                return False, set(), tx.now
            if tx.dialect == "postgresql":
                sql = (
                    "UPDATE jobs SET lease_expires_at = :until WHERE id IN (SELECT id FROM jobs"
                    " WHERE claimed_by = :me AND lease_expires_at > :now FOR UPDATE SKIP LOCKED) RETURNING id"
                )
            else:
                sql = (
                    "UPDATE jobs SET lease_expires_at = :until"
                    " WHERE claimed_by = :me AND lease_expires_at > :now"
                    " RETURNING id"
                )
            rows = await tx.fetch(sql, {"until": until, "me": worker_id, "now": tx.ts(tx.now)})
            return True, {int(r[0]) for r in rows}, tx.now

        result: tuple[bool, set[int], datetime] = await self._submit(op)
        return result

    async def leave(self, worker_id: str) -> None:
        """Close this registration and release its claims (a clean exit: no takeover needed)."""

        async def op(tx: Tx) -> None:
            now = tx.ts(tx.now)
            await tx.execute(
                "UPDATE workers SET left_at = :now WHERE id = :me", {"now": now, "me": worker_id}
            )
            # in-flight jobs keep their intent; their deadline is now (this process sends nothing more)
            await tx.execute(
                "UPDATE jobs SET claimed_by = NULL, lease_expires_at = NULL,"
                " intent_deadline = CASE WHEN status = 'in_flight' THEN :now ELSE intent_deadline END"
                " WHERE claimed_by = :me",
                {"now": now, "me": worker_id},
            )
            await tx.execute(
                "UPDATE send_log SET done_at = :now WHERE worker = :me AND done_at IS NULL",
                {"now": now, "me": worker_id},
            )

        await self._submit(op)

    async def live_workers(self, run_id: int) -> list[WorkerRow]:
        """The run's live registrations (the module docstring's rule), oldest first."""

        async def op(tx: Tx) -> list[WorkerRow]:
            return [w for w in await workers_of(tx, run_id) if is_live(w, tx.now, tx.dialect)]

        result: list[WorkerRow] = await self._submit(op)
        return result

    async def claimed_counts(self, run_id: int) -> dict[str, int]:
        """Worker id -> jobs it holds now (for ``status``)."""

        async def op(tx: Tx) -> dict[str, int]:
            rows = await tx.fetch(
                "SELECT claimed_by, count(*) FROM jobs WHERE run_id = :run AND claimed_by IS NOT NULL"
                " GROUP BY claimed_by",
                {"run": run_id},
            )
            return {str(k): int(v) for k, v in rows}

        result: dict[str, int] = await self._submit(op)
        return result

    async def live_runs(self, run_ids: Iterable[int]) -> dict[int, WorkerRow]:
        """Run id -> one live process of it, for the given runs."""
        wanted = set(run_ids)

        async def op(tx: Tx) -> dict[int, WorkerRow]:
            rows = await tx.fetch(f"SELECT {WORKER_COLS} FROM workers WHERE left_at IS NULL")
            out: dict[int, WorkerRow] = {}
            for r in rows:
                w = worker_row(r)
                if w.run_id in wanted and w.run_id not in out and is_live(w, tx.now, tx.dialect):
                    out[w.run_id] = w
            return out

        result: dict[int, WorkerRow] = await self._submit(op)
        return result
