"""Engine creation and schema migration, for SQLite and PostgreSQL alike.

SQLite needs care to survive many concurrent writers: WAL, a busy timeout, foreign keys, and an explicit
``BEGIN IMMEDIATE`` (Python's sqlite3 does not begin before DDL/SELECT, so without it a read-then-write
transaction can deadlock into "database is locked"). Migrations run inside the already running event loop
through ``run_sync`` (Alembic's async template would call ``asyncio.run`` and fail there).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect, pool, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from orchestrator.errors import UsageError

DEFAULT_DB = "sqlite+aiosqlite:///orchestrator.db"


class DatabaseUrlError(UsageError, ValueError):
    pass


def normalize_url(url: str | None) -> str:
    """Accept the forms operators type (a file path, ``sqlite:///x``, ``postgresql://``) and pick the
    async driver, so ``--db runs.db`` and ``--db postgresql://u@h/db`` both work."""
    if not url:
        url = os.environ.get("ORCHESTRATOR_DB") or DEFAULT_DB
    if "://" not in url:
        return f"sqlite+aiosqlite:///{url}"
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with the URL (maybe a password) in it
        raise DatabaseUrlError(
            "--db: not a database URL (expected sqlite:///FILE or postgresql://...)"
        ) from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if backend in {"postgresql", "postgres"}:
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise DatabaseUrlError(f"--db: unsupported database {backend!r} (use sqlite or postgresql)")


def safe_url(url: str) -> str:
    """The URL with any password masked: the only form that may reach logs or errors."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite job table URL (None for PostgreSQL or an in-memory database)."""
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return parsed.database


def asyncpg_dsn(url: str) -> str:
    """The libpq-style DSN asyncpg takes, from a ``postgresql[+driver]://`` URL."""
    return make_url(normalize_url(url)).set(drivername="postgresql").render_as_string(hide_password=False)


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_target(url: str | None, *, create: bool) -> None:
    """Say plainly what is wrong with a job table location before any driver does it cryptically.

    ``create``: the command may create the table (run, demo, db upgrade); read-only commands
    (status, report, history...) refuse a SQLite file that does not exist, naming it, instead of
    creating an empty one. Raises ``DatabaseUrlError`` (a UsageError: one line, exit 2)."""
    full = normalize_url(url)
    path = sqlite_path(full)
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise DatabaseUrlError(f"job table {path}: is a directory, not a SQLite database file")
    if p.exists():
        try:
            with p.open("rb") as fh:
                head = fh.read(16)
        except OSError as exc:
            raise DatabaseUrlError(f"job table {path}: cannot read it: {exc.strerror}") from None
        if head and head != SQLITE_MAGIC:
            raise DatabaseUrlError(f"job table {path}: not a SQLite database")
        return
    if not create:
        raise DatabaseUrlError(f"no job table at {path} (nothing has run with it yet; check --db)")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise DatabaseUrlError(f"job table {path}: {parent} is not a directory")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise DatabaseUrlError(f"job table {path}: directory {parent} is not writable")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseUrlError(
            f"job table {path}: cannot create directory {parent}: {exc.strerror}"
        ) from None
    try:
        # created owner-only: the job table holds the fleet's layout and the audit trail
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise DatabaseUrlError(f"job table {path}: cannot create it: {exc.strerror}") from None


def explain_connect_error(url: str, exc: BaseException) -> str:
    """One line for an operator: what failed opening the job table (no password, no traceback)."""
    full = normalize_url(url)
    parsed = make_url(full)
    if parsed.get_backend_name() == "sqlite":
        return f"cannot open the job table {parsed.database}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
    if isinstance(exc, ConnectionRefusedError | socket.gaierror) or "refused" in str(exc).lower():
        return f"cannot open the job table: connection refused at {where}"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "://" in text:
        text = safe_url(text)
    return f"cannot open the job table at {where}: {type(exc).__name__}: {text}"


def create_engine(url: str) -> AsyncEngine:
    """SQLAlchemy's async engine on the job table: migrations and report queries (not the hot path)."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        # NullPool: a pooled aiosqlite connection keeps a thread that polls its queue every few ms for the
        # whole run (6% of the run's CPU, measured); reports open a connection when they need one
        engine = create_async_engine(url, connect_args={"timeout": 30}, poolclass=pool.NullPool)
        _configure_sqlite(engine)
        return engine
    from orchestrator.store.sql import PG_SETTINGS

    return create_async_engine(
        url, pool_size=3, max_overflow=5, connect_args={"server_settings": PG_SETTINGS, "timeout": 10}
    )


def _configure_sqlite(engine: AsyncEngine) -> None:
    _configure_sqlite_sync(engine.sync_engine)


def _configure_sqlite_sync(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see module docstring)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        # FULL: a committed intent survives a power cut of the jump host, not only a killed process.
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def migrations_dir() -> Path:
    """Where Alembic's scripts are: inside the installed package (wheel) or the checkout (editable)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("orchestrator's Alembic migrations are missing from this installation")


def alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config  # Alembic is only needed when migrating: keep start-up light

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


# The newest migration's revision id. Every command opens the job table, and loading Alembic to learn
# that nothing needs migrating costs about a second a command (import and script scan); one SELECT of
# ``alembic_version`` against this constant answers the common case. A unit test compares it with
# Alembic's own head, so a new migration that forgets to move it fails the suite instead of going unrun.
HEAD_REVISION = "0006"


async def stored_revisions(engine: AsyncEngine) -> set[str] | None:
    """The revisions recorded in the job table, or None when it has no ``alembic_version`` table yet."""
    async with engine.connect() as conn:
        has_table = await conn.run_sync(lambda c: inspect(c).has_table("alembic_version"))
        if not has_table:
            return None
        rows = await conn.execute(text("SELECT version_num FROM alembic_version"))
        return {str(r[0]) for r in rows}


async def ensure_current(engine: AsyncEngine) -> None:
    """Bring the job table to this release's schema, running Alembic only when it is behind."""
    if await stored_revisions(engine) == {HEAD_REVISION}:
        return
    await upgrade(engine)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    from alembic import command

    def _run(conn: Connection) -> None:
        command.upgrade(alembic_config(conn), revision)

    async with engine.begin() as conn:
        await conn.run_sync(_run)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    from alembic import command

    def _run(conn: Connection) -> None:
        command.downgrade(alembic_config(conn), revision)

    async with engine.begin() as conn:
        await conn.run_sync(_run)


async def current_revision(engine: AsyncEngine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    def _rev(conn: Connection) -> str | None:
        return MigrationContext.configure(conn).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(_rev)
