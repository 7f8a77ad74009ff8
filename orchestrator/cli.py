"""The command line: parse, call one application coroutine (``orchestrator.app``), map the result to an
exit code. Nothing else happens here.

Exit codes (``orchestrator.errors``): 0 every job done without problems; 1 finished with flagged or failed
jobs; 2 bad input, usage, credentials, or refused (held by another live process); 3 stopped before
finishing (a signal, a lost database, the window closed): ``resume`` continues; 4 halted by the failure
breaker: a person must decide (``resume --ack`` or ``--max-failures``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
from rich.console import Console

from orchestrator.errors import (
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_USAGE,
    DatabaseUnavailable,
    InputErrors,
    UsageError,
)
from orchestrator.limiter import parse_rate
from orchestrator.observe import SafeStream, configure_logging, notice
from orchestrator.startup import settle
from orchestrator.states import JobStatus, RunStatus

# Heavy modules (SQLAlchemy, aiohttp, Alembic) are imported inside the commands that need them, so
# `--help`, `validate` and usage errors answer at once.

T = TypeVar("T")
_log_format = {"fmt": "console"}  # as chosen by --log-format (main reports a crash in it)
out = Console(file=SafeStream(sys.stdout), highlight=False, soft_wrap=True)  # type: ignore[arg-type]
if not out.is_terminal and "COLUMNS" not in os.environ:
    out.width = 160  # reports piped to a file or a pager: do not fold ids and reasons at 80 columns


class Fail(Exception):
    """A one-line error for the operator, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# The command's main task while its event loop runs: SIGTERM cancels it (see _on_signal).
_main: dict[str, Any] = {"task": None, "signalled": False}


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    settle()  # the command's modules are loaded: freeze them out of the collector's reach
    try:
        return asyncio.run(_guard(coro_fn))
    except KeyboardInterrupt:  # a signal outside a run's own handler (start-up, a read command)
        notice("interrupted")
        raise SystemExit(EXIT_STOPPED) from None
    except asyncio.CancelledError:
        if not _main["signalled"]:
            raise
        notice("interrupted")
        raise SystemExit(EXIT_STOPPED) from None
    finally:
        _main["task"] = None


async def _guard(coro_fn: Callable[[], Awaitable[T]]) -> T:
    _main["task"] = asyncio.current_task()
    try:
        return await coro_fn()
    except InputErrors as exc:
        for problem in exc.errors:
            notice(f"error: {problem}")
        raise Fail("", EXIT_USAGE) from None
    except UsageError as exc:
        raise Fail(str(exc)) from None
    except DatabaseUnavailable as exc:
        raise Fail(str(exc), EXIT_STOPPED) from None


