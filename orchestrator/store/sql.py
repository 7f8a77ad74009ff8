"""The driver layer under the store: one transaction API over SQLite (stdlib ``sqlite3``) and PostgreSQL
(``asyncpg``), so every store operation is written once, as a coroutine ``op(tx) -> T``.

Why not SQLAlchemy here: the hot path (claim, intent, answer, move) runs thousands of times a second and
an ORM or Core ``execute`` costs 30-60 µs of Python per statement against 3-10 µs for a prepared driver
statement; the schema and migrations stay SQLAlchemy's (reads: ``store/reader.py``). SQL is written with
``:name`` parameters (sqlite3's own style) and rewritten to ``$n`` for asyncpg once per statement text.

SQLite: one connection in one dedicated thread (the writer), ``BEGIN IMMEDIATE`` per batch. An op never
really suspends on SQLite (its awaits complete at once), so the thread drives each op's coroutine with a
single ``send(None)``. PostgreSQL: the writer's own asyncpg connections (``PgBackend.parallel``, 4 by
default, so several batches commit at once), each batch in one transaction whose clock
(``clock_timestamp()``, read once at its start) every comparison in the batch uses, so hosts with
drifting clocks agree on leases and permits. Session timeouts bound what a stalled peer can cost
(docs/postgres.md). Ops marked ``pipelined`` (an intent, an answer: one statement on their own job's rows)
that sit next to each other in a batch share round trips: their statements go in one pipeline.

Errors: ``DatabaseDown`` when the database cannot be used right now (connection refused or lost, the
file locked past the busy timeout, a full disk, a read-only file or database, a lock wait timed out); the
writer retries those. Anything else is a bug or a constraint and propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
Params = Mapping[str, Any] | None

# Session settings on every PostgreSQL connection (docs/postgres.md): a stalled member (SIGSTOP, a frozen
# VM) costs the others at most a few seconds: its open transaction is ended, its advisory locks freed.
PG_SETTINGS: dict[str, str] = {
    "idle_in_transaction_session_timeout": "5000",
    "lock_timeout": "5000",
    "statement_timeout": "60000",
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "application_name": "orchestrator",
}
SQLITE_BUSY_MS = 5000


class DatabaseDown(Exception):
    """The job table cannot be used right now; the message names the cause (never a password)."""


class Tx(Protocol):
    """One open transaction. ``now``: the transaction's clock (the database server's on PostgreSQL)."""

    dialect: str
    now: datetime

    async def execute(self, sql: str, params: Params = None) -> int:
        """Run one statement (``:name`` parameters); returns the rows it changed as the driver counts
        them (0 when it reports none)."""
        ...

    async def executemany(self, sql: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run one statement once per parameter mapping of ``rows``."""
        ...

    async def fetch(self, sql: str, params: Params = None) -> list[tuple[Any, ...]]:
        """Every row of a query, as tuples in column order."""
        ...

    async def fetchone(self, sql: str, params: Params = None) -> tuple[Any, ...] | None:
        """The first row of a query, or None."""
        ...

    async def lock_run(self, key: int) -> datetime:
        """Hold the run's lock (advisory lock ``key``) until the transaction ends, and return the clock
        read once it was ours. PostgreSQL: ``pg_advisory_xact_lock``, taken once per transaction (later
        calls cost no round trip and return the first stamp). SQLite: ``BEGIN IMMEDIATE`` already holds
        the only write lock; returns ``now``."""
        ...

    def ts(self, value: datetime | None) -> Any:
        """A datetime as this driver binds a timestamp (SQLite: naive UTC text in SQLAlchemy's format,
        so text order is time order; PostgreSQL: the aware datetime); None stays None."""
        ...

    def json(self, value: Any) -> Any:
        """A value as this driver binds a JSON column (JSON text); None stays None (SQL NULL)."""
        ...


Op = Callable[[Tx], Awaitable[T]]


def utcnow() -> datetime:
    """This host's clock now, as an aware UTC datetime."""
    return datetime.now(UTC)


def aware(value: Any) -> datetime | None:
    """A timestamp column as an aware UTC datetime (SQLite hands back naive text written as UTC)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
    return value.astimezone(UTC)  # type: ignore[no-any-return]


def from_json(value: Any) -> Any:
    """A JSON column's value: parsed when the driver hands back text, else as it came (None stays None)."""
    return json.loads(value) if isinstance(value, str) else value


