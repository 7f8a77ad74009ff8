"""The append-only event log: every job status move and every operator action, with who and when.

``jobs.reason`` is overwritten by the next move; ``events`` keeps every one, so ``history`` can show an
earlier flag after a later success, and an auditor can see who re-queued what (OS user, host, pid).
Events are written inside the same transaction as the change they describe.
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass
from functools import cache
from typing import Any

from orchestrator.store.sql import Tx

_INSERT = (
    "INSERT INTO events (at, run_id, job_id, kind, from_status, to_status, rule, reason, os_user, host, pid,"
    " detail) VALUES (:at, :run_id, :job_id, :kind, :from_status, :to_status, :rule, :reason, :os_user,"
    " :host, :pid, :detail)"
)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: the OS user, the host and the process id of this program."""

    os_user: str
    host: str
    pid: int


@cache
def this_actor() -> Actor:
    """This process's OS user (the numeric uid when it has no name), host name and pid; read once."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in a container: the numeric uid still says who
        user = str(os.getuid())
    return Actor(os_user=user[:64], host=socket.gethostname()[:200], pid=os.getpid())


def event_values(
    tx: Tx,
    *,
    run_id: int,
    kind: str,
    job_id: int | None = None,
    from_status: str | None = None,
    to_status: str | None = None,
    rule: str | None = None,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The parameters of one ``events`` row: stamped with the transaction's clock (``tx.now``) and this
    process's actor, ``detail`` as JSON."""
    a = this_actor()
    return {
        "at": tx.ts(tx.now),
        "run_id": run_id,
        "job_id": job_id,
        "kind": kind,
        "from_status": from_status,
        "to_status": to_status,
        "rule": rule,
        "reason": reason,
        "os_user": a.os_user,
        "host": a.host,
        "pid": a.pid,
        "detail": tx.json(detail),
    }


async def append(tx: Tx, **values: Any) -> None:
    """Append one event (keyword arguments as :func:`event_values`). Written with the transaction's
    other events in one statement just before it commits (``flush``), or at once when the transaction
    keeps no buffer."""
    buffer = getattr(tx, "events", None)
    if buffer is not None:
        buffer.append(event_values(tx, **values))
        return
    await tx.execute(_INSERT, event_values(tx, **values))


async def flush(tx: Tx) -> None:
    """Write the events buffered in ``tx`` (called by the driver layer before COMMIT)."""
    buffer = getattr(tx, "events", None)
    if buffer:
        rows = list(buffer)
        buffer.clear()
        await tx.executemany(_INSERT, rows)


async def append_many(tx: Tx, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (each from :func:`event_values`) now, in one statement, whatever ``tx`` buffers."""
    await tx.executemany(_INSERT, rows)


def insert_from_jobs_sql(where: str) -> str:
    """``INSERT INTO events ... SELECT`` one move event per job matching ``where`` (bound as :frm... by
    the caller), for bulk moves (expiry of dead claims, operator re-queue) that must log each job."""
    return (
        "INSERT INTO events (at, run_id, job_id, kind, from_status, to_status, rule, reason, os_user, host,"
        " pid, detail) SELECT :at, run_id, id, :kind, status, :to_status, :rule, :reason, :os_user, :host,"
        f" :pid, NULL FROM jobs WHERE {where}"
    )
