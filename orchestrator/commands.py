"""One coroutine per command: open the job table, do the thing, print what an operator needs to read."""

from __future__ import annotations

import json
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from orchestrator import reporting
from orchestrator.errors import EXIT_OK, EXIT_STOPPED, EXIT_USAGE, UsageError
from orchestrator.options import RunOptions
from orchestrator.states import JobStatus, RunStatus
from orchestrator.store import JobStore, RunRow, open_store
from orchestrator.store import db as dbmod
from orchestrator.store.store import describe_url, utcnow

# ``service`` (the engine, aiohttp, the cloud client, pydantic inventories) is imported by the commands
# that send calls: status, report, flagged and retry answer without loading it.


@asynccontextmanager
async def opened(db: str | None) -> Any:
    try:
        store = await open_store(db)
    except dbmod.DatabaseUrlError:
        raise
    except Exception as exc:
        # connection errors carry the URL; print the masked form only
        raise UsageError(
            f"cannot open the job table {describe_url(db)}: {type(exc).__name__}: "
            f"{dbmod.safe_url(str(exc)) if '://' in str(exc) else str(exc).splitlines()[0]}"
        ) from None
    try:
        yield store
    finally:
        await store.close()


async def _find(store: JobStore, ref: str | None, *, unfinished: bool = False) -> RunRow:
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


def _abs(path: str) -> str:
    return str(Path(path).resolve())


# --------------------------------------------------------------------- run
async def run_inventory(
    inventory: str,
    db: str | None,
    name: str | None,
    policy_file: str | None,
    resume_mode: str | None,
    kw: dict[str, Any],
    out: Console,
    err: Console,
) -> int:
    from orchestrator import service
    from orchestrator.cli import _build

    options = _build(RunOptions(), kw)
    inv = service.load(inventory, options.endpoint_override)
    options = service.options_with_policy(options, inv, policy_file)
    service.check_credentials_config(os.environ)  # a half-configured credential creates no run
    async with opened(db) as store:
        existing = await store.latest_run(unfinished=True, inventory_path=_abs(inventory))
        if existing is not None and resume_mode != "new":
            if resume_mode != "resume":
                if sys.stdin.isatty() and click.confirm(
                    f"run {existing.id} ({existing.name}) of this inventory is "
                    f"{existing.status.value}; resume it?",
                    default=True,
                ):
                    resume_mode = "resume"
                else:
                    raise UsageError(
                        f"run {existing.id} ({existing.name}) of this inventory is unfinished "
                        f"({existing.status.value}): pass --resume to continue it or --new-run to start over"
                    )
            return await _resume(store, existing, kw, out, err, inventory=inventory)
        run = await store.create_run(
            name=name or service.default_run_name(inventory),
            inventory_path=_abs(inventory),
            inventory_sha256=inv.sha256,
            options=options.to_dict(),
            jobs=service.entries_as_jobs(inv),
            now=utcnow(),
        )
        err.print(
            f"run {run.id} ({run.name}): {inv.count} proxies, rate {options.rate}, "
            f"concurrency {options.concurrency}, job table {describe_url(db)}"
        )
        return await _drive_and_summarize(store, run, options, "runner", out, err)


async def resume_run(
    run_ref: str | None, db: str | None, kw: dict[str, Any], out: Console, err: Console
) -> int:
    async with opened(db) as store:
        run = await _find(store, run_ref, unfinished=run_ref is None)
        return await _resume(store, run, kw, out, err, inventory=None)