# ------------------------------------------------------------------------------------------- SQLite
class _SqliteTx:
    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection, now: datetime) -> None:
        self._conn = conn
        self.now = now
        self._now_text = _sqlite_ts(now)
        self.events: list[dict[str, Any]] = []  # store/events.py buffers the batch's events here

    async def execute(self, sql: str, params: Params = None) -> int:
        return self._conn.execute(sql, sqlite_params(params)).rowcount

    async def executemany(self, sql: str, rows: Sequence[Mapping[str, Any]]) -> None:
        self._conn.executemany(sql, [sqlite_params(r) for r in rows])

    async def fetch(self, sql: str, params: Params = None) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, sqlite_params(params)).fetchall()

    async def fetchone(self, sql: str, params: Params = None) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._conn.execute(sql, sqlite_params(params)).fetchone()
        return row

    async def lock_run(self, key: int) -> datetime:
        return self.now

    def ts(self, value: datetime | None) -> Any:
        if value is None:
            return None
        if value is self.now:
            return self._now_text
        return _sqlite_ts(value)

    def json(self, value: Any) -> Any:
        return None if value is None else json.dumps(value)


def _sqlite_ts(value: datetime) -> str:
    # SQLAlchemy's SQLite DateTime format, so its readers parse what we write and text order is time
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


# the types sqlite3 binds as they are (most parameters): checked by identity before any isinstance
_PLAIN = frozenset({str, int, float, type(None), bytes})


def sqlite_params(params: Params) -> Mapping[str, Any]:
    """``params`` as sqlite3 binds them: datetimes as the store's UTC text, booleans as 0/1; the dict
    itself when nothing needs converting (most statements: ops pass timestamps through ``tx.ts``)."""
    if not params:
        return {}
    if type(params) is not dict:  # sqlite3 binds named parameters from a dict only
        params = dict(params)
    out: dict[str, Any] | None = None
    for k, v in params.items():
        if type(v) in _PLAIN:
            continue
        if isinstance(v, bool):
            v = int(v)
        elif isinstance(v, datetime):
            v = _sqlite_ts(v)
        else:
            continue
        if out is None:
            out = dict(params)
        out[k] = v
    return params if out is None else out


def _drive(coro: Awaitable[T]) -> T:
    """Run an op coroutine that never suspends (every SQLite await completes at once)."""
    it = coro.__await__()
    try:
        it.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    raise RuntimeError("a SQLite store op suspended: ops may await only the transaction")


_SQLITE_DOWN = (
    "locked",
    "busy",
    "disk is full",
    "database or disk is full",
    "readonly",
    "read-only",
    "unable to open",
    "disk i/o error",
    "no such table",
)


def sqlite_down(exc: sqlite3.Error) -> DatabaseDown | None:
    """The ``DatabaseDown`` a SQLite error amounts to (an ``OperationalError`` saying locked, busy, disk
    full, read-only, unable to open, disk I/O error or no such table), or None: a bug or a constraint."""
    text = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError) and any(w in text for w in _SQLITE_DOWN):
        return DatabaseDown(f"SQLite: {exc}")
    return None


class SqliteBackend:
    """The writer's own connection to a SQLite file, used from one thread."""

    dialect = "sqlite"

    def __init__(self, path: str, *, clock: Callable[[], datetime] = utcnow, inline: bool = False) -> None:
        """``clock``: the transaction clock (UTC now; a virtual clock in tests). ``inline``: run each batch
        on the event loop's thread instead of the writer thread (tests on a virtual-time loop, where a
        thread's wait would let virtual time jump)."""
        self.path = path
        self._clock = clock
        self.inline = inline
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=SQLITE_BUSY_MS / 1000
        )
        conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        # FULL: a committed intent survives a power cut of the jump host, not only a killed process
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _batch(self, ops: Sequence[Op[Any]], now: datetime) -> list[Any]:
        with self._lock:
            if self._conn is None:
                try:
                    self._conn = self._connect()
                except sqlite3.Error as exc:
                    raise sqlite_down(exc) or DatabaseDown(f"SQLite: {exc}") from exc
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                down = sqlite_down(exc)
                if down is None:
                    raise
                raise down from exc
            tx = _SqliteTx(conn, now)
            try:
                results = [_drive(op(tx)) for op in ops]
                if tx.events:
                    _drive(_flush_events(tx))
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    down = sqlite_down(exc)
                    if down is not None:
                        raise down from exc
                raise
            return results

    async def run_batch(self, ops: Sequence[Op[Any]]) -> list[Any]:
        """Run ``ops`` in order in one ``BEGIN IMMEDIATE`` transaction on the writer thread (the loop's
        thread when ``inline``), append the events they buffered, commit; returns their results in
        order. ``tx.now`` is ``clock()`` read when the batch is submitted. Any failure rolls the whole
        batch back and raises: ``DatabaseDown`` for a database that cannot be used now, else the error
        itself (``RuntimeError`` for an op that suspended)."""
        if self.inline:
            return self._batch(ops, self._clock())
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._batch, ops, self._clock())

    async def close(self) -> None:
        """Close the connection and stop the writer thread (a batch running finishes first)."""

        def shut() -> None:
            with self._lock:
                if self._conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.close()
                    self._conn = None

        if self.inline:
            shut()
            self._pool.shutdown(wait=True)
            return
        with contextlib.suppress(RuntimeError):
            await asyncio.get_running_loop().run_in_executor(self._pool, shut)
        self._pool.shutdown(wait=True)


