"""Read-only commands: ``status``, ``runs``, ``report``, ``flagged``, ``history``. They refuse a job table
that does not exist (naming it) instead of creating an empty one, and show times with their zone."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from orchestrator.app.common import find_run, opened, show_time, zone, zone_name
from orchestrator.errors import UsageError
from orchestrator.states import JobStatus, RunStatus
from orchestrator.store import JobStore, RunRow


def counts_table(
    run: RunRow, counts: Mapping[JobStatus, int] | Mapping[str, int], *, title: str | None = None
) -> Table:
    """The run's jobs by status as a table (``reporting.counts_table``); ``counts`` keyed by status
    values or ``JobStatus`` members."""
    from orchestrator import reporting

    return reporting.counts_table(run, {str(k): v for k, v in counts.items()}, title=title)


async def show_status(
    run_ref: str | None,
    *,
    db: str | None,
    tz: str | None,
    since: datetime | None,
    statuses: Sequence[str],
    out: Console,
) -> None:
    """No RUN: the recent runs (filtered); RUN: its counts, window, wave, breaker, why it stopped, workers."""
    tz = zone_name(tz)
    zone_ = zone(tz)
    async with opened(db, create=False) as store:
        if run_ref is None:
            await _runs(store, since=since, statuses=statuses, tz=tz, fmt="table", out=out)
            return
        run = await find_run(store, run_ref)
        counts = await store.counts(run.id)
        out.print(counts_table(run, counts))
        await _controls_lines(store, run, zone_, out)
        if run.stop_reason:
            out.print(Text(f"last stop: {run.stop_reason}"))
        elif run.status in (RunStatus.STOPPED, RunStatus.PAUSED, RunStatus.HALTED):
            out.print(Text(f"last stop: {run.status.value} (no reason recorded)"))
        workers = await store.live_workers(run.id)
        claimed = await store.claimed_counts(run.id)
        if workers:
            t = Table(title="live workers")
            for col in ("role", "host", "pid", "since", "last heartbeat", "claimed now", "claimed total"):
                t.add_column(col)
            for w in workers:
                t.add_row(
                    Text(w.role),
                    Text(w.host),
                    Text(str(w.pid)),
                    Text(show_time(w.started_at, zone_)),
                    Text(show_time(w.heartbeat_at, zone_, "%H:%M:%S")),
                    Text(str(claimed.get(w.id, 0))),
                    Text(str(w.claimed)),
                )
            out.print(t)
        else:
            out.print(Text("no live workers"))
            if run.status in (RunStatus.RUNNING, RunStatus.CREATED):
                # its process ended without marking the run (killed, or the job table was gone then)
                out.print(
                    Text(
                        f"run {run.id} is marked {run.status.value} but no process works on it: it stopped "
                        f"without marking the run; continue with: orchestrator resume {run.id}"
                    )
                )


async def _controls_lines(store: JobStore, run: RunRow, tz: Any, out: Console) -> None:
    """The window (in its own zone, and in ``tz`` when that differs), the open wave and what holds the
    next one back, failures against the threshold."""
    from orchestrator.app.controls import make_decider
    from orchestrator.options import RunOptions
    from orchestrator.schedule.dispatch import Confirm, Phase, Start, Stop, WaitUntil, window_phase

    try:
        options = RunOptions.from_dict(run.options)
    except ValueError:
        return
    state = await store.run_state(run.id, track=options.wait)
    window = options.window_spec()
    if window is not None:
        now = state.db_now
        ws = window_phase(now, window, options.cutoff_delta())
        out.print(Text(f"window: {options.window} (cutoff {options.cutoff})"))
        iv = ws.interval
        if iv is not None and ws.last_start is not None:
            start, end, last = (_when(t, iv.zone, tz) for t in (iv.start, iv.end, ws.last_start))
            line = {
                Phase.OPEN: f"open now, {start} - {end}; no new upgrade after {last}",
                Phase.CLOSING: f"closing: no new upgrade since {last}; the window ends {end}",
                Phase.OUTSIDE: f"closed; the next one opens {start}, ends {end}",
            }.get(ws.phase, "")
            out.print(Text(f"  {line}"))
        else:
            out.print(Text("  over: no later occurrence (resume --window W gives a new one)"))
    if state.waves > 1:
        wave = min(run.wave_open, state.waves)
        out.print(
            Text(
                f"wave: {wave} of {state.waves} open "
                f"({state.open_unfinished} jobs of the open waves not finished)"
            )
        )
    if run.status in (RunStatus.RUNNING, RunStatus.CREATED) and state.not_started:
        # what the controls say now (as a process that started now would see them)
        decision = make_decider(options, since=state.db_now, confirm=options.confirm)(state, 0)
        held = ""
        if isinstance(decision, Start):
            held = decision.note
        elif isinstance(decision, WaitUntil | Stop):
            held = decision.reason
        elif isinstance(decision, Confirm):
            held = f"wave {decision.wave} ({decision.size} proxies) awaits confirmation"
        if held:
            out.print(Text(f"held back: {held}"))
    breaker = options.breaker()
    counted = max(0, state.failures - run.failures_acked)
    acked = f", {run.failures_acked} acknowledged" if run.failures_acked else ""
    if breaker is not None:
        verdict = breaker.describe(counted, state.finished)
        limit = f"limit --max-failures {options.max_failures}"
        out.print(Text(f"failures: {counted} counted{acked} ({limit}): {verdict}"))
    elif state.failures:
        out.print(Text(f"failures: {counted} counted{acked} (no --max-failures limit)"))


def _when(t: datetime, window_zone: Any, tz: Any) -> str:
    """``Sat 2026-12-12 01:00 Asia/Shanghai``, then the viewer's reading (``--tz``/TZ, else UTC) when
    that zone is another one: ``(2026-12-11 17:00 UTC)``."""
    from orchestrator.schedule.window import format_instant, zone_name

    text = format_instant(t, window_zone)
    if zone_name(window_zone) != zone_name(tz):
        text += f" ({show_time(t, tz, '%Y-%m-%d %H:%M')})"
    return text


async def show_runs(
    *, db: str | None, since: datetime | None, statuses: Sequence[str], tz: str | None, fmt: str, out: Console
) -> None:
    """``orchestrator runs``: the runs newest first (created at or after ``since``, aware, and in one of
    ``statuses`` when given) with their counts, as a table, csv or json on ``out``. Raises ``UsageError``
    for a missing job table or an unknown ``tz``."""
    async with opened(db, create=False) as store:
        await _runs(store, since=since, statuses=statuses, tz=tz, fmt=fmt, out=out)


async def _runs(
    store: JobStore,
    *,
    since: datetime | None,
    statuses: Sequence[str],
    tz: str | None,
    fmt: str,
    out: Console,
) -> None:
    from orchestrator import reporting
    from orchestrator.store import reports

    tz_ = display_zone(tz)
    async with store.read() as conn:
        runs = await reports.list_runs(conn, since=since, statuses=list(statuses) or None)
    if fmt == "table":
        if not runs:
            out.print(Text("no runs" + (" matching" if since or statuses else " yet")))
            return
        out.print(reporting.runs_table(runs, tz=tz_))
    else:
        reporting.write_records([reporting.run_record(s, tz_) for s in runs], fmt, _stdout(out))


async def show_report(
    run_ref: str,
    *,
    db: str | None,
    fmt: str,
    statuses: Sequence[str],
    tz: str | None,
    output: str | None,
    out: Console,
) -> None:
    """``orchestrator report RUN``: every job of the run (only ``statuses`` when given) streamed as a
    table (after the counts), csv or json, to ``output`` or ``out``; ``html`` writes one self-contained
    window report to ``output`` (required). Times in ``tz``. Raises ``UsageError`` for a missing job
    table, run or ``-o`` (html), and ``OSError`` when ``output`` cannot be written."""
    from orchestrator import reporting
    from orchestrator.store import reports

    tz_ = display_zone(tz)
    async with opened(db, create=False) as store:
        run = await find_run(store, run_ref)
        async with store.read() as conn:
            if fmt == "html":
                data = await reports.window_report(conn, run.id)
                page = reporting.html_report(data, tz=tz_)
                if output is None:
                    raise UsageError("report --format html needs -o FILE (one self-contained page)")
                Path(output).write_text(page, encoding="utf-8")
                out.print(Text(f"wrote {output}"))
                return
            wanted = list(statuses) or None
            if fmt == "table":
                counts = await reports.status_counts(conn, run.id)
                out.print(counts_table(run, counts))
                rows = reports.report_rows(conn, run.id, statuses=wanted)
                await reporting.print_report_table(rows, out, tz=tz_)
                return
            parts = reports.report_parts(conn, run.id, statuses=wanted)
            if output:
                # Opened in a thread (creating or truncating a file may wait on the disk); the rows are then
                # written a chunk at a time from this task, as they stream in, which is what the report needs.
                fh = await asyncio.to_thread(open, output, "w", encoding="utf-8", newline="")
                with fh:
                    await reporting.write_report_parts(parts, fmt, fh, tz=tz_)
                return
            await reporting.write_report_parts(parts, fmt, _stdout(out), tz=tz_)


async def show_flagged(
    run_ref: str | None, *, db: str | None, rule: str | None, fmt: str, tz: str | None, out: Console
) -> None:
    """``orchestrator flagged [RUN]``: the run's flagged and failed jobs grouped by rule (only ``rule``
    when given), each with its reason and the hint to act on, as a table, csv or json. Raises
    ``UsageError`` for a missing job table or run."""
    from orchestrator import reporting
    from orchestrator.store import reports

    tz_ = display_zone(tz)
    async with opened(db, create=False) as store:
        run = await find_run(store, run_ref)
        async with store.read() as conn:
            groups = await reports.flagged_by_rule(conn, run.id, rule=rule)
        if fmt == "table":
            reporting.print_flagged(groups, out, run_id=run.id, run_name=run.name, tz=tz_)
        elif fmt == "csv":
            reporting.write_records(reporting.flagged_rows(groups, tz_), "csv", _stdout(out))
        else:
            reporting.write_records([reporting.flagged_record(g, tz_) for g in groups], "json", _stdout(out))


async def show_history(
    *,
    db: str | None,
    proxy: str | None,
    instance: str | None,
    since: datetime | None,
    fmt: str,
    tz: str | None,
    out: Console,
) -> None:
    """``orchestrator history``: every upgrade call, workflow and event of one proxy (``proxy``) or of
    each proxy of one instance (``instance``), across runs, since ``since`` (aware) when given, as a
    table, csv or json. Raises ``UsageError`` when neither is given or the job table is missing."""
    from orchestrator import reporting
    from orchestrator.store import reports

    if not (proxy or instance):
        raise UsageError("history: say which: --proxy ID or --instance ID")
    tz_ = display_zone(tz)
    async with opened(db, create=False) as store, store.read() as conn:
        entries = await reports.history(conn, proxy_id=proxy, instance_id=instance, since=since)
    what = f"proxy {proxy}" if proxy else f"instance {instance}"
    if fmt == "table":
        if not entries:
            out.print(Text(f"no history for {what}" + (" since then" if since else "")))
            return
        reporting.print_history(entries, out, tz=tz_, title=f"history of {what}")
    else:
        reporting.write_records([reporting.history_record(e, tz_) for e in entries], fmt, _stdout(out))


def display_zone(tz: str | None) -> tzinfo | None:
    """The zone the renderers show times in: ``--tz``, else ``TZ``, else UTC (None: the renderers' UTC,
    labelled "UTC"). Raises UsageError for an unknown zone."""
    z = zone(tz)
    return None if getattr(z, "key", None) in ("UTC", "Etc/UTC", "Etc/UCT", "UCT", "Zulu") else z


def _stdout(out: Console) -> TextIO:
    return out.file  # type: ignore[return-value]  # a text stream (the CLI's is a SafeStream over stdout)


RUN_STATUSES = [s.value for s in RunStatus]
