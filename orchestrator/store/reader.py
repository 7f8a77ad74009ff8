"""Read connections for the report queries (``store/reports.py``): one snapshot of the job table, read with
the drivers the writer uses (stdlib ``sqlite3``, ``asyncpg``), never a write.

Why not SQLAlchemy here: the read commands (``report``, ``runs``, ``flagged``, ``history``, ``status``)
spent about 0.3 s of their start-up importing it, and a 100,000-job report a further few hundred
milliseconds in its result rows and aiosqlite's thread hops (``bench/run.py``, report row). The queries
are short SQL texts with ``:name`` parameters, as in ``store/sql.py``.

One reader is one read transaction: every query of a report (a window report makes six) sees the same
state of a job table that a live run is still writing. SQLite: its own connection, ``query_only``, a
deferred ``BEGIN`` (a WAL snapshot), used from the event loop's thread: a call reads at most one
``batch`` of rows (a few milliseconds), and a reader thread cost more than it overlapped (both threads
need the GIL to build rows: a 100,000-job JSON report took a median 2.49 s with one, 1.86 s without, five
runs each, interleaved). PostgreSQL: a ``READ ONLY REPEATABLE READ`` transaction with JIT off (see
:func:`open_reader`); long results come through a cursor ``batch`` rows at a time, the next part
fetched while the consumer works on this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import orchestrator.store.urls as urls
from orchestrator.errors import DatabaseUnavailable
from orchestrator.store.sql import (
    PG_SETTINGS,
    SQLITE_BUSY_MS,
    Params,
    aware,
    pg_down,
    pg_statement,
    sqlite_down,
    sqlite_params,
)

Row = tuple[Any, ...]
T = TypeVar("T")

# A reader's transaction may sit idle while its consumer writes (``report | less``); it holds no lock a
# writer waits for, so the writer's 5 s idle-transaction limit does not apply to it.
_READ_SETTINGS = {**PG_SETTINGS, "idle_in_transaction_session_timeout": "0", "statement_timeout": "0"}


class Reader(Protocol):
    """One read transaction on the job table. ``dialect``: ``sqlite`` or ``postgresql``."""

    dialect: str

    def time(self, value: Any) -> datetime | None:
        """A timestamp column's value as an aware UTC datetime (None stays None)."""
        ...

    async def fetch(self, sql: str, params: Params = None) -> list[Row]:
        """Every row of a query (``:name`` parameters), as tuples in column order."""
        ...

    async def fetchone(self, sql: str, params: Params = None) -> Row | None:
        """The first row of a query, or None."""
        ...

    async def query(self, sql: str, params: Params = None) -> tuple[list[str], list[Row]]:
        """A query's column names (as the database labels them) and every row. Without ``params`` the
        text is sent as written (no ``:name`` rewriting)."""
        ...

    def stream(self, sql: str, params: Params = None, *, batch: int) -> AsyncGenerator[Sequence[Row], None]:
        """The rows of a query ``batch`` at a time (the last part may be shorter), in bounded memory (on
        PostgreSQL the next part is fetched while the consumer works on this one). A consumer that stops
        early closes the stream (``contextlib.aclosing``) before its next query on this reader."""
        ...


def sqlite_time(text: str | None) -> datetime | None:
    """A time the store wrote on SQLite (``YYYY-MM-DD HH:MM:SS.ffffff``, UTC, no offset) as an aware
    datetime: one ``fromisoformat`` (half a million of them per 100,000-job report)."""
    if text is None:
        return None
    if not isinstance(text, str):  # a computed column SQLite typed otherwise
        return aware(text)
    try:
        return datetime.fromisoformat(text + "+00:00")
    except ValueError:  # written with an offset by something else
        value = datetime.fromisoformat(text)
        return value if value.tzinfo else value.replace(tzinfo=UTC)


class _SqliteReader:
    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.time: Callable[[Any], datetime | None] = sqlite_time

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except sqlite3.Error as exc:
            down = sqlite_down(exc)
            if down is not None:
                raise DatabaseUnavailable(f"the job table cannot be read: {down}") from exc
            raise

    async def fetch(self, sql: str, params: Params = None) -> list[Row]:
        args = sqlite_params(params)
        return self._call(lambda: self._conn.execute(sql, args).fetchall())

    async def fetchone(self, sql: str, params: Params = None) -> Row | None:
        args = sqlite_params(params)
        row: Row | None = self._call(lambda: self._conn.execute(sql, args).fetchone())
        return row

    async def query(self, sql: str, params: Params = None) -> tuple[list[str], list[Row]]:
        args = sqlite_params(params)

        def run() -> tuple[list[str], list[Row]]:
            cur = self._conn.execute(sql, args) if params is not None else self._conn.execute(sql)
            return [d[0] for d in cur.description or ()], cur.fetchall()

        return self._call(run)

    async def stream(
        self, sql: str, params: Params = None, *, batch: int
    ) -> AsyncGenerator[Sequence[Row], None]:
        cur = self._call(lambda: self._conn.execute(sql, sqlite_params(params)))
        try:
            while part := self._call(lambda: cur.fetchmany(batch)):
                yield part
                # a long report lets the loop's other tasks (signals) run between parts
                await asyncio.sleep(0)
        finally:
            cur.close()