# --------------------------------------------------------------------------------------- PostgreSQL
_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_][A-Za-z0-9_]*)")


class _PgStatement:
    __slots__ = ("names", "text")

    def __init__(self, sql: str) -> None:
        names: list[str] = []

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        self.text = _PARAM.sub(sub, sql)
        self.names = names

    def args(self, params: Params) -> list[Any]:
        p = params or {}
        return [p[n] for n in self.names]


_STATEMENTS: dict[str, _PgStatement] = {}


def pg_statement(sql: str) -> _PgStatement:
    """``sql`` (``:name`` parameters) rewritten for asyncpg (``$n``), once per statement text: ``.text``
    and ``.args(params)``."""
    st = _STATEMENTS.get(sql)
    if st is None:
        st = _STATEMENTS[sql] = _PgStatement(sql)
    return st


class _PgTx:
    dialect = "postgresql"

    def __init__(self, conn: Any, now: datetime) -> None:
        self._conn = conn
        self.now = now
        self.events: list[dict[str, Any]] = []
        self._locked: dict[int, datetime] = {}

    async def execute(self, sql: str, params: Params = None) -> int:
        st = pg_statement(sql)
        status: str = await self._conn.execute(st.text, *st.args(params))
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: str, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            st = pg_statement(sql)
            await self._conn.executemany(st.text, [st.args(r) for r in rows])

    async def fetch(self, sql: str, params: Params = None) -> list[tuple[Any, ...]]:
        st = pg_statement(sql)
        return [tuple(r) for r in await self._conn.fetch(st.text, *st.args(params))]

    async def fetchone(self, sql: str, params: Params = None) -> tuple[Any, ...] | None:
        st = pg_statement(sql)
        r = await self._conn.fetchrow(st.text, *st.args(params))
        return tuple(r) if r is not None else None

    async def fetchone_each(self, sql: str, many: Sequence[Params]) -> list[tuple[Any, ...]]:
        """Run ``sql`` once per parameter mapping in one pipeline; each run must return exactly one row
        whose first column is its ``:id`` parameter (their rows, in order). Raises ``RuntimeError``
        otherwise: the driver hands back the pipeline's rows as one list, so a run with no row and another
        with two would otherwise pass each op a row of another."""
        if len(many) == 1:
            one = await self.fetchone(sql, many[0])
            rows = [] if one is None else [one]
        else:
            st = pg_statement(sql)
            rows = [tuple(r) for r in await self._conn.fetchmany(st.text, [st.args(p) for p in many])]
        if len(rows) != len(many):
            raise RuntimeError(f"a pipelined statement returned {len(rows)} rows for {len(many)} runs")
        for row, params in zip(rows, many, strict=True):
            if not row or params is None or row[0] != params.get("id"):
                raise RuntimeError("a pipelined statement's row does not lead with its run's :id")
        return rows

    async def lock_run(self, key: int) -> datetime:
        stamp = self._locked.get(key)
        if stamp is None:
            # the clock is read by the outer query over the subquery's row, so only once the lock was
            # granted (a stamp read before a wait on the lock would be older than the permits granted during
            # that wait); a subquery calling a volatile function is never flattened, and OFFSET 0 fences it
            got = aware(
                await self._conn.fetchval(
                    "SELECT clock_timestamp() FROM (SELECT pg_advisory_xact_lock($1) OFFSET 0) AS l", key
                )
            )
            assert got is not None
            stamp = self._locked[key] = got
        return stamp

    def ts(self, value: datetime | None) -> Any:
        return value

    def json(self, value: Any) -> Any:
        return None if value is None else json.dumps(value)