def _rate(_ctx: click.Context, _p: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parse_rate(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _textfile(_ctx: click.Context, _p: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from orchestrator.metrics import check_textfile_path

    try:
        check_textfile_path(value)  # refused before the run starts, not silently after it
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _since(_ctx: click.Context, _p: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"expected a date or time such as 2026-12-01 or 2026-12-01T08:00+08:00, got {value!r}"
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


db_option = click.option(
    "--db",
    "db",
    envvar="ORCHESTRATOR_DB",
    default=None,
    help=(
        "Job table: a SQLite file or URL, or postgresql://... "
        "[default: ./orchestrator.db; env ORCHESTRATOR_DB]"
    ),
)
tz_option = click.option(
    "--tz", help="Show times in this IANA zone [env TZ, else UTC]; stored times stay UTC"
)


def run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options a run is made of (stored on the run; ``resume`` may change them)."""
    opts = [
        click.option(
            "--rate", callback=_rate, help="Max call starts per period, e.g. 10/s or 300/min [10/s]"
        ),
        click.option("--concurrency", type=click.IntRange(1, 1000), help="Max calls in flight [8]"),
        click.option(
            "--timeout", type=click.FloatRange(0.1, 600), help="Seconds per call, from its start [30]"
        ),
        click.option("--endpoint", help="Send every call to this base URL (https; http only for loopback)"),
        click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False), help="CA file for TLS"),
        click.option("--wait/--no-wait", default=None, help="Follow workflows to their end [--wait]"),
        click.option("--preflight/--no-preflight", default=None, help="Read versions before upgrading"),
        click.option("--poll-initial", type=click.FloatRange(0), hidden=True),
        click.option(
            "--poll-interval", type=click.FloatRange(0.01), help="Seconds between workflow checks [10]"
        ),
        click.option(
            "--poll-timeout", type=click.FloatRange(1), help="Give up waiting for a workflow [3600]"
        ),
        click.option(
            "--window",
            help="Maintenance window: ISO 8601 START/PT4H or START/END, or weekly "
            "'Sat 01:00-05:00 Asia/Shanghai' (several: ';') [inventory window:]",
        ),
        click.option("--cutoff", help="No new upgrade call after window end minus this (30m, 10s) [0s]"),
        click.option(
            "--wait-for-window", is_flag=True, default=None, help="Started outside the window: wait for it"
        ),
        click.option("--waves", help="Canary waves: counts or percentages, e.g. 1,5,25%,100% (last repeats)"),
        click.option(
            "--order", type=click.Choice(["inventory", "shuffle", "instance"]), help="Wave order [inventory]"
        ),
        click.option("--pause-between", help="Pause between waves (10m)"),
        click.option("--confirm", is_flag=True, default=None, help="Ask before each wave after the first"),
        click.option("--max-failures", help="Halt (exit 4) when failures exceed N or P%% of finished jobs"),
        click.option(
            "--per-instance",
            type=click.IntRange(1, 100),
            help="Proxies of one instance upgraded at once, until the workflow ends [1]",
        ),
        click.option(
            "--db-outage-timeout", type=click.FloatRange(0), help="Wait this long for a lost job table [60]"
        ),
        click.option("--reconcile-grace", type=click.FloatRange(0), hidden=True),
        click.option("--lease", type=click.FloatRange(0.5), hidden=True),
        click.option("--heartbeat", type=click.FloatRange(0.1), hidden=True),
        click.option("--drain-timeout", type=click.FloatRange(0), hidden=True),
        click.option("--seed", type=int, hidden=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def process_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """What belongs to this process only (never stored on the run)."""
    opts = [
        click.option(
            "--notify",
            help="POST a JSON summary here when the run finishes, pauses or halts [inventory notify:]",
        ),
        click.option("--yes", is_flag=True, help="Answer yes to --confirm (off a terminal)"),
        click.option("--progress/--no-progress", default=None, help="Progress display [on a terminal]"),
        click.option(
            "--metrics-port", type=click.IntRange(0, 65535), help="Serve Prometheus metrics on this port"
        ),
        click.option(
            "--metrics-host", default="127.0.0.1", show_default=True, help="Address the metrics bind to"
        ),
        click.option(
            "--metrics-textfile",
            type=click.Path(dir_okay=False),
            callback=_textfile,
            help="Write metrics for node_exporter's textfile collector (.prom)",
        ),
        tz_option,
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _proc(kw: dict[str, Any]) -> Any:
    from orchestrator.app.runs import ProcessOptions

    return ProcessOptions(
        notify=kw.pop("notify", None),
        yes=bool(kw.pop("yes", False)),
        progress=kw.pop("progress", None),
        metrics_port=kw.pop("metrics_port", None),
        metrics_host=kw.pop("metrics_host", "127.0.0.1"),
        metrics_textfile=kw.pop("metrics_textfile", None),
        tz=kw.pop("tz", None),
    )


# ------------------------------------------------------------------ group
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--log-format",
    type=click.Choice(["console", "plain", "json"]),
    default="console",
    help="Log lines on stderr: console on a terminal, key=value otherwise, or json",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@click.version_option(package_name="orchestrator")
def main_group(log_format: str, log_level: str) -> None:
    """Upgrade fleets of GaussDB(for MySQL) proxies, safely and with an audit trail."""
    _log_format["fmt"] = log_format
    configure_logging(fmt=log_format, level=log_level)


@main_group.command()
@click.argument("inventory", type=click.Path(dir_okay=False))
@click.option("--endpoint", help="Endpoint override (then region/endpoint may be left out)")
def validate(inventory: str, endpoint: str | None) -> None:
    """Check an inventory file (and its policy and window); print a summary or every error (exit 2)."""

    async def go() -> None:
        from orchestrator.inventory import load_inventory, summarize
        from orchestrator.policy import inventory_policy

        inv = load_inventory(inventory, endpoint_override=endpoint)
        inventory_policy(inv)
        if inv.window is not None:
            from orchestrator.schedule.window import parse_window

            try:
                parse_window(inv.window)
            except ValueError as exc:
                raise UsageError(f"{inv.path}:{inv.window_line}: window: {exc}") from None
        out.print(summarize(inv), markup=False)

    _run(go)


@main_group.command()
@click.argument("inventory", type=click.Path(dir_okay=False))
@db_option
@click.option("--name", help="Run name [inventory name + time]")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False), help="Outcome policy YAML file")
@click.option("--resume", "resume_mode", flag_value="resume", help="Resume this inventory's unfinished run")
@click.option("--new-run", "resume_mode", flag_value="new", help="Start a new run even if one is unfinished")
@run_options
@process_options
def run(
    inventory: str,
    db: str | None,
    name: str | None,
    policy_file: str | None,
    resume_mode: str | None,
    **kw: Any,
) -> None:
    """Upgrade every proxy in INVENTORY (YAML or CSV)."""
    from orchestrator.app.runs import run_inventory

    proc = _proc(kw)
    raise SystemExit(
        _run(
            lambda: run_inventory(
                inventory,
                db=db,
                name=name,
                policy_file=policy_file,
                resume_mode=resume_mode,
                kw=kw,
                proc=proc,
                out=out,
            )
        )
    )


@main_group.command()
@click.argument("run_ref", metavar="[RUN]", required=False)
@db_option
@click.option("--ack", is_flag=True, help="Acknowledge the failures so far (a halted run continues)")
@run_options
@process_options
def resume(run_ref: str | None, db: str | None, ack: bool, **kw: Any) -> None:
    """Continue a stopped, paused, halted or crashed run (default: the newest unfinished one)."""
    from orchestrator.app.runs import resume_run

    proc = _proc(kw)
    raise SystemExit(_run(lambda: resume_run(run_ref, db=db, kw=kw, ack=ack, proc=proc, out=out)))


@main_group.command()
@click.argument("run_ref", metavar="[RUN]", required=False)
@db_option
@process_options
def worker(run_ref: str | None, db: str | None, **kw: Any) -> None:
    """Join a run started by `run` (here or on another host; PostgreSQL job table) until it is finished."""
    from orchestrator.app.runs import join_run

    proc = _proc(kw)
    raise SystemExit(_run(lambda: join_run(run_ref, db=db, proc=proc, out=out)))


@main_group.command()
@click.argument("run_ref", metavar="[RUN]", required=False)
@db_option
@tz_option
@click.option("--since", callback=_since, help="Runs created since (no RUN)")
@click.option("--status", "statuses", multiple=True, type=click.Choice([s.value for s in RunStatus]))
def status(
    run_ref: str | None, db: str | None, tz: str | None, since: datetime | None, statuses: Sequence[str]
) -> None:
    """A run's counts, window, wave, failures and live workers (no RUN: the recent runs)."""
    from orchestrator.app.reads import show_status

    _run(lambda: show_status(run_ref, db=db, tz=tz, since=since, statuses=statuses, out=out))


@main_group.command()
@db_option
@tz_option
@click.option("--since", callback=_since, help="Runs created since this date or time")
@click.option("--status", "statuses", multiple=True, type=click.Choice([s.value for s in RunStatus]))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
def runs(db: str | None, tz: str | None, since: datetime | None, statuses: Sequence[str], fmt: str) -> None:
    """The runs in this job table, newest first."""
    from orchestrator.app.reads import show_runs

    _run(lambda: show_runs(db=db, since=since, statuses=statuses, tz=tz, fmt=fmt, out=out))


@main_group.command()
@click.argument("run_ref", metavar="RUN")
@db_option
@tz_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "html"]), default="table")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to this file (html: required)")
@click.option("--status", "statuses", multiple=True, type=click.Choice([s.value for s in JobStatus]))
def report(
    run_ref: str, db: str | None, tz: str | None, fmt: str, output: str | None, statuses: Sequence[str]
) -> None:
    """Every job of RUN with its state, versions, times, workflows, reason and hint (html: a window
    report)."""
    from orchestrator.app.reads import show_report

    _run(lambda: show_report(run_ref, db=db, fmt=fmt, statuses=statuses, tz=tz, output=output, out=out))


@main_group.command()
@click.argument("run_ref", metavar="[RUN]", required=False)
@db_option
@tz_option
@click.option("--rule", help="Only this rule's group")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
def flagged(run_ref: str | None, db: str | None, tz: str | None, rule: str | None, fmt: str) -> None:
    """What needs an operator, grouped by rule with counts and one hint per group."""
    from orchestrator.app.reads import show_flagged

    _run(lambda: show_flagged(run_ref, db=db, rule=rule, fmt=fmt, tz=tz, out=out))


@main_group.command()
@db_option
@tz_option
@click.option("--proxy", help="A proxy id")
@click.option("--instance", help="An instance id")
@click.option("--since", callback=_since, help="Only what happened since this date or time")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
def history(
    db: str | None, tz: str | None, proxy: str | None, instance: str | None, since: datetime | None, fmt: str
) -> None:
    """Every attempt, workflow and state change of a proxy or instance across all runs, oldest first."""
    from orchestrator.app.reads import show_history

    _run(lambda: show_history(db=db, proxy=proxy, instance=instance, since=since, fmt=fmt, tz=tz, out=out))


@main_group.command()
@click.argument("run_ref", metavar="RUN")
@db_option
@tz_option
@click.option("--flagged", "want_flagged", is_flag=True, help="Re-queue flagged jobs")
@click.option("--failed", "want_failed", is_flag=True, help="Re-queue failed jobs")
@click.option("--proxy", "proxies", multiple=True, help="Only this proxy id (repeatable)")
@click.option("--rule", "rules", multiple=True, help="Only jobs flagged by this rule (repeatable)")
def retry(
    run_ref: str,
    db: str | None,
    tz: str | None,
    want_flagged: bool,
    want_failed: bool,
    proxies: Sequence[str],
    rules: Sequence[str],
) -> None:
    """Move chosen flagged/failed jobs of RUN back to pending (history kept); then `resume` sends them."""
    from orchestrator.app.operator import requeue

    if not (want_flagged or want_failed or proxies or rules):
        raise Fail("retry: say what to re-queue: --flagged, --failed, --rule RULE and/or --proxy ID")
    _run(
        lambda: requeue(
            run_ref,
            db=db,
            want_flagged=want_flagged,
            want_failed=want_failed,
            proxies=list(proxies),
            rules=list(rules),
            tz=tz,
            out=out,
        )
    )


@main_group.command()
@click.argument("inventory", type=click.Path(dir_okay=False))
@db_option
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False), help="Outcome policy YAML file")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--name", hidden=True)
@click.option("--resume", "resume_mode", flag_value="resume", hidden=True)
@click.option("--new-run", "resume_mode", flag_value="new", hidden=True)
@run_options
@process_options
def plan(inventory: str, db: str | None, policy_file: str | None, fmt: str, **kw: Any) -> None:
    """Preflight only: what `run` would do for each proxy, and how long, with no upgrade call.

    Takes every option `run` takes (so a run's command line plans with `run` replaced by `plan`); the
    ones about the job table and this process are accepted and not used."""
    from orchestrator.app.plan import plan_inventory

    # accepted like run's: the plan reads the cloud, not the job table, and is no run
    del db
    _proc(kw)
    kw.pop("name", None)
    kw.pop("resume_mode", None)
    raise SystemExit(
        _run(lambda: plan_inventory(inventory, kw=kw, policy_file=policy_file, fmt=fmt, out=out))
    )


