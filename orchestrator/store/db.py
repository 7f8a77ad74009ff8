"""Engine creation and schema migration, for SQLite and PostgreSQL alike.

SQLite needs care to survive many concurrent writers: WAL, a busy timeout, foreign keys, and an explicit
``BEGIN IMMEDIATE`` (Python's sqlite3 does not begin before DDL/SELECT, so without it a read-then-write
transaction can deadlock into "database is locked"). Migrations run inside the already running event loop
through ``run_sync`` (Alembic's async template would call ``asyncio.run`` and fail there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect, pool, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

# Locations are plain strings (store/urls.py): these names stay importable from here.
from orchestrator.store.urls import (
    DEFAULT_DB,
    DatabaseUrlError,
    asyncpg_dsn,
    check_target,
    explain_connect_error,
    normalize_url,
    safe_url,
    sqlite_path,
)

__all__ = [
    "DEFAULT_DB",
    "HEAD_REVISION",
    "DatabaseUrlError",
    "asyncpg_dsn",
    "check_target",
    "create_engine",
    "current_revision",
    "downgrade",
    "ensure_current",
    "explain_connect_error",
    "normalize_url",
    "safe_url",
    "sqlite_path",
    "stored_revisions",
    "upgrade",
]


def create_engine(url: str) -> AsyncEngine:
    """SQLAlchemy's async engine on the job table: migrations and report queries (not the hot path)."""
    url = normalize_url(url)
    if sqlite_path(url) is not None or url.startswith("sqlite"):
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
    """An Alembic ``Config`` on this installation's migrations; with ``connection``, ``env.py`` migrates
    over it (inside the running loop, the cookbook recipe) instead of opening its own. Raises
    ``FileNotFoundError`` when the migrations are not installed."""
    from alembic.config import Config  # Alembic is only needed when migrating: keep start-up light

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


from orchestrator.store.schema import HEAD_REVISION  # noqa: E402 (re-exported; see store/schema.py)


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


# Serialises migrations of one PostgreSQL job table: two processes started together on a fresh database
# would both run CREATE TABLE and one would fail on a duplicate catalog entry. (SQLite: BEGIN IMMEDIATE.)
MIGRATION_LOCK = 0x6F72_FFFF_0002


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Migrate the job table up to ``revision`` in one transaction (Alembic's errors propagate)."""
    from alembic import command

    def _run(conn: Connection) -> None:
        command.upgrade(alembic_config(conn), revision)

    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # held to the commit; Alembic then reads the revision the other process committed
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        await conn.run_sync(_run)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    """Migrate the job table down to ``revision`` in one transaction (for the migration tests)."""
    from alembic import command

    def _run(conn: Connection) -> None:
        command.downgrade(alembic_config(conn), revision)

    async with engine.begin() as conn:
        await conn.run_sync(_run)


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision Alembic sees as current (None: not migrated yet)."""
    from alembic.runtime.migration import MigrationContext

    def _rev(conn: Connection) -> str | None:
        return MigrationContext.configure(conn).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(_rev)