def pipelined(op: Op[T]) -> Op[T]:
    """Mark ``op`` as one that may run interleaved with the other marked ops of its batch: it touches only
    its own job's rows, takes no lock, and every statement it sends with ``fetchone`` returns exactly one
    row whose first column is the statement's ``:id`` parameter (how each op is shown to get its own row
    back). On PostgreSQL the marked ops next to each other in a batch then share their round trips: each
    round, their statements with the same text go in one pipeline (asyncpg ``fetchmany``). Elsewhere, or
    alone, a marked op runs as any other. A statement that breaks the rule fails its batch, which the
    writer then replays op by op. Returns ``op``."""
    op.pipelined = True  # type: ignore[attr-defined]
    return op


def is_pipelined(op: Op[Any]) -> bool:
    """Whether ``op`` was marked with :func:`pipelined`."""
    return bool(getattr(op, "pipelined", False))


class _Request:
    """A statement a pipelined op waits on: the driver (``_interleave``) answers it."""

    __slots__ = ("kind", "params", "sql")

    def __init__(self, kind: str, sql: str, params: Any) -> None:
        self.kind, self.sql, self.params = kind, sql, params

    def __await__(self) -> Any:
        return (yield self)


class _PipeTx:
    """The transaction as pipelined ops see it: each statement is handed to the driver."""

    dialect = "postgresql"

    def __init__(self, tx: _PgTx) -> None:
        self._tx = tx
        self.now = tx.now
        self.events = tx.events

    def execute(self, sql: str, params: Params = None) -> Any:
        return _Request("execute", sql, params)

    def executemany(self, sql: str, rows: Sequence[Mapping[str, Any]]) -> Any:
        return _Request("executemany", sql, rows)

    def fetch(self, sql: str, params: Params = None) -> Any:
        return _Request("fetch", sql, params)

    def fetchone(self, sql: str, params: Params = None) -> Any:
        return _Request("fetchone", sql, params)

    async def lock_run(self, key: int) -> datetime:
        raise RuntimeError("a pipelined op may not take a lock")

    def ts(self, value: datetime | None) -> Any:
        return self._tx.ts(value)

    def json(self, value: Any) -> Any:
        return self._tx.json(value)


async def _run_ops(tx: _PgTx, ops: Sequence[Op[Any]]) -> list[Any]:
    """Every op of a batch, in order; runs of pipelined ops are interleaved (see :func:`pipelined`)."""
    results: list[Any] = []
    i = 0
    while i < len(ops):
        j = i
        while j < len(ops) and is_pipelined(ops[j]):
            j += 1
        if j - i > 1:
            results += await _interleave(tx, ops[i:j])
            i = j
        else:
            results.append(await ops[i](tx))
            i += 1
    return results


async def _interleave(tx: _PgTx, ops: Sequence[Op[Any]]) -> list[Any]:
    # Rounds: every unfinished op waits on one statement; the round's fetchone statements with one text
    # go in one pipeline, the rest one by one, in op order; then each op is resumed with its answer.
    ptx = _PipeTx(tx)
    coros = [op(ptx).__await__() for op in ops]
    results: list[Any] = [None] * len(ops)
    waiting: dict[int, _Request] = {}

    def step(k: int, value: Any) -> None:
        try:
            req = coros[k].send(value)
        except StopIteration as stop:
            results[k] = stop.value
            return
        if not isinstance(req, _Request):
            raise RuntimeError("a pipelined op awaited something other than its transaction")
        waiting[k] = req

    try:
        for k in range(len(ops)):
            step(k, None)
        while waiting:
            round_, answers = sorted(waiting.items()), {}
            waiting.clear()
            same: dict[str, list[int]] = {}
            for k, req in round_:
                if req.kind == "fetchone":
                    same.setdefault(req.sql, []).append(k)
                else:
                    answers[k] = await getattr(tx, req.kind)(req.sql, req.params)
            asked = dict(round_)
            for sql, ks in same.items():
                rows = await tx.fetchone_each(sql, [asked[k].params for k in ks])
                answers.update(zip(ks, rows, strict=True))
            for k in sorted(answers):
                step(k, answers[k])
    finally:
        for coro in coros:
            coro.close()
    return results


