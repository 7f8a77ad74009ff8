"""The command line: parse, build typed options, run one coroutine, map the result to an exit code.

Exit codes: 0 every job done without problems; 1 finished with flagged or failed jobs; 2 bad input,
usage, credentials or a run held by another process; 3 stopped before finishing (resume continues it).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import click
from rich.console import Console

from orchestrator.errors import EXIT_OK, EXIT_STOPPED, EXIT_USAGE, InputErrors, UsageError
from orchestrator.limiter import parse_rate
from orchestrator.observe import NoticeConsole, configure_logging
from orchestrator.options import RunOptions
from orchestrator.states import JobStatus

# Heavy modules (SQLAlchemy, aiohttp, Alembic) are imported inside the commands that need them, so
# `--help`, `validate` and usage errors answer at once.

T = TypeVar("T")
out = Console(highlight=False, soft_wrap=True)
err = NoticeConsole(stderr=True, highlight=False, soft_wrap=True)
if not out.is_terminal and "COLUMNS" not in os.environ:
    out.width = 160  # reports piped to a file or a pager: do not fold ids and reasons at 80 columns


class Fail(Exception):
    """A one-line error for the operator, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return asyncio.run(_guard(coro_fn))
    except KeyboardInterrupt:  # Ctrl-C outside a run's own handler (e.g. during start-up)
        err.print("interrupted")
        raise SystemExit(EXIT_STOPPED) from None