@main_group.command()
@click.option("--project-id", required=True, help="The project to list")
@click.option("--region", help="Its region (the endpoint follows)")
@click.option("--endpoint", help="Endpoint override (https; http only for loopback)")
@click.option("--name-glob", help="Only instances whose name matches (fnmatch)")
@click.option(
    "--target", default="latest", show_default=True, help="latest, or a version such as 2.24.03.000"
)
@click.option("--rate", callback=_rate, default="10/s", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the inventory here [stdout]")
def discover(
    project_id: str,
    region: str | None,
    endpoint: str | None,
    name_glob: str | None,
    target: str,
    rate: str,
    output: str | None,
) -> None:
    """Build an inventory from the cloud: instances, their proxies, each proxy's current and latest
    version."""
    from orchestrator.app.discover import discover_inventory

    raise SystemExit(
        _run(
            lambda: discover_inventory(
                project_id=project_id,
                region=region,
                endpoint=endpoint,
                name_glob=name_glob,
                target=target,
                output=output,
                rate=rate,
                out=out,
            )
        )
    )


@main_group.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8443, show_default=True)
@click.option("--scenario", type=click.Path(exists=True, dir_okay=False), help="Scenario YAML [bundled demo]")
@click.option("--log-file", type=click.Path(dir_okay=False), help="Append every call as a JSON line")
@click.option("--ready-file", type=click.Path(dir_okay=False), help="Write the URL here once listening")
@click.option(
    "--export-inventory",
    type=click.Path(dir_okay=False),
    help="Write an inventory for the scenario's fleet and exit",
)
def simulator(
    host: str,
    port: int,
    scenario: str | None,
    log_file: str | None,
    ready_file: str | None,
    export_inventory: str | None,
) -> None:
    """Serve the GaussDB proxy API offline, over a scenario's fleet (rehearse a window)."""
    from orchestrator.simulator import Scenario, run_simulator, scenario_to_inventory
    from orchestrator.simulator.scenario import ScenarioError, load_bundled

    if export_inventory:
        try:
            sc = Scenario.load(scenario) if scenario else load_bundled()
        except ScenarioError as exc:
            raise Fail(str(exc)) from None
        scenario_to_inventory(
            sc, export_inventory, fmt="csv" if export_inventory.endswith(".csv") else "yaml"
        )
        out.print(f"wrote {export_inventory}", markup=False)
        return
    settle()
    try:
        run_simulator(scenario, host, port, log_file, ready_file)
    except ScenarioError as exc:
        raise Fail(str(exc)) from None


