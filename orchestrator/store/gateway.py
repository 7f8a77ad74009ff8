"""JobStore: the program's only door to the job table.

The engine and the commands speak in rows (``JobRow``, ``RunRow``...) and named operations; SQL lives in
this package, split by concern: ``runs`` (creating and finding runs, run-wide state), ``workers``
(registration, the proxy hold, heartbeats), ``jobs`` (the queue: claims, intents, answers, the one guarded
move, re-queue), ``permits`` (run-wide send permits on PostgreSQL), ``events`` (the append-only log) and
``reports`` (read queries for status, report, history and audits, each on a read transaction of
``reader``). Every operation of the hot path goes through one group-commit writer (``writer``) over a
driver connection (``sql``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

import orchestrator.store.fresh as fresh
import orchestrator.store.urls as urls
from orchestrator.store.jobs import JobOps
from orchestrator.store.permits import PermitOps
from orchestrator.store.reader import Reader, open_reader
from orchestrator.store.runs import RunOps
from orchestrator.store.schema import HEAD_REVISION
from orchestrator.store.sql import (
    Backend,
    Op,
    PgBackend,
    SqliteBackend,
    Tx,
    is_pipelined,
    pipelined,
    secure_file,
)
from orchestrator.store.workers import WorkerOps
from orchestrator.store.writer import GroupCommitWriter, OutageHook

if TYPE_CHECKING:  # SQLAlchemy is imported only by migrations (its start-up costs about 0.3 s)
    from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")


class JobStore(RunOps, WorkerOps, JobOps, PermitOps):
    """The job table of one process: the named operations of the mixins (runs, workers, jobs, permits),
    each a transaction committed through one group-commit writer, and read transactions for the report
    queries (``store/reader.py``). Made by ``open_store``; ``close`` it. Every operation raises
    ``DatabaseUnavailable`` once an outage lasted ``outage_timeout`` seconds, and the op's own error for a
    bug or a constraint. Times given and returned are aware UTC datetimes on the job table's clock
    (``db_now``)."""

    def __init__(
        self,
        url: str,
        backend: Backend,
        *,
        outage_timeout: float,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.url = url
        self._clock = clock or (lambda: datetime.now(UTC))
        self._engine: AsyncEngine | None = None
        self.dialect = backend.dialect
        self._backend = backend
        self.writer = GroupCommitWriter(backend, outage_timeout=outage_timeout)
        self._db_offset = 0.0  # database clock minus ours, in seconds (PostgreSQL; 0 on SQLite)

    @property
    def engine(self) -> AsyncEngine:
        """SQLAlchemy's engine on the same job table, made on first use (migrations, ``db current``)."""
        if self._engine is None:
            from orchestrator.store import db

            self._engine = db.create_engine(self.url)
        return self._engine

    @property
    def is_postgres(self) -> bool:
        """Whether the job table is on PostgreSQL (else a SQLite file)."""
        return self.dialect == "postgresql"

    @property
    def db_offset_s(self) -> float:
        """The database's clock minus this host's (seconds): every time this process writes for later
        comparison (due times, leases) is in the database's clock (docs/resume.md)."""
        return self._db_offset

    def db_now(self) -> datetime:
        """The job table's clock now (aware UTC): this host's clock (or the injected ``clock``) plus
        ``db_offset_s``, as measured at the latest commit."""
        if not self._db_offset:  # SQLite: the job table's clock is this host's (read on every call)
            return self._clock()
        return self._clock() + timedelta(seconds=self._db_offset)

    def set_outage_hook(self, hook: OutageHook | None) -> None:
        """Call ``hook(event, cause)`` when an outage starts (``db.down``) and ends (``db.recovered``)."""
        self.writer.set_outage_hook(hook)

    async def _submit(self, op: Op[T], *, urgent: bool = False, run_lock: bool = False) -> T:
        return await self._submit_soon(op, urgent=urgent, run_lock=run_lock)

    def _submit_soon(self, op: Op[T], *, urgent: bool = False, run_lock: bool = False) -> asyncio.Future[T]:
        if not self.is_postgres:
            return self.writer.submit_soon(op, urgent=urgent, run_lock=run_lock)
        sent = time.time()

        async def timed(tx: Tx) -> T:
            # the batch's clock against ours at submission: the queueing delay only makes the estimate
            # of the offset late, never early, by at most one batch
            self._db_offset = tx.now.timestamp() - max(sent, time.time() - 0.5)
            return await op(tx)

        if is_pipelined(op):
            pipelined(timed)

        return self.writer.submit_soon(timed, urgent=urgent, run_lock=run_lock)

    async def start(self) -> None:
        """Start the writer task (``open_store`` does)."""
        self.writer.start()

    async def close(self) -> None:
        """Commit what is queued, then close the driver connections and SQLAlchemy's engine if made."""
        await self.writer.close()
        await self._backend.close()
        if self._engine is not None:
            await self._engine.dispose()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[Reader]:
        """A read transaction for the report queries (``store.reports``), on its own connection, outside
        the writer; never for writes. Raises ``DatabaseUnavailable`` when it cannot be opened now."""
        async with open_reader(self.url) as reader:
            yield reader


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
    Raises ``DatabaseUrlError`` (one line, exit 2) for a bad location, and the driver's error for a
    database that cannot be reached (``urls.explain_connect_error`` words it). ``clock`` (UTC now) and
    ``inline`` (SQLite batches on the loop's thread) are for tests on virtual time. The schema revision
    is read with the driver; SQLAlchemy and Alembic are loaded only when the table must be migrated (a new
    SQLite file is made from the schema snapshot instead, ``store/fresh.py``)."""
    full = urls.normalize_url(url)
    urls.check_target(full, create=create)
    path = urls.sqlite_path(full)
    if migrate:
        revision = await stored_revision(full)
        # a new SQLite file gets the schema from the migrations' snapshot in one transaction (store/fresh.py)
        made = revision is None and path is not None and fresh.create_sqlite_at_head(path)
        if revision != HEAD_REVISION and not made:
            from orchestrator.store import db

            engine = db.create_engine(full)
            try:
                await db.upgrade(engine)
            finally:
                await engine.dispose()
    backend: Backend
    if path is not None:
        secure_file(path)
        backend = SqliteBackend(path, clock=clock or (lambda: datetime.now(UTC)), inline=inline)
    else:
        backend = PgBackend(urls.asyncpg_dsn(full), describe=urls.describe_url(full))
    store = JobStore(full, backend, outage_timeout=outage_timeout, clock=clock)
    await store.start()
    return store


async def stored_revision(url: str) -> str | None:
    """The schema revision recorded in the job table (None: no table yet), read with the driver."""
    path = urls.sqlite_path(url)
    if path is not None:
        import sqlite3

        conn = sqlite3.connect(path, timeout=30)
        try:
            try:
                row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return None
                raise
            return str(row[0]) if row else None
        finally:
            conn.close()
    import asyncpg

    from orchestrator.store.sql import PG_SETTINGS

    pg = await asyncpg.connect(urls.asyncpg_dsn(url), server_settings=PG_SETTINGS, timeout=10)
    try:
        has = await pg.fetchval("SELECT to_regclass('alembic_version') IS NOT NULL")
        if not has:
            return None
        value = await pg.fetchval("SELECT version_num FROM alembic_version LIMIT 1")
        return None if value is None else str(value)
    finally:
        await pg.close()


describe_url = urls.describe_url