def pg_down(exc: BaseException) -> DatabaseDown | None:
    """The ``DatabaseDown`` an error amounts to on PostgreSQL (OS and connection errors, timeouts, a
    server shutting down or refusing connections, lock or statement timeouts, an idle transaction ended,
    deadlock, serialization failure, too many connections, disk full), or None: a bug or a constraint."""
    import asyncpg

    if isinstance(
        exc,
        OSError
        | ConnectionError
        | asyncio.TimeoutError
        | asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.CannotConnectNowError
        | asyncpg.AdminShutdownError
        | asyncpg.LockNotAvailableError
        | asyncpg.QueryCanceledError
        | asyncpg.IdleInTransactionSessionTimeoutError
        | asyncpg.DeadlockDetectedError
        | asyncpg.SerializationError
        | asyncpg.TooManyConnectionsError
        | asyncpg.DiskFullError
        # a fail-over to a standby (or a database set read-only): writes fail until a primary is back
        | asyncpg.ReadOnlySQLTransactionError
        # the server ended the session (shutdown, restart, a killed backend) and the driver has seen its
        # FATAL message but not yet the closed socket: the connection is unusable, drop it
        | asyncpg.InternalClientError,
    ):
        name = type(exc).__name__
        text = str(exc).splitlines()[0] if str(exc) else name
        return DatabaseDown(f"PostgreSQL: {name}: {text}")
    return None


class PgBackend:
    """The writer's own asyncpg connections (``parallel`` of them: batches are independent units of work,
    so several commit at once and the server's cores share the load); each is reconnected after a
    failure."""

    dialect = "postgresql"

    def __init__(self, dsn: str, *, describe: str, parallel: int = 4) -> None:
        self._dsn = dsn
        self._describe = describe
        self.parallel = parallel
        self._idle: list[Any] = []
        self._all: set[Any] = set()

    async def _connect(self) -> Any:
        import asyncpg

        try:
            conn = await asyncpg.connect(
                self._dsn, server_settings=PG_SETTINGS, timeout=10, command_timeout=60
            )
        except Exception as exc:
            down = pg_down(exc)
            if down is not None:
                raise DatabaseDown(f"{down} (connecting to {self._describe})") from exc
            raise
        self._all.add(conn)
        return conn

    async def run_batch(self, ops: Sequence[Op[Any]]) -> list[Any]:
        """Run ``ops`` in order in one transaction on an idle connection (a new one when none is idle:
        the writer runs at most ``parallel`` batches at once), append their buffered events, commit;
        returns their results in order. ``tx.now`` is the server's ``clock_timestamp()`` at the start.
        Raises ``DatabaseDown`` (the connection is dropped) or the op's own error (rolled back).
        Pipelined ops next to each other share round trips (:func:`pipelined`)."""
        conn = self._idle.pop() if self._idle else await self._connect()
        if conn.is_closed():
            self._all.discard(conn)
            conn = await self._connect()
        try:
            async with conn.transaction():
                now = aware(await conn.fetchval("SELECT clock_timestamp()"))
                assert now is not None
                tx = _PgTx(conn, now)
                results = await _run_ops(tx, ops)
                if tx.events:
                    await _flush_events(tx)
        except Exception as exc:
            down = pg_down(exc)
            if down is not None:
                self._all.discard(conn)
                with contextlib.suppress(Exception):
                    conn.terminate()
                raise down from exc
            self._idle.append(conn)
            raise
        self._idle.append(conn)
        return results

    async def close(self) -> None:
        """Close every connection (at most 5 s each; errors ignored)."""
        conns, self._all, self._idle = list(self._all), set(), []
        for conn in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)


Backend = SqliteBackend | PgBackend


async def _flush_events(tx: Tx) -> None:
    from orchestrator.store.events import flush

    await flush(tx)


def in_clause(prefix: str, values: Iterable[Any]) -> tuple[str, dict[str, Any]]:
    """``(:p0, :p1, ...)`` and its parameters, for an IN list of a known small size."""
    params = {f"{prefix}{i}": v for i, v in enumerate(values)}
    if not params:
        return "(NULL)", {}
    return "(" + ", ".join(f":{k}" for k in params) + ")", params


def secure_file(path: str) -> None:
    """The job table holds the fleet's layout and the audit trail: readable by its owner only."""
    for p in (path, f"{path}-wal", f"{path}-shm"):
        with contextlib.suppress(OSError):
            if Path(p).exists():
                os.chmod(p, 0o600)
