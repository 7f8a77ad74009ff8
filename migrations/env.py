"""Alembic environment: runs on the connection the orchestrator hands over (see store/db.py).

Run from the command line (``alembic -c ...``) it opens its own synchronous connection from
``sqlalchemy.url`` or ``ORCHESTRATOR_DB`` instead.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool

from orchestrator.store.models import Base

target_metadata = Base.metadata
config = context.config


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("ORCHESTRATOR_DB", "")
    url = url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg")
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.begin() as conn:
        _run(conn)
