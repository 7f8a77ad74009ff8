"""A new SQLite job table at the current schema in one transaction, from a snapshot of what the
migrations build (the idea of Rails' ``db:schema:load``: a fresh database loads the schema, it does not
replay every migration).

Why: running Alembic on a new file costs about 0.65 s of CPU per process (importing Alembic and
SQLAlchemy, then six migrations, most of them SQLite table rebuilds), paid by every first ``run`` on a
new job table and by every test that starts from one. Loading the snapshot with the standard library's
``sqlite3`` takes a few milliseconds.

The snapshot (``store/schema_sqlite.sql``) is the migrations' own result: SQLite keeps the exact
``CREATE`` statement of every table, index, view and trigger in ``sqlite_master``; the statements of a
file migrated by Alembic, in the order SQLite holds them, are replayed here, with the revision row.
``tests/unit/test_fresh_schema.py`` migrates a new file with Alembic and fails, naming the command that
regenerates the snapshot (``python -m orchestrator.store.fresh``), whenever the two differ. Existing
files, ``orchestrator db upgrade`` and PostgreSQL always go through Alembic.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from orchestrator.store.schema import HEAD_REVISION

SQLITE_BUSY_S = 30.0
SNAPSHOT = Path(__file__).with_name("schema_sqlite.sql")
REVISION_MARK = "-- revision: "


def read_snapshot(path: Path = SNAPSHOT) -> tuple[str | None, list[str]]:
    """(revision, statements) of a snapshot file: ``-- revision: R`` in its header, then the statements,
    each ended by ``;`` (split with ``sqlite3.complete_statement``, so a ``;`` inside a string or a
    view's text does not end one). (None, []) when the file is missing."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, []
    revision: str | None = None
    statements: list[str] = []
    buf = ""
    for line in text.splitlines(keepends=True):
        if not buf and line.startswith("--"):
            if line.startswith(REVISION_MARK):
                revision = line[len(REVISION_MARK) :].strip()
            continue
        if not buf and not line.strip():
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            statements.append(buf.strip().removesuffix(";").rstrip())
            buf = ""
    return revision, statements


def schema_statements(conn: sqlite3.Connection) -> list[str]:
    """The ``CREATE`` statements SQLite holds for a job table, in its own order (tables before the
    indexes and views made on them); SQLite's internal tables and the automatic indexes of UNIQUE and
    PRIMARY KEY constraints (which have no statement) are left out."""
    rows = conn.execute(
        "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
    ).fetchall()
    return [str(r[0]) for r in rows]


def create_sqlite_at_head(path: str, statements: Sequence[str] | None = None) -> bool:
    """Create the job table in the SQLite file at ``path`` from the snapshot, in one ``BEGIN IMMEDIATE``
    transaction (a crash leaves the file without a table, never half a schema). Returns True when the
    table is at ``HEAD_REVISION`` afterwards (made here, or by a process that won the write lock first),
    False when the file holds other tables (an older job table, or something else): Alembic decides those.
    ``statements`` replaces the snapshot (tests). Raises ``sqlite3.Error`` as the driver does."""
    if statements is None:
        revision, statements = read_snapshot()
        if revision != HEAD_REVISION or not statements:  # left behind by a new migration: not used
            return False
    conn = sqlite3.connect(path, isolation_level=None, timeout=SQLITE_BUSY_S)
    try:
        conn.execute("PRAGMA journal_mode=WAL")  # what every later connection sets; not inside a transaction
        conn.execute("BEGIN IMMEDIATE")
        try:
            names = {
                str(r[0])
                for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
                )
            }
            if names:
                done = False
                if "alembic_version" in names:
                    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
                    done = row is not None and str(row[0]) == HEAD_REVISION
                conn.execute("ROLLBACK")
                return done
            for sql in statements:
                conn.execute(sql)
            conn.execute("INSERT INTO alembic_version (version_num) VALUES (?)", (HEAD_REVISION,))
            conn.execute("COMMIT")
            return True
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()


def render(revision: str, statements: Sequence[str]) -> str:
    """The text of ``store/schema_sqlite.sql`` for these statements."""
    head = (
        "-- The SQLite job table as the migrations build it. Generated: python -m orchestrator.store.fresh\n"
        "-- (after adding a migration); do not edit by hand. store/fresh.py says how it is used.\n"
        f"{REVISION_MARK}{revision}\n\n"
    )
    return head + "".join(f"{sql};\n\n" for sql in statements)


def alembic_statements(path: Path) -> list[str]:
    """Migrate the SQLite file at ``path`` with Alembic (a new file: the whole chain) and read back its
    statements (``schema_statements``): what the snapshot must equal."""
    import asyncio

    from orchestrator.store import db

    async def go() -> None:
        engine = db.create_engine(f"sqlite:///{path}")
        try:
            await db.upgrade(engine)
        finally:
            await engine.dispose()

    asyncio.run(go())
    conn = sqlite3.connect(path)
    try:
        return schema_statements(conn)
    finally:
        conn.close()


def main() -> None:
    """Regenerate ``store/schema_sqlite.sql`` from the migrations (run after adding one)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        statements = alembic_statements(Path(tmp) / "jobs.db")
    SNAPSHOT.write_text(render(HEAD_REVISION, statements), encoding="utf-8")
    print(f"wrote {SNAPSHOT}")


if __name__ == "__main__":
    main()