@main_group.command()
@click.option("--db", default="orchestrator-demo.db", show_default=True, help="SQLite file for the demo run")
@click.option("--proxies", type=click.IntRange(1, 100000), default=None, help="Fleet size [bundled: ~300]")
def demo(db: str, proxies: int | None) -> None:
    """Rehearse a window end to end: embedded simulator, a few hundred proxies, SQLite, a report."""
    from orchestrator.app.demo import run_demo

    raise SystemExit(_run(lambda: run_demo(db, proxies, out)))


@main_group.group("db")
def db_group() -> None:
    """Job table schema."""


@db_group.command("upgrade")
@db_option
def db_upgrade(db: str | None) -> None:
    """Apply the migrations (every command that writes the job table does this first)."""

    async def go() -> None:
        from orchestrator.app.common import opened
        from orchestrator.store import db as dbmod
        from orchestrator.store import describe_url

        async with opened(db, create=True) as store:
            out.print(
                f"job table {describe_url(db)} is at revision {await dbmod.current_revision(store.engine)}",
                markup=False,
            )

    _run(go)


@db_group.command("current")
@db_option
def db_current(db: str | None) -> None:
    """Print the job table's schema revision."""

    async def go() -> None:
        from orchestrator.store import db as dbmod

        dbmod.check_target(db, create=False)
        engine = dbmod.create_engine(dbmod.normalize_url(db))
        try:
            out.print(str(await dbmod.current_revision(engine)), markup=False)
        finally:
            await engine.dispose()

    _run(go)