async def _guard(coro_fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return await coro_fn()
    except InputErrors as exc:
        for problem in exc.errors:
            err.print(f"error: {problem}", markup=False)
        raise Fail("", EXIT_USAGE) from None
    except UsageError as exc:
        raise Fail(str(exc)) from None


def _rate(_ctx: click.Context, _p: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parse_rate(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


db_option = click.option(
    "--db",
    "db",
    envvar="ORCHESTRATOR_DB",
    default=None,
    help="Job table: a SQLite file or URL, or postgresql://... "
    "[default: ./orchestrator.db; env ORCHESTRATOR_DB]",
)


def run_options(f: Callable[..., Any]) -> Callable[..., Any]:
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
        click.option("--reconcile-grace", type=click.FloatRange(0), hidden=True),
        click.option("--lease", type=click.FloatRange(0.5), hidden=True),
        click.option("--heartbeat", type=click.FloatRange(0.1), hidden=True),
        click.option("--drain-timeout", type=click.FloatRange(0), hidden=True),
        click.option("--seed", type=int, hidden=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


_OPTION_KEYS = {
    "rate": "rate",
    "concurrency": "concurrency",
    "timeout": "timeout",
    "endpoint": "endpoint_override",
    "ca_bundle": "ca_bundle",
    "wait": "wait",
    "preflight": "preflight",
    "poll_initial": "poll_initial",
    "poll_interval": "poll_interval",
    "poll_timeout": "poll_timeout",
    "reconcile_grace": "reconcile_grace",
    "lease": "lease",
    "heartbeat": "heartbeat",
    "drain_timeout": "drain_timeout",
    "seed": "seed",
}


def _overrides(kw: dict[str, Any]) -> dict[str, Any]:
    return {_OPTION_KEYS[k]: v for k, v in kw.items() if k in _OPTION_KEYS and v is not None}


def _build(base: RunOptions, kw: dict[str, Any]) -> RunOptions:
    try:
        return base.override(**_overrides(kw))
    except ValueError as exc:
        raise Fail(f"bad option: {exc}") from None


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
    configure_logging(fmt=log_format, level=log_level)
    err.json_lines = log_format == "json"


@main_group.command()
@click.argument("inventory", type=click.Path(dir_okay=False))
@click.option("--endpoint", help="Endpoint override (then region/endpoint may be left out)")
def validate(inventory: str, endpoint: str | None) -> None:
    """Check an inventory file; print a summary or every error (exit 2)."""

    async def go() -> None:
        from orchestrator.inventory import load_inventory, summarize

        inv = load_inventory(inventory, endpoint_override=endpoint)
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
def run(
    inventory: str,
    db: str | None,
    name: str | None,
    policy_file: str | None,
    resume_mode: str | None,
    **kw: Any,
) -> None:
    """Upgrade every proxy in INVENTORY (YAML or CSV)."""
    from orchestrator import commands

    code = _run(lambda: commands.run_inventory(inventory, db, name, policy_file, resume_mode, kw, out, err))
    raise SystemExit(code)


@main_group.command()
@click.argument("run_ref", metavar="[RUN]", required=False)
@db_option
@run_options
def resume(run_ref: str | None, db: str | None, **kw: Any) -> None:
    """Continue a stopped or crashed run (default: the newest unfinished one)."""
    from orchestrator import commands

    raise SystemExit(_run(lambda: commands.resume_run(run_ref, db, kw, out, err)))


@main_group.command()
@click.argument("run_ref", metavar="[RUN]", required=False)
@db_option
def worker(run_ref: str | None, db: str | None) -> None:
    """Join a run started by `run` (here or on another host) and work until it is finished."""
    from orchestrator import commands

    raise SystemExit(_run(lambda: commands.join_run(run_ref, db, out, err)))


@main_group.command()
@click.argument("run_ref", metavar="[RUN]", required=False)
@db_option
def status(run_ref: str | None, db: str | None) -> None:
    """A run's counts by status and its live workers (no RUN: the recent runs)."""
    from orchestrator import commands

    _run(lambda: commands.show_status(run_ref, db, out))


@main_group.command()
@click.argument("run_ref", metavar="RUN")
@db_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@click.option("--status", "statuses", multiple=True, type=click.Choice([s.value for s in JobStatus]))
def report(run_ref: str, db: str | None, fmt: str, statuses: Sequence[str]) -> None:
    """Every job of RUN with its state, workflows, reason and hint."""
    from orchestrator import commands

    _run(lambda: commands.show_report(run_ref, db, fmt, [JobStatus(s) for s in statuses], out))


@main_group.command()
@click.argument("run_ref", metavar="[RUN]", required=False)
@db_option
def flagged(run_ref: str | None, db: str | None) -> None:
    """What needs an operator: flagged and failed jobs with reason and hint."""
    from orchestrator import commands

    _run(lambda: commands.show_flagged(run_ref, db, out))


@main_group.command()
@click.argument("run_ref", metavar="RUN")
@db_option
@click.option("--flagged", "want_flagged", is_flag=True, help="Re-queue flagged jobs")
@click.option("--failed", "want_failed", is_flag=True, help="Re-queue failed jobs")
@click.option("--proxy", "proxies", multiple=True, help="Only this proxy id (repeatable)")
def retry(
    run_ref: str, db: str | None, want_flagged: bool, want_failed: bool, proxies: Sequence[str]
) -> None:
    """Move chosen flagged/failed jobs of RUN back to pending (history kept); then `resume` sends them."""
    from orchestrator import commands

    if not (want_flagged or want_failed or proxies):
        raise Fail("retry: say what to re-queue: --flagged, --failed and/or --proxy ID")
    _run(lambda: commands.requeue(run_ref, db, want_flagged, want_failed, list(proxies), out))


@main_group.command()
@click.argument("inventory", type=click.Path(dir_okay=False))
@click.option("--rate", callback=_rate, default="10/s", show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 1000), default=8, show_default=True)
@click.option("--timeout", type=click.FloatRange(0.1, 600), default=30.0, show_default=True)
@click.option("--endpoint", help="Send every call to this base URL")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def plan(inventory: str, rate: str, concurrency: int, timeout: float, endpoint: str | None, fmt: str) -> None:
    """Preflight only: what `run` would do for each proxy, with no upgrade call."""
    from orchestrator import commands

    raise SystemExit(_run(lambda: commands.plan(inventory, rate, concurrency, timeout, endpoint, fmt, out)))


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
        if export_inventory.endswith(".csv"):
            scenario_to_inventory(sc, export_inventory, fmt="csv")
        else:
            scenario_to_inventory(sc, export_inventory, fmt="yaml")
        out.print(f"wrote {export_inventory}")
        return
    try:
        run_simulator(scenario, host, port, log_file, ready_file)
    except ScenarioError as exc:
        raise Fail(str(exc)) from None


@main_group.command()
@click.option("--db", default="orchestrator-demo.db", show_default=True, help="SQLite file for the demo run")
@click.option("--proxies", type=click.IntRange(1, 100000), default=None, help="Fleet size [bundled: ~300]")
def demo(db: str, proxies: int | None) -> None:
    """Rehearse a window end to end: embedded simulator, a few hundred proxies, SQLite, a report."""
    from orchestrator import demo as demo_mod

    raise SystemExit(_run(lambda: demo_mod.run_demo(db, proxies, out, err)))


@main_group.group("db")
def db_group() -> None:
    """Job table schema."""


@db_group.command("upgrade")
@db_option
def db_upgrade(db: str | None) -> None:
    """Apply the migrations (every command that touches the job table does this first)."""
    from orchestrator import commands

    _run(lambda: commands.db_upgrade(db, out))


@db_group.command("current")
@db_option
def db_current(db: str | None) -> None:
    """Print the job table's schema revision."""
    from orchestrator import commands

    _run(lambda: commands.db_current(db, out))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: click's usage errors and ours become one line on stderr and exit code 2."""
    try:
        main_group.main(
            args=list(argv) if argv is not None else None, prog_name="orchestrator", standalone_mode=False
        )
    except click.UsageError as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx else ""
        err.print(f"error: {where}{exc.format_message()}", markup=False)
        raise SystemExit(EXIT_USAGE) from None
    except click.Abort:
        err.print("aborted")
        raise SystemExit(EXIT_STOPPED) from None
    except click.ClickException as exc:
        err.print(f"error: {exc.format_message()}", markup=False)
        raise SystemExit(exc.exit_code) from None
    except Fail as exc:
        if str(exc):
            err.print(f"error: {exc}", markup=False)
        raise SystemExit(exc.code) from None
    raise SystemExit(EXIT_OK)
