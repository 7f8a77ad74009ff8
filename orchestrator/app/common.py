"""What every command shares: opening the job table, finding a run, printing outside text safely."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo

from orchestrator.errors import UsageError
from orchestrator.store import JobStore, RunRow, open_store
from orchestrator.store import urls as dbmod


@contextlib.asynccontextmanager
async def opened(db: str | None, *, create: bool, outage_timeout: float = 60.0) -> AsyncIterator[JobStore]:
    """The job table at ``db`` (``create``: run-like commands may create it; read-only ones refuse a
    missing one, naming it). Every failure to open is one line for the operator (UsageError)."""
    try:
        store = await open_store(db, create=create, outage_timeout=outage_timeout)
    except dbmod.DatabaseUrlError:
        raise
    except Exception as exc:
        raise UsageError(dbmod.explain_connect_error(db or "", exc)) from None
    try:
        yield store
    finally:
        with contextlib.suppress(Exception):
            await store.close()


async def find_run(store: JobStore, ref: str | None, *, unfinished: bool = False) -> RunRow:
    """The run ``ref`` names (an id, or the newest run of that name); with ``ref`` None the newest run
    (the newest unfinished one when ``unfinished``). Raises ``UsageError`` when there is none."""
    if ref is None:
        run = await store.latest_run(unfinished=unfinished)
        if run is None:
            raise UsageError(
                "no unfinished run in this job table" if unfinished else "no run in this job table"
            )
        return run
    run = await store.find_run(ref)
    if run is None:
        raise UsageError(f"no run {ref!r} in this job table")
    return run


def abspath(path: str) -> str:
    """``path`` made absolute with symlinks resolved: how a run records its inventory file."""
    return str(Path(path).resolve())


def zone_name(tz: str | None) -> str:
    """The IANA name times are shown in: ``--tz`` (refused when unknown), else ``TZ`` when it names a zone
    (a POSIX rule or a path in ``TZ`` is not one: then UTC, labelled), else UTC. Stored times stay UTC."""
    import os

    if tz:
        try:
            return str(ZoneInfo(tz.removeprefix(":")).key)
        except Exception:
            raise UsageError(f"--tz: unknown time zone {tz!r} (an IANA name such as Asia/Shanghai)") from None
    env = (os.environ.get("TZ") or "").removeprefix(":")
    try:
        return str(ZoneInfo(env).key) if env else "UTC"
    except Exception:
        from orchestrator.observe import notice

        notice(f"note: TZ={env!r} is not an IANA zone name: times are shown in UTC (use --tz)")
        return "UTC"


def zone(tz: str | None) -> tzinfo:
    """The zone of ``zone_name(tz)``."""
    return ZoneInfo(zone_name(tz))


def show_time(t: datetime | None, tz: tzinfo, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    """A time for a person, with its zone: ``2026-12-05 01:00:03 UTC`` / ``... CST``."""
    if t is None:
        return ""
    local = t.astimezone(tz)
    return f"{local.strftime(fmt)} {local.tzname() or ''}".strip()


def utcnow() -> datetime:
    """This host's clock now, as an aware UTC datetime."""
    return datetime.now(UTC)