def _on_signal(signum: int, _frame: object) -> None:
    """SIGTERM outside a run's own graceful handler (start-up, a read command, the end of a run): stop with
    exit 3, not 143, nothing half-written (every write is a transaction).

    While a command's event loop runs, the main task is cancelled, as ``asyncio.Runner`` does for SIGINT:
    it unwinds its ``async with`` blocks in order (the store commits what is queued and closes). Raising
    KeyboardInterrupt there would land in whatever task runs at that instant (the store's writer, say),
    leave it dead with an exception and print a traceback at shutdown. Outside the loop it is raised."""
    task = _main["task"]
    if task is not None and not task.done():
        _main["signalled"] = True
        # from a handler in the loop's thread: call_soon_threadsafe also wakes a loop waiting in select()
        task.get_loop().call_soon_threadsafe(task.cancel)
        return
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: click's usage errors and ours become one line on stderr and exit code 2."""
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        main_group.main(
            args=list(argv) if argv is not None else None, prog_name="orchestrator", standalone_mode=False
        )
    except click.UsageError as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx else ""
        notice(f"error: {where}{exc.format_message()}")
        raise SystemExit(EXIT_USAGE) from None
    except click.Abort:
        notice("aborted")
        raise SystemExit(EXIT_STOPPED) from None
    except click.ClickException as exc:
        notice(f"error: {exc.format_message()}")
        raise SystemExit(exc.exit_code) from None
    except Fail as exc:
        if str(exc):
            notice(f"error: {exc}")
        raise SystemExit(exc.code) from None
    except KeyboardInterrupt:
        notice("interrupted")
        raise SystemExit(EXIT_STOPPED) from None
    except Exception as exc:
        if _log_format["fmt"] != "json":
            raise  # a bug: the traceback is what a report of it needs
        # a log shipper reads stderr line by line: the traceback goes inside one JSON event
        import traceback

        import structlog

        structlog.get_logger("orchestrator").critical(
            "crash", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
        )
        raise SystemExit(1) from None
    raise SystemExit(EXIT_OK)