async def _resume(
    store: JobStore, run: RunRow, kw: dict[str, Any], out: Console, err: Console, *, inventory: str | None
) -> int:
    from orchestrator import service
    from orchestrator.cli import _build

    counts = await store.counts(run.id)
    if run.status is RunStatus.FINISHED and not any(
        counts[s]
        for s in (
            JobStatus.PENDING,
            JobStatus.RETRY_WAIT,
            JobStatus.UNKNOWN,
            JobStatus.IN_FLIGHT,
            JobStatus.ACCEPTED,
        )
    ):
        out.print(f"run {run.id} ({run.name}) is already finished; nothing to do")
        out.print(reporting.counts_table(run, counts))
        return service.exit_code_for(counts, True)
    options = _build(RunOptions.from_dict(run.options), kw)
    path = inventory or run.inventory_path
    inv = service.load(path, options.endpoint_override) if os.path.exists(path) else None
    # the runner lock first: a refused resume must not touch a run another process is working on
    worker_id = await service.register(store, run, options, role="runner", console=err)
    if options != RunOptions.from_dict(run.options):
        await store.set_run_options(run.id, options.to_dict())
    if inv is not None:
        if inv.sha256 != run.inventory_sha256:
            diff = await service.diff_inventory(store, run, inv)
            err.print(
                f"the inventory {path} changed since run {run.id} started "
                f"(+{len(diff.added)} added, -{len(diff.removed)} removed, "
                f"{len(diff.retargeted)} with a new target):"
            )
            await service.apply_diff(store, run, diff, lambda s: err.print(s, markup=False))
            await store.set_run_inventory(run.id, _abs(path), inv.sha256)
    else:
        err.print(f"note: the run's inventory {path} is gone; resuming from the job table alone")
    left = sum(n for s, n in counts.items() if not s.terminal)
    err.print(f"resuming run {run.id} ({run.name}): {left} jobs not finished")
    return await _drive_and_summarize(store, run, options, "runner", out, err, worker_id=worker_id)


async def join_run(run_ref: str | None, db: str | None, out: Console, err: Console) -> int:
    async with opened(db) as store:
        run = await _find(store, run_ref, unfinished=run_ref is None)
        if run.status is RunStatus.FINISHED:
            out.print(f"run {run.id} is finished; nothing to do")
            return EXIT_OK
        options = RunOptions.from_dict(run.options)
        err.print(f"joining run {run.id} ({run.name}) as a worker")
        return await _drive_and_summarize(store, run, options, "worker", out, err)


async def _drive_and_summarize(
    store: JobStore,
    run: RunRow,
    options: RunOptions,
    role: str,
    out: Console,
    err: Console,
    *,
    worker_id: str | None = None,
) -> int:
    from orchestrator import service

    result = await service.drive(store, run, options, role=role, console=err, worker_id=worker_id)
    fresh = await store.get_run(run.id) or run
    counts = await store.counts(run.id)
    if result.message and result.exit_code == EXIT_USAGE:
        raise UsageError(result.message)
    out.print(reporting.counts_table(fresh, counts))
    problems = counts[JobStatus.FLAGGED] + counts[JobStatus.FAILED]
    if problems:
        out.print(f"{problems} proxies need an operator: orchestrator flagged {run.id}")
    if result.exit_code in (EXIT_STOPPED, 2) and result.message:
        left = sum(
            n
            for s, n in counts.items()
            if not s.terminal and not (s is JobStatus.ACCEPTED and not options.wait)
        )
        err.print(f"stopped: {result.message}")
        err.print(f"{left} jobs not finished; continue with: orchestrator resume {run.id}")
    return result.exit_code