class _PgReader:
    dialect = "postgresql"

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.time: Callable[[Any], datetime | None] = aware

    async def fetch(self, sql: str, params: Params = None) -> list[Row]:
        st = pg_statement(sql)
        return [tuple(r) for r in await self._conn.fetch(st.text, *st.args(params))]

    async def fetchone(self, sql: str, params: Params = None) -> Row | None:
        st = pg_statement(sql)
        r = await self._conn.fetchrow(st.text, *st.args(params))
        return tuple(r) if r is not None else None

    async def query(self, sql: str, params: Params = None) -> tuple[list[str], list[Row]]:
        # without parameters the text goes as written (an auditor's SELECT may hold ':' in a literal)
        st = pg_statement(sql) if params is not None else None
        stmt = await self._conn.prepare(st.text if st else sql)
        rows = await stmt.fetch(*(st.args(params) if st else ()))
        return [a.name for a in stmt.get_attributes()], [tuple(r) for r in rows]

    async def stream(
        self, sql: str, params: Params = None, *, batch: int
    ) -> AsyncGenerator[Sequence[Row], None]:
        st = pg_statement(sql)
        cur = await self._conn.cursor(st.text, *st.args(params))

        async def part() -> list[Row]:
            return [tuple(r) for r in await cur.fetch(batch)]

        async with contextlib.aclosing(_ahead(part)) as parts:
            async for rows in parts:
                yield rows


async def _ahead(fetch: Callable[[], Any]) -> AsyncGenerator[Sequence[Row], None]:
    """Parts from ``fetch()`` until an empty one, the next one fetched (over the socket) while the consumer
    works on the current one. A consumer that stops early lets the fetch under
    way finish first: cancelling it mid-call would leave the connection's transaction unusable."""
    ahead: asyncio.Future[Sequence[Row]] = asyncio.ensure_future(fetch())
    try:
        while True:
            part = await ahead
            if not part:
                return
            ahead = asyncio.ensure_future(fetch())
            await asyncio.sleep(0)  # let the next fetch start before the consumer's CPU work
            yield part
    finally:
        with contextlib.suppress(Exception):
            await ahead


@contextlib.asynccontextmanager
async def open_reader(url: str) -> AsyncIterator[Reader]:
    """A read transaction on the job table at ``url`` (normalized, as ``urls.normalize_url`` gives it),
    closed on exit. Raises ``DatabaseUnavailable`` (one line, naming the cause, never a password) when the
    database cannot be opened or read now.

    PostgreSQL: ``SET LOCAL jit = off``: the report's correlated subquery makes the planner's estimate large
    enough to trigger JIT, which spent 430 ms of a 760 ms 100,000-job report compiling a plan that runs
    once (EXPLAIN ANALYZE, PostgreSQL 15)."""
    path = urls.sqlite_path(url)
    if path is not None:
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=SQLITE_BUSY_MS / 1000)
            try:
                conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
                conn.execute("PRAGMA query_only=ON")
                conn.execute("BEGIN")
            except BaseException:
                conn.close()
                raise
        except sqlite3.Error as exc:
            cause = sqlite_down(exc) or f"SQLite: {exc}"
            raise DatabaseUnavailable(f"the job table cannot be read: {cause}") from exc
        try:
            yield _SqliteReader(conn)
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            conn.close()
        return

    import asyncpg

    try:
        pg = await asyncpg.connect(urls.asyncpg_dsn(url), server_settings=_READ_SETTINGS, timeout=10)
    except Exception as exc:
        down = pg_down(exc)
        if down is None:
            raise
        raise DatabaseUnavailable(f"the job table cannot be read: {down}") from exc
    try:
        tr = pg.transaction(isolation="repeatable_read", readonly=True)
        await tr.start()
        await pg.execute("SET LOCAL jit = off")
        try:
            yield _PgReader(pg)
        finally:
            with contextlib.suppress(Exception):
                await tr.rollback()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pg.close(), 5)
