"""A new SQLite job table made from the schema snapshot is the table the migrations build, made in one
transaction (``orchestrator/store/fresh.py``)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from orchestrator.store import db, fresh
from orchestrator.store.gateway import open_store, stored_revision
from orchestrator.store.schema import HEAD_REVISION

REGENERATE = "regenerate it: python -m orchestrator.store.fresh"


def _items(body: str) -> list[str]:
    """The top-level comma-separated items of a CREATE TABLE body (commas inside parentheses or quotes
    do not split)."""
    items, depth, quote, cur = [], 0, "", ""
    for ch in body:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
            continue
        cur += ch
    items.append(cur.strip())
    return [i for i in items if i]


def schema(statements: list[str]) -> dict[str, object]:
    """The schema the statements make, in a form that ignores what carries no meaning: the order of a
    table's constraints and the order indexes and views were made in (Alembic's SQLite table rebuilds
    emit constraints in set order, which varies from one process to the next). Column order, types,
    defaults and every constraint's text are kept."""
    tables: dict[str, tuple[list[str], list[str]]] = {}
    others: set[str] = set()
    for sql in statements:
        head, _, rest = sql.partition("(")
        if head.upper().startswith("CREATE TABLE"):
            name = head.split()[2].strip('"')
            items = _items(rest.rsplit(")", 1)[0])
            columns = [i for i in items if not i.upper().startswith("CONSTRAINT")]
            constraints = sorted(i for i in items if i.upper().startswith("CONSTRAINT"))
            tables[name] = (columns, constraints)
        else:
            others.add(sql)
    return {"tables": tables, "others": others}


def statements_of(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return fresh.schema_statements(conn)
    finally:
        conn.close()


def tables_of(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()


def test_the_snapshot_is_what_the_migrations_build(tmp_path: Path) -> None:
    revision, statements = fresh.read_snapshot()
    assert revision == HEAD_REVISION, (
        f"the snapshot is at {revision}, the migrations at {HEAD_REVISION}: {REGENERATE}"
    )
    assert schema(statements) == schema(fresh.alembic_statements(tmp_path / "alembic.db")), (
        f"the snapshot differs from the migrations' result: {REGENERATE}"
    )


def test_a_file_made_from_the_snapshot_equals_a_migrated_one(tmp_path: Path) -> None:
    made = tmp_path / "fresh.db"
    assert fresh.create_sqlite_at_head(str(made)) is True
    assert schema(statements_of(made)) == schema(fresh.alembic_statements(tmp_path / "alembic.db"))
    assert asyncio.run(stored_revision(f"sqlite:///{made}")) == HEAD_REVISION
    conn = sqlite3.connect(made)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()

    # Alembic agrees it is at head: `db upgrade` has nothing to do
    async def current() -> str | None:
        engine = db.create_engine(f"sqlite:///{made}")
        try:
            return await db.current_revision(engine)
        finally:
            await engine.dispose()

    assert asyncio.run(current()) == HEAD_REVISION


def test_open_store_on_a_new_file_uses_the_snapshot_and_the_store_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_alembic(*a: object, **kw: object) -> None:
        raise AssertionError("Alembic ran on a new SQLite file")

    monkeypatch.setattr(db, "upgrade", no_alembic)
    path = tmp_path / "jobs.db"

    async def go() -> None:
        store = await open_store(f"sqlite:///{path}")
        await store.close()

    asyncio.run(go())
    assert statements_of(path) == fresh.read_snapshot()[1]


def test_a_file_at_head_is_left_alone_and_other_tables_are_left_to_alembic(tmp_path: Path) -> None:
    made = tmp_path / "fresh.db"
    assert fresh.create_sqlite_at_head(str(made)) is True
    before = statements_of(made)
    assert fresh.create_sqlite_at_head(str(made)) is True  # another process made it first
    assert statements_of(made) == before

    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE notes (x TEXT)")
    conn.commit()
    conn.close()
    assert fresh.create_sqlite_at_head(str(other)) is False
    assert tables_of(other) == {"notes"}

    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
    conn.execute("INSERT INTO alembic_version VALUES ('0001')")
    conn.commit()
    conn.close()
    assert fresh.create_sqlite_at_head(str(old)) is False  # an older table: Alembic migrates it
    assert tables_of(old) == {"alembic_version"}


def test_a_failure_halfway_leaves_no_table(tmp_path: Path) -> None:
    path = tmp_path / "half.db"
    _, statements = fresh.read_snapshot()
    broken = [*statements[:5], "CREATE TABLE broken (", *statements[5:]]
    with pytest.raises(sqlite3.Error):
        fresh.create_sqlite_at_head(str(path), broken)
    assert tables_of(path) == set()
    assert fresh.create_sqlite_at_head(str(path)) is True  # and the next start makes it whole
    assert statements_of(path) == statements


def test_a_snapshot_left_behind_by_a_new_migration_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, statements = fresh.read_snapshot()
    monkeypatch.setattr(fresh, "read_snapshot", lambda: ("0001", statements))
    path = tmp_path / "jobs.db"
    assert fresh.create_sqlite_at_head(str(path)) is False
    assert tables_of(path) == set()


def test_processes_starting_together_make_one_schema(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    results: list[bool] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def one() -> None:
        start.wait()
        try:
            results.append(fresh.create_sqlite_at_head(str(path)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [True] * 6
    assert statements_of(path) == fresh.read_snapshot()[1]


def test_the_schema_comparison_sees_a_change_of_meaning() -> None:
    """The comparison above ignores constraint order, and only that."""
    cols = "CREATE TABLE t (\n\ta INTEGER NOT NULL, \n\tb TEXT, \n\t"
    base = [cols + "CONSTRAINT pk PRIMARY KEY (a), \n\tCONSTRAINT u UNIQUE (a, b))"]
    reordered = [cols + "CONSTRAINT u UNIQUE (a, b), \n\tCONSTRAINT pk PRIMARY KEY (a))"]
    assert schema(base) == schema(reordered)
    for changed in (
        base[0].replace("b TEXT", "b INTEGER"),
        base[0].replace("UNIQUE (a, b)", "UNIQUE (b)"),
        base[0].replace("a INTEGER NOT NULL, \n\tb TEXT", "b TEXT, \n\ta INTEGER NOT NULL"),
        base[0].replace(", \n\tCONSTRAINT u UNIQUE (a, b)", ""),
    ):
        assert schema([changed]) != schema(base), changed
    assert schema([*base, "CREATE INDEX ix ON t (b)"]) != schema(base)


def test_snapshot_files_round_trip(tmp_path: Path) -> None:
    statements = ["CREATE TABLE a (x TEXT DEFAULT 'semi;colon')", "CREATE VIEW v AS SELECT x FROM a"]
    path = tmp_path / "snap.sql"
    path.write_text(fresh.render("0042", statements), encoding="utf-8")
    assert fresh.read_snapshot(path) == ("0042", statements)
    assert fresh.read_snapshot(tmp_path / "missing.sql") == (None, [])
