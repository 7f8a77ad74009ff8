"""JobStore: the program's only door to the job table.

The engine and the commands speak in rows (``JobRow``, ``RunRow``...) and named operations; SQL lives in
this package, split by concern: ``runs`` (creating and finding runs, run-wide state), ``workers``
(registration, the proxy hold, heartbeats), ``jobs`` (the queue: claims, intents, answers, the one guarded
move, re-queue), ``permits`` (run-wide send permits on PostgreSQL), ``events`` (the append-only log) and
``reports`` (read queries for status, report, history and audits, on SQLAlchemy). Every operation of the
hot path goes through one group-commit writer (``writer``) over a driver connection (``sql``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

import orchestrator.store.db as db
from orchestrator.store.jobs import JobOps
from orchestrator.store.permits import PermitOps
from orchestrator.store.runs import RunOps
from orchestrator.store.sql import Backend, Op, PgBackend, SqliteBackend, Tx, secure_file
from orchestrator.store.workers import WorkerOps
from orchestrator.store.writer import GroupCommitWriter, OutageHook

T = TypeVar("T")


class JobStore(RunOps, WorkerOps, JobOps, PermitOps):
    def __init__(
        self,
        url: str,
        engine: AsyncEngine,
        backend: Backend,
        *,
        outage_timeout: float,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.url = url
        self._clock = clock or (lambda: datetime.now(UTC))
        self.engine = engine
        self.dialect = backend.dialect
        self._backend = backend
        self.writer = GroupCommitWriter(backend, outage_timeout=outage_timeout)
        self._db_offset = 0.0  # database clock minus ours, in seconds (PostgreSQL; 0 on SQLite)

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @property
    def db_offset_s(self) -> float:
        """The database's clock minus this host's (seconds): every time this process writes for later
        comparison (due times, leases) is in the database's clock (docs/resume.md)."""
        return self._db_offset

    def db_now(self) -> datetime:
        return self._clock() + timedelta(seconds=self._db_offset)

    def set_outage_hook(self, hook: OutageHook | None) -> None:
        self.writer.set_outage_hook(hook)

    async def _submit(self, op: Op[T], *, urgent: bool = False) -> T:
        if not self.is_postgres:
            return await self.writer.submit(op, urgent=urgent)
        sent = time.time()

        async def timed(tx: Tx) -> T:
            # the batch's clock against ours at submission: the queueing delay only makes the estimate
            # of the offset late, never early, by at most one batch
            self._db_offset = tx.now.timestamp() - max(sent, time.time() - 0.5)
            return await op(tx)

        return await self.writer.submit(timed, urgent=urgent)

    async def start(self) -> None:
        self.writer.start()

    async def close(self) -> None:
        await self.writer.close()
        await self._backend.close()
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A short read-only connection for report queries (``store.reports``); never for writes."""
        async with self.engine.connect() as conn:
            yield conn


async def open_store(
    url: str | None = None,
    *,
    migrate: bool = True,
    create: bool = True,
    outage_timeout: float = 60.0,
    clock: Callable[[], datetime] | None = None,
    inline: bool = False,
) -> JobStore:
    """Open the job table at ``url`` (or ORCHESTRATOR_DB, or ./orchestrator.db), upgraded to head.

    ``create`` False (read-only commands): a SQLite file that does not exist is refused, not created.
    Raises ``db.DatabaseUrlError`` (one line, exit 2) for a bad location, and the driver's error for a
    database that cannot be reached (``db.explain_connect_error`` words it). ``clock`` (UTC now) and
    ``inline`` (SQLite batches on the loop's thread) are for tests on virtual time."""
    full = db.normalize_url(url)
    db.check_target(full, create=create)
    engine = db.create_engine(full)
    try:
        if migrate:
            await db.ensure_current(engine)
    except BaseException:
        await engine.dispose()
        raise
    path = db.sqlite_path(full)
    backend: Backend
    if path is not None:
        secure_file(path)
        backend = SqliteBackend(path, clock=clock or (lambda: datetime.now(UTC)), inline=inline)
    else:
        backend = PgBackend(db.asyncpg_dsn(full), describe=describe_url(full))
    store = JobStore(full, engine, backend, outage_timeout=outage_timeout, clock=clock)
    await store.start()
    return store


def describe_url(url: str | None) -> str:
    """The job table for a person: ``sqlite:PATH`` or the URL with its password masked."""
    full = db.normalize_url(url)
    parsed = make_url(full)
    if parsed.get_backend_name() == "sqlite":
        return f"sqlite:{parsed.database}"
    return db.safe_url(full)
