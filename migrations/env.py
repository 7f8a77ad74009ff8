"""Alembic environment: runs on the connection the orchestrator hands over (see store/db.py).

Run from the command line (``alembic -c alembic.ini upgrade head``) it opens its own connection from
``sqlalchemy.url`` or ``ORCHESTRATOR_DB``, through the same async drivers the orchestrator uses
(aiosqlite, asyncpg: no other database driver is a dependency), on an event loop of its own.

On PostgreSQL the migration holds a transaction-scoped advisory lock: processes started together on a
new database (a runner and its workers, two operators) migrate one after the other, and the later ones
find the schema current, instead of racing to create the same tables.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from orchestrator.store.models import Base

target_metadata = Base.metadata
config = context.config
MIGRATION_LOCK = 0x6F726368  # "orch": pg_advisory_xact_lock key of the schema migration


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_own(url: str) -> None:
    from orchestrator.store.db import create_engine

    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("ORCHESTRATOR_DB", "")
    if not url:
        raise SystemExit("alembic: set sqlalchemy.url in the config file or ORCHESTRATOR_DB to the job table")
    asyncio.run(_run_own(url))