# ------------------------------------------------------------------ reads
async def show_status(run_ref: str | None, db: str | None, out: Console) -> None:
    async with opened(db) as store:
        if run_ref is None:
            runs = await store.list_runs()
            if not runs:
                out.print("no runs yet")
                return
            t = Table(title="runs")
            for col in ("id", "name", "status", "created", "finished", "proxies", "problems"):
                t.add_column(col)
            for r in runs:
                c = await store.counts(r.id)
                t.add_row(
                    str(r.id),
                    r.name,
                    r.status.value,
                    f"{r.created_at:%Y-%m-%d %H:%M}",
                    f"{r.finished_at:%Y-%m-%d %H:%M}" if r.finished_at else "",
                    str(sum(c.values())),
                    str(c[JobStatus.FLAGGED] + c[JobStatus.FAILED]),
                )
            out.print(t)
            return
        run = await _find(store, run_ref)
        out.print(reporting.counts_table(run, await store.counts(run.id)))
        if run.stop_reason:
            out.print(f"last stop: {run.stop_reason}")
        workers = await store.live_workers(run.id, utcnow())
        claimed = await store.claimed_counts(run.id)
        if workers:
            t = Table(title="live workers")
            for col in ("role", "host", "pid", "since", "last heartbeat", "claimed now", "claimed total"):
                t.add_column(col)
            for w in workers:
                t.add_row(
                    w.role,
                    w.host,
                    str(w.pid),
                    f"{w.started_at:%H:%M:%S}",
                    f"{w.heartbeat_at:%H:%M:%S}",
                    str(claimed.get(w.id, 0)),
                    str(w.claimed),
                )
            out.print(t)
        else:
            out.print("no live workers")


async def show_report(
    run_ref: str, db: str | None, fmt: str, statuses: list[JobStatus], out: Console
) -> None:
    async with opened(db) as store:
        run = await _find(store, run_ref)
        rows = await reporting.report_rows(store, run.id, statuses or None)
        if fmt == "table":
            out.print(reporting.counts_table(run, await store.counts(run.id)))
        reporting.render_report(rows, fmt, out)


async def show_flagged(run_ref: str | None, db: str | None, out: Console) -> None:
    async with opened(db) as store:
        run = await _find(store, run_ref)
        rows = await reporting.report_rows(store, run.id, [JobStatus.FLAGGED, JobStatus.FAILED])
        if not rows:
            out.print(f"run {run.id}: nothing needs an operator")
            return
        out.print(f"run {run.id} ({run.name}): {len(rows)} proxies need an operator")
        for r in rows:
            out.print(f"- {r.status} {r.proxy_id} (instance {r.instance_id}): {r.reason}", markup=False)
            if r.hint:
                out.print(f"    hint: {r.hint}", markup=False)
            if r.rule:
                out.print(f"    rule: {r.rule}", markup=False)


async def requeue(
    run_ref: str, db: str | None, want_flagged: bool, want_failed: bool, proxies: list[str], out: Console
) -> None:
    async with opened(db) as store:
        run = await _find(store, run_ref)
        statuses = []
        if want_flagged or not want_failed:
            statuses.append(JobStatus.FLAGGED)
        if want_failed or not want_flagged:
            statuses.append(JobStatus.FAILED)
        n = await store.requeue(run.id, statuses=statuses, proxy_ids=proxies or None, now=utcnow())
        if proxies:
            known = {j.proxy_id for j in await store.jobs(run.id)}
            missing = [p for p in proxies if p not in known]
            if missing:
                raise UsageError(f"not in run {run.id}: {', '.join(missing)}")
        out.print(f"re-queued {n} jobs of run {run.id}; send them with: orchestrator resume {run.id}")


async def db_upgrade(db: str | None, out: Console) -> None:
    async with opened(db) as store:
        rev = await dbmod.current_revision(store.engine)
        out.print(f"job table {describe_url(db)} is at revision {rev}")


async def db_current(db: str | None, out: Console) -> None:
    engine = dbmod.create_engine(dbmod.normalize_url(db))
    try:
        out.print(str(await dbmod.current_revision(engine)))
    finally:
        await engine.dispose()


# ------------------------------------------------------------------- plan
async def plan(
    inventory: str,
    rate: str,
    concurrency: int,
    call_timeout: float,
    endpoint: str | None,
    fmt: str,
    out: Console,
) -> int:
    from orchestrator import service
    from orchestrator.planner import make_plan, render_plan

    inv = service.load(inventory, endpoint)
    result = await make_plan(
        inv, rate=rate, concurrency=concurrency, call_timeout=call_timeout, endpoint=endpoint
    )
    if fmt == "json":
        out.print_json(json.dumps(result.as_dict()))
    else:
        render_plan(result, out)
    return EXIT_OK if not result.unreachable else 1
