"""Issue acceptance: the Alembic migrations build exactly the schema the models describe, on SQLite and
PostgreSQL, and can be taken down to nothing and up again."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from orchestrator.store import db
from orchestrator.store.models import Base


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


def _diff(conn: Connection) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True, "render_as_batch": True})
    return list(compare_metadata(ctx, Base.metadata))


async def _run_sync(engine: Any, fn: Any) -> Any:
    async with engine.connect() as conn:
        return await conn.run_sync(fn)


async def _cycle(url: str) -> dict[str, Any]:
    engine = db.create_engine(url)
    seen: dict[str, Any] = {}
    try:
        seen["empty"] = await _run_sync(engine, _tables)
        seen["empty_rev"] = await db.current_revision(engine)

        await db.upgrade(engine)
        seen["head_rev"] = await db.current_revision(engine)
        seen["head_tables"] = await _run_sync(engine, _tables)
        seen["head_diff"] = await _run_sync(engine, _diff)

        await db.downgrade(engine, "base")
        seen["base_rev"] = await db.current_revision(engine)
        seen["base_tables"] = await _run_sync(engine, _tables)

        await db.upgrade(engine)
        seen["again_rev"] = await db.current_revision(engine)
        seen["again_diff"] = await _run_sync(engine, _diff)
        seen["again_tables"] = await _run_sync(engine, _tables)
    finally:
        await engine.dispose()
    return seen


def _head() -> str:
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(db.alembic_config()).get_heads()
    assert len(heads) == 1, f"the migrations must have one head, not {heads}"
    return heads[0]


@pytest.mark.empty_db  # migrates an empty database itself
def test_upgrade_matches_models_downgrade_to_base_upgrade_again(db_url: str) -> None:
    head = _head()
    seen = asyncio.run(_cycle(db_url))
    model_tables = set(Base.metadata.tables)
    assert {"runs", "jobs", "attempts", "workflows", "workers", "send_log"} <= model_tables

    assert seen["empty"] == set() and seen["empty_rev"] is None

    assert seen["head_rev"] == head
    assert seen["head_tables"] == model_tables | {"alembic_version"}
    assert seen["head_diff"] == [], "the migrations and the models disagree:\n" + "\n".join(
        map(repr, seen["head_diff"])
    )

    assert seen["base_rev"] is None
    assert seen["base_tables"] == {"alembic_version"}, seen["base_tables"]

    assert seen["again_rev"] == head
    assert seen["again_tables"] == model_tables | {"alembic_version"}
    assert seen["again_diff"] == [], seen["again_diff"]


@pytest.mark.empty_db  # migrates an empty database itself
def test_upgrade_is_idempotent_and_leaves_data(db_url: str) -> None:
    """Every command upgrades the table first: doing it on a table at head must change nothing."""
    from sqlalchemy import text

    async def go() -> tuple[str | None, int]:
        engine = db.create_engine(db_url)
        try:
            await db.upgrade(engine)
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO runs (name, inventory_path, inventory_sha256, status, created_at, "
                        "options) VALUES ('r', '/x', :sha, 'created', CURRENT_TIMESTAMP, '{}')"
                    ),
                    {"sha": "0" * 64},
                )
            await db.upgrade(engine)
            async with engine.connect() as conn:
                n = (await conn.execute(text("SELECT count(*) FROM runs"))).scalar_one()
            return await db.current_revision(engine), int(n)
        finally:
            await engine.dispose()

    rev, n = asyncio.run(go())
    assert rev == _head()
    assert n == 1


def test_head_constant_is_alembic_head() -> None:
    """Start-up compares the table's revision with HEAD_REVISION: a new migration must move it."""
    assert _head() == db.HEAD_REVISION


@pytest.mark.empty_db  # migrates an empty database itself
def test_ensure_current_migrates_an_empty_or_old_table_and_leaves_a_current_one(db_url: str) -> None:
    """Alembic runs when the table is missing or behind, and not at all when it is at head (a command's
    start-up then costs one query instead of loading Alembic)."""

    async def go() -> dict[str, Any]:
        engine = db.create_engine(db_url)
        seen: dict[str, Any] = {}
        try:
            seen["empty"] = await db.stored_revisions(engine)
            await db.ensure_current(engine)
            seen["after_empty"] = await db.stored_revisions(engine)
            await db.downgrade(engine, "base")  # behind: an empty version table, no job tables
            seen["behind"] = await db.stored_revisions(engine)
            await db.ensure_current(engine)
            seen["after_behind"] = await db.stored_revisions(engine)
            seen["tables"] = await _run_sync(engine, _tables)
            calls: list[str] = []
            real = db.upgrade

            async def counting(*a: Any, **k: Any) -> None:
                calls.append("upgrade")
                await real(*a, **k)

            db.upgrade = counting  # type: ignore[assignment]
            try:
                await db.ensure_current(engine)
            finally:
                db.upgrade = real  # type: ignore[assignment]
            seen["calls_at_head"] = calls
        finally:
            await engine.dispose()
        return seen

    seen = asyncio.run(go())
    head = {db.HEAD_REVISION}
    assert seen["empty"] is None
    assert seen["after_empty"] == head and seen["after_behind"] == head
    assert seen["behind"] == set()
    assert {"runs", "jobs", "attempts", "workflows"} <= seen["tables"]
    assert seen["calls_at_head"] == []
