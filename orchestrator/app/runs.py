"""``run``, ``resume`` and ``worker``: start or join a run, drive it in this process, say what happened.

The path of one run: validate the inventory and the options (nothing written on bad input) -> create the
run, its jobs, its waves and its runner registration in one transaction (refused while another live run
holds these proxies) -> ``drive``: build the runtime, probe the credentials with one read, run the engine
under signal handlers, leave the registration, mark the run finished / stopped / paused / halted, notify.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from orchestrator import startup
from orchestrator.app.common import abspath, find_run, opened
from orchestrator.app.runtime import build_cloud, build_runtime, check_credentials_config
from orchestrator.cloud.api import CloudApi
from orchestrator.engine import TAKEN_OVER, Engine, EngineResult
from orchestrator.errors import EXIT_HALTED, EXIT_OK, EXIT_PROBLEMS, EXIT_STOPPED, EXIT_USAGE, UsageError
from orchestrator.observe import RunEvents, notice
from orchestrator.options import RunOptions, build_options, cli_overrides
from orchestrator.outcomes import HttpFailure, TransportFailure, TransportKind, outcome_label
from orchestrator.runtime import Runtime
from orchestrator.schedule.dispatch import Confirm
from orchestrator.states import TERMINAL, JobStatus, RunStatus
from orchestrator.store import (
    DatabaseUnavailable,
    JobStore,
    NewJob,
    ProxiesHeld,
    RunLocked,
    RunRow,
    UnfinishedRun,
    describe_url,
    new_worker_id,
)


@dataclass(frozen=True)
class ProcessOptions:
    """What belongs to this process only (never stored on the run)."""

    notify: str | None = None
    yes: bool = False
    progress: bool | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_textfile: str | None = None
    tz: str | None = None
    # opened by ``with_metrics`` before anything is written (a port that cannot be bound refuses the run
    # before it exists, not after)
    metrics: Any = None
    metrics_server: Any = None


def with_metrics(proc: ProcessOptions) -> ProcessOptions:
    """``proc`` with its metrics opened (``--metrics-port`` bound now). Raises UsageError."""
    if proc.metrics is not None:
        return proc
    from dataclasses import replace

    m, server = _metrics(proc)
    return replace(proc, metrics=m, metrics_server=server)


def exit_code_for(counts: Mapping[JobStatus, int]) -> int:
    """A finished run's exit code from its counts by status: 1 when any job is flagged or failed, else 0."""
    if counts.get(JobStatus.FLAGGED, 0) or counts.get(JobStatus.FAILED, 0):
        return EXIT_PROBLEMS
    return EXIT_OK


def entries_as_jobs(inv: Any) -> Callable[[], Any]:
    """A fresh stream of the inventory's entries as job rows, each time it is called."""

    def stream() -> Any:
        for e in inv.entries():
            yield NewJob(
                project_id=e.project_id,
                instance_id=e.instance_id,
                proxy_id=e.proxy_id,
                endpoint=e.endpoint or "",
                target_version=e.target_version,
                source_version=e.source_version,
                region=e.region,
                x_language=e.x_language,
                name=e.name,
                line=e.line,
            )

    return stream


def load_inventory_checked(path: str, endpoint: str | None) -> Any:
    """The validated inventory at ``path`` (``endpoint``: ``--endpoint``, serving every entry). Raises
    ``InventoryErrors`` (an ``InputErrors``: every problem, one line each, exit 2)."""
    from orchestrator.inventory import load_inventory

    return load_inventory(path, endpoint_override=endpoint)


def options_for_inventory(
    base: RunOptions, kw: Mapping[str, Any], inv: Any, policy_file: str | None
) -> RunOptions:
    """The run's options: the command line over the inventory's ``window:``, and the resolved policy (a
    separate file wins over the inventory's ``policy:`` block), stored so a resume keeps them."""
    from orchestrator.policy import inventory_policy, load_policy_file, policy_to_dict

    policy = load_policy_file(policy_file) if policy_file else inventory_policy(inv)
    extra: dict[str, Any] = {"policy": policy_to_dict(policy)}
    if kw.get("window") is None and inv.window is not None:
        try:
            from orchestrator.schedule.window import parse_window

            parse_window(inv.window)
        except ValueError as exc:
            raise UsageError(f"{inv.path}:{inv.window_line}: window: {exc}") from None
        extra["window"] = inv.window
    try:
        return build_options(base, kw, **extra)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def wave_planner(options: RunOptions) -> Any:
    """The ``WavePlanner`` that ``create_run`` applies once: the rows put in ``--order`` (seeded with
    ``order_seed``) and cut into ``--waves``; None for one wave in inventory order (nothing to assign)."""
    spec = options.wave_spec()
    if spec is None and options.order == "inventory":
        return None
    from orchestrator.schedule.waves import ALL_AT_ONCE, order_keys

    spec = spec or ALL_AT_ONCE
    seed = options.order_seed or 0

    def plan(rows: list[tuple[int, str, str]]) -> tuple[list[int], list[int]]:
        ordered = order_keys(rows, options.order, seed)
        return [int(j) for j in ordered], spec.sizes(len(rows))

    return plan


# ----------------------------------------------------------------------------------------------- run
async def run_inventory(
    inventory: str,
    *,
    db: str | None,
    name: str | None,
    policy_file: str | None,
    resume_mode: str | None,
    kw: Mapping[str, Any],
    proc: ProcessOptions,
    out: Console,
    cloud: CloudApi | None = None,
) -> int:
    """``orchestrator run INVENTORY``: validate everything, create the run, drive it.

    Returns the exit code."""
    try:
        base = build_options(RunOptions(), kw)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    inv = load_inventory_checked(inventory, base.endpoint_override)
    options = options_for_inventory(base, kw, inv, policy_file)
    if options.waves is not None and options.order == "shuffle" and options.order_seed is None:
        from orchestrator.schedule.waves import new_seed

        options = options.override(order_seed=new_seed())
    notify_url = _notify_url(proc.notify, inv)
    proc = with_metrics(proc)
    if cloud is None:
        check_credentials_config()  # a half-configured credential creates no run
    async with opened(db, create=True, outage_timeout=options.db_outage_timeout) as store:
        worker_id = new_worker_id()
        try:
            run, _reg = await store.create_run(
                name=name or f"{Path(inventory).stem}-{datetime.now(UTC):%Y%m%d-%H%M%S}",
                inventory_path=abspath(inventory),
                inventory_sha256=inv.sha256,
                options=options.to_dict(),
                jobs=entries_as_jobs(inv),
                runner_id=worker_id,
                lease_s=options.lease,
                refuse_unfinished=resume_mode != "new",
                waves=wave_planner(options),
            )
        except UnfinishedRun as exc:
            # the inventory's window (unless the command line gives one) holds for the run it resumes: a
            # window edited in the file replaces the stored one, as resume --window would
            if kw.get("window") is None and inv.window is not None:
                kw = {**kw, "window": inv.window}
            return await _unfinished(store, exc.run, resume_mode, inventory, kw, proc, out, cloud)
        except ProxiesHeld as exc:
            raise UsageError(f"refused: {exc}") from None
        except RunLocked as exc:
            raise UsageError(f"refused: {exc}") from None
        notice(
            f"run {run.id} ({run.name}): {inv.count} proxies, rate {options.rate}, concurrency "
            f"{options.concurrency}, job table {describe_url(db)}"
        )
        return await drive(
            store,
            run,
            options,
            role="runner",
            worker_id=worker_id,
            proc=proc,
            out=out,
            cloud=cloud,
            notify_url=notify_url,
        )


async def _unfinished(
    store: JobStore,
    existing: RunRow,
    resume_mode: str | None,
    inventory: str,
    kw: Mapping[str, Any],
    proc: ProcessOptions,
    out: Console,
    cloud: CloudApi | None,
) -> int:
    live = await store.live_runs([existing.id])
    if existing.id in live:
        w = live[existing.id]
        raise UsageError(
            f"refused: run {existing.id} ({existing.name}) of this inventory is held by pid {w.pid} "
            f"on {w.host}, live (last heartbeat {w.heartbeat_at:%H:%M:%S} UTC)"
        )
    if (
        resume_mode != "resume"
        and existing.status is not RunStatus.PAUSED
        and not (
            sys.stdin.isatty()
            and await _ask(
                f"run {existing.id} ({existing.name}) of this inventory is "
                f"{existing.status.value}; resume it? [Y/n]",
                default=True,
            )
        )
    ):
        raise UsageError(
            f"run {existing.id} ({existing.name}) of this inventory is unfinished "
            f"({existing.status.value}): pass --resume to continue it or --new-run to start over"
        )
    if existing.status is RunStatus.PAUSED:
        notice(f"run {existing.id} ({existing.name}) of this inventory is paused: resuming it")
    return await resume_loaded(store, existing, kw=kw, proc=proc, out=out, inventory=inventory, cloud=cloud)


# -------------------------------------------------------------------------------------------- resume
async def resume_run(
    run_ref: str | None,
    *,
    db: str | None,
    kw: Mapping[str, Any],
    ack: bool,
    proc: ProcessOptions,
    out: Console,
    cloud: CloudApi | None = None,
) -> int:
    """``orchestrator resume [RUN]``: the run ``run_ref`` names (the newest unfinished one when None) in
    an existing job table, resumed (see ``resume_loaded``). Returns the exit code; raises ``UsageError``
    for a missing job table or run."""
    async with opened(db, create=False) as store:
        run = await find_run(store, run_ref, unfinished=run_ref is None)
        return await resume_loaded(
            store, run, kw=kw, proc=proc, out=out, inventory=None, ack=ack, cloud=cloud
        )


async def resume_loaded(
    store: JobStore,
    run: RunRow,
    *,
    kw: Mapping[str, Any],
    proc: ProcessOptions,
    out: Console,
    inventory: str | None,
    ack: bool = False,
    cloud: CloudApi | None = None,
) -> int:
    """Resume ``run``: its stored options with the command line's over them (a changed set is logged),
    the runner lock taken (``UsageError`` while another live process holds the run or its proxies),
    failures acknowledged with ``ack``, the changes of its inventory file applied (``inventory``, else
    the path the run recorded), then ``drive``. A finished run with nothing left prints its counts and
    returns its exit code at once. Returns the exit code."""
    counts = await store.counts(run.id)
    active = sum(n for s, n in counts.items() if s not in TERMINAL)
    if run.status is RunStatus.FINISHED and not active:
        out.print(Text(f"run {run.id} ({run.name}) is already finished; nothing to do"))
        from orchestrator.app.reads import counts_table

        out.print(counts_table(run, counts))
        return exit_code_for(counts)
    stored_raw = dict(run.options)
    for key in RunOptions.__dataclass_fields__:
        if key in cli_overrides(kw):
            stored_raw.pop(key, None)  # replaced by the command line: a bad stored value may be corrected
    stored = RunOptions.stored(stored_raw, run.id)
    try:
        # every way an option enters a run goes through RunOptions' validation (the endpoint validator)
        options = build_options(stored, kw)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    proc = with_metrics(proc)
    # the runner lock first: a refused resume must not touch a run another process is working on
    try:
        reg = await store.register(run.id, role="runner", lease_s=options.lease, exclusive=True)
    except (RunLocked, ProxiesHeld) as exc:
        raise UsageError(f"refused: {exc}") from None
    for dead in reg.taken_over:
        notice(f"took over from a dead process: pid {dead.pid} on {dead.host}")
    try:
        now_opts = options.to_dict()
        changed = [k for k, v in now_opts.items() if run.options.get(k, getattr(RunOptions(), k)) != v]
        if changed:
            await store.set_run_options(run.id, options.to_dict(), changed)
        if ack:
            n = await store.ack_failures(run.id, "acknowledged by an operator (resume --ack)")
            notice(f"acknowledged {n} failures: the breaker counts from here")
        await _apply_inventory_changes(store, run, inventory, options)
    except BaseException:
        with contextlib.suppress(Exception):
            await store.leave(reg.worker_id)
        raise
    left = sum(n for s, n in counts.items() if s not in TERMINAL)
    notice(f"resuming run {run.id} ({run.name}): {left} jobs not finished")
    path = inventory or run.inventory_path

    def notify_url() -> str | None:
        # read only when a notification is due (the end of the run): parsing a 100k inventory here
        # would delay the first call by seconds
        inv = None
        if not proc.notify and os.path.exists(path):
            with contextlib.suppress(Exception):
                inv = load_inventory_checked(path, options.endpoint_override)
        return _notify_url(proc.notify, inv)

    return await drive(
        store,
        run,
        options,
        role="runner",
        worker_id=reg.worker_id,
        proc=proc,
        out=out,
        cloud=cloud,
        notify_url=notify_url,
    )


async def _apply_inventory_changes(
    store: JobStore, run: RunRow, inventory: str | None, options: RunOptions
) -> None:
    """A changed inventory: new proxies join the run, removed ones are skipped if never sent, a changed
    target applies to proxies not yet sent. Unchanged (same bytes) is known without parsing it."""
    from orchestrator.inventory import file_sha256

    path = inventory or run.inventory_path
    if not os.path.exists(path):
        notice(f"note: the run's inventory {path} is gone; resuming from the job table alone")
        return
    if file_sha256(path) == run.inventory_sha256:
        return
    inv = load_inventory_checked(path, options.endpoint_override)
    existing = await store.job_keys(run.id)
    seen: set[tuple[str, str, str]] = set()
    added: list[NewJob] = []
    retargeted: list[tuple[Any, str]] = []
    for j in entries_as_jobs(inv)():
        key = (j.project_id, j.instance_id, j.proxy_id)
        seen.add(key)
        job = existing.get(key)
        if job is None:
            added.append(j)
        elif job.target_version != j.target_version:
            retargeted.append((job, j.target_version))
    removed = [job for key, job in existing.items() if key not in seen]
    notice(
        f"the inventory {path} changed since run {run.id} started "
        f"(+{len(added)} added, -{len(removed)} removed, {len(retargeted)} with a new target):"
    )
    if added:
        n = await store.add_jobs(run.id, added, wave=max(1, run.wave_open))
        notice(f"  added to the run: {n} proxies new in the inventory")
    for job in removed:
        if job.status is JobStatus.PENDING and await store.skip_removed(
            job, "removed from the inventory before it was sent"
        ):
            notice(f"  removed from the inventory, skipped (never sent): proxy {job.proxy_id}")
        else:
            notice(
                f"  removed from the inventory but already {job.status.value}: "
                f"proxy {job.proxy_id} is followed to its end"
            )
    for job, new in retargeted:
        if await store.retarget(job, new, f"target changed {job.target_version} -> {new} in the inventory"):
            notice(
                f"  target changed {job.target_version} -> {new}: "
                f"proxy {job.proxy_id} (not yet sent) will get {new}"
            )
        else:
            notice(
                f"  target changed to {new} but proxy {job.proxy_id} is already {job.status.value}: "
                f"keeps {job.target_version}"
            )
    await store.set_run_inventory(run.id, abspath(path), inv.sha256)


# -------------------------------------------------------------------------------------------- worker
async def join_run(run_ref: str | None, *, db: str | None, proc: ProcessOptions, out: Console) -> int:
    """``orchestrator worker [RUN]``: one more process on a run (PostgreSQL only)."""
    async with opened(db, create=False) as store:
        if not store.is_postgres:
            raise UsageError(
                "worker needs a PostgreSQL job table: on SQLite one process runs a run (its rate limit and "
                "concurrency cap are per process, so a second process would double what the cloud sees)"
            )
        run = await find_run(store, run_ref, unfinished=run_ref is None)
        if run.status is RunStatus.FINISHED:
            out.print(Text(f"run {run.id} is finished; nothing to do"))
            return EXIT_OK
        options = RunOptions.stored(run.options, run.id)
        proc = with_metrics(proc)
        try:
            reg = await store.register(run.id, role="worker", lease_s=options.lease, exclusive=False)
        except (RunLocked, ProxiesHeld) as exc:
            raise UsageError(f"refused: {exc}") from None
        notice(f"joining run {run.id} ({run.name}) as a worker")
        return await drive(store, run, options, role="worker", worker_id=reg.worker_id, proc=proc, out=out)


# --------------------------------------------------------------------------------------------- drive
async def drive(
    store: JobStore,
    run: RunRow,
    options: RunOptions,
    *,
    role: str,
    worker_id: str,
    proc: ProcessOptions,
    out: Console,
    cloud: CloudApi | None = None,
    notify_url: str | Callable[[], str | None] | None = None,
    install_signals: bool = True,
) -> int:
    """Work on ``run`` in this process (already registered as ``worker_id``) until it is finished or
    stopped; always leaves the registration. Returns the exit code and prints the summary."""
    closer = None
    proc = with_metrics(proc)
    metrics, server = proc.metrics, proc.metrics_server
    # the run's (or this command line's) outage budget, also for a resume or a worker that opened the
    # job table before reading the run's options
    store.writer.outage_timeout = options.db_outage_timeout
    try:
        if cloud is None:
            built = await build_cloud(options)
            cloud, closer = built.api, built.close
        since = store.db_now()  # compared with the job table's clock by the controls
        rt = await build_runtime(
            store,
            run.id,
            options,
            worker_id=worker_id,
            role=role,
            cloud=cloud,
            since=since,
            confirm=options.confirm and not proc.yes,
            metrics=metrics,
        )
        store.set_outage_hook(lambda event, cause: rt.events.emit(event, cause=cause))
        counts = await store.counts(run.id)
        events = RunEvents(
            total=sum(counts.values()),
            progress=proc.progress,
            rate_per_s=_per_s(options.rate),
            metrics=metrics,
        )
        rt.events = events  # before the probe: its call is one the metrics and the calls/s count
        events.update({k.value: v for k, v in counts.items()})
        refused = await probe_credentials(rt)
        if refused is not None:
            if role == "runner":
                await store.set_run_status(run.id, RunStatus.STOPPED, refused)
            raise UsageError(refused)
        if role == "runner":
            await store.set_run_status(run.id, RunStatus.RUNNING)
        _warn_clock(rt)
        engine = Engine(rt, confirm=_confirmer(proc))
        # the objects built so far live as long as the run: keep the cyclic collector off them, and let
        # it run less often (a run allocates futures and frames per call; measured: 10% of the CPU)
        thresholds = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        restore = _install_signals(rt) if install_signals else (lambda: None)
        feeder = asyncio.create_task(_progress(rt, events))
        try:
            with events:
                result = await engine.run()
                # the last frame and the jobs gauge show where the run ended, not the last 1 s sample
                with contextlib.suppress(Exception):
                    events.update({k.value: v for k, v in (await store.counts(run.id)).items()})
        finally:
            gc.set_threshold(*thresholds)
            if not startup.froze():  # in-process callers (the demo, tests) get their collector back whole
                gc.unfreeze()
            restore()
            if rt.gate is not None:
                with contextlib.suppress(Exception):
                    await rt.gate.close()
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder
        return await _finish(store, rt, run, result, role, out, notify_url, metrics, proc)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(store.leave(worker_id), 10)
        if closer is not None:
            await closer()
        if metrics is not None and proc.metrics_textfile:
            try:
                metrics.write_textfile(proc.metrics_textfile)
            except Exception as exc:  # the run's outcome stands; say why the collector will miss it
                notice(f"warning: could not write --metrics-textfile {proc.metrics_textfile}: {exc}")
        if server is not None:
            with contextlib.suppress(Exception):
                server.close()


async def _finish(
    store: JobStore,
    rt: Runtime,
    run: RunRow,
    result: EngineResult,
    role: str,
    out: Console,
    notify_url: str | Callable[[], str | None] | None,
    metrics: Any,
    proc: ProcessOptions,
) -> int:
    try:
        counts = await store.counts(run.id)
    except DatabaseUnavailable as exc:
        # nothing more can be recorded (not even the run's status): one line naming the cause
        notice(f"stopped: {exc}; once the job table is back, orchestrator resume {run.id} continues the run")
        return EXIT_STOPPED
    except Exception:
        counts = {}
    if not result.finished and result.stop_reason == TAKEN_OVER:
        # another process holds the run now: neither mark it nor tell anyone to resume it
        notice(f"stopped: {TAKEN_OVER} (this one stalled past its lease); run {run.id} goes on there")
        return EXIT_STOPPED
    if result.finished:
        code = exit_code_for(counts)
        status, reason = RunStatus.FINISHED, None
    else:
        code = result.exit_code if result.exit_code is not None else EXIT_STOPPED
        status = RunStatus(result.run_status) if result.run_status else RunStatus.STOPPED
        reason = result.stop_reason or "stopped"
        if status in (RunStatus.PAUSED, RunStatus.HALTED):
            reason = await _settled_reason(rt, status, reason)
    if role == "runner" or result.finished:
        try:
            if role == "runner" or await store.active_count(run.id, track=rt.options.wait) == 0:
                await store.set_run_status(run.id, status, reason)
        except Exception as exc:
            notice(f"could not mark run {run.id} {status.value}: {exc}")
    with contextlib.suppress(Exception):
        fresh = await store.get_run(run.id) or run
        from orchestrator.app.reads import counts_table

        out.print(counts_table(fresh, counts))
    problems = counts.get(JobStatus.FLAGGED, 0) + counts.get(JobStatus.FAILED, 0)
    if problems:
        out.print(Text(f"{problems} proxies need an operator: orchestrator flagged {run.id}"))
    if not result.finished:
        left = sum(n for s, n in counts.items() if s not in TERMINAL)
        notice(f"stopped: {reason}")
        if code == EXIT_HALTED:
            notice(
                f"{left} jobs not finished; after deciding: "
                f"orchestrator resume {run.id} --ack (or --max-failures N)"
            )
        elif code != EXIT_USAGE:
            notice(f"{left} jobs not finished; continue with: orchestrator resume {run.id}")
    if role == "runner" and (result.finished or status in (RunStatus.PAUSED, RunStatus.HALTED)):
        url = notify_url() if callable(notify_url) else notify_url
        if url:
            await _notify(store, run, url, status, code, reason or "finished", counts)
    return code


async def _settled_reason(rt: Runtime, status: RunStatus, reason: str) -> str:
    """The controls' reason once the drain is over: the stop was decided while calls were still queued
    for a permit (counted in flight, then not sent after all), so its counts may be stale."""
    from orchestrator.schedule.dispatch import Stop

    if rt.controls is None:
        return reason
    try:
        decision = rt.controls.update(await rt.store.run_state(rt.run_id, track=rt.options.wait))
    except Exception:
        return reason
    if isinstance(decision, Stop) and not decision.new_upgrades_only and decision.run_status is status:
        return decision.reason
    return reason


async def _notify(
    store: JobStore,
    run: RunRow,
    url: str,
    status: RunStatus,
    code: int,
    reason: str,
    counts: Mapping[JobStatus, int],
) -> None:
    from orchestrator.notify import notify, summary_payload

    flagged = [
        {"proxy": j.proxy_id, "instance": j.instance_id, "reason": j.reason}
        for j in await store.jobs(run.id, [JobStatus.FLAGGED, JobStatus.FAILED], limit=10)
    ]
    event = {RunStatus.FINISHED: "run.finished", RunStatus.PAUSED: "run.paused"}.get(status, "run.halted")
    payload = summary_payload(
        event=event,
        run_id=str(run.id),
        status=status.value,
        exit_code=code,
        reason=reason,
        counts={k.value: v for k, v in counts.items() if v},
        flagged=flagged,
    )
    await notify(url, payload)


async def probe_credentials(rt: Runtime) -> str | None:
    """One read before the pool starts: a refused credential or a certificate that fails verification
    stops the run after one call, not after ``concurrency`` of them (the gateway locks a key after five
    bad signatures)."""
    job = await rt.store.first_job(
        rt.run_id, [JobStatus.PENDING, JobStatus.RETRY_WAIT, JobStatus.UNKNOWN, JobStatus.ACCEPTED]
    )
    if job is None:
        return None
    async with rt.permit("proxy_version") as on_sent:
        t0 = rt.mono()
        res = await rt.cloud.proxy_version(rt.ref(job), on_sent=on_sent)
        rt.events.emit("call", route="proxy_version", outcome=outcome_label(res), latency_s=rt.mono() - t0)
    if isinstance(res, HttpFailure) and res.http_status in (401, 403):
        what = "refused the credentials" if res.http_status == 401 else "denied permission"
        return (
            f"the cloud {what} ({res.error_code or res.http_status}: {res.error_msg or 'no message'}); "
            "nothing was upgraded. Check the credentials (and the IAM permission "
            f"gaussdbformysql:proxy:upgrade), then: orchestrator resume {rt.run_id}"
        )
    if isinstance(res, TransportFailure) and res.kind is TransportKind.TLS:
        return (
            f"TLS: {res.detail}; nothing was sent. "
            f"Fix the endpoint or --ca-bundle, then: orchestrator resume {rt.run_id}"
        )
    return None


async def _progress(rt: Runtime, events: RunEvents) -> None:
    """Feed the whole run's counts to the progress display (the controls' latest read: no extra query)."""
    seen = None
    while True:
        await asyncio.sleep(1.0)
        with contextlib.suppress(Exception):
            ctl = rt.controls
            if ctl is not None and ctl.state is not None and ctl.state is not seen:
                seen = ctl.state
                events.update(dict(seen.by_status))


def _install_signals(rt: Runtime) -> Callable[[], None]:
    """First SIGINT/SIGTERM: stop dispatching, let in-flight calls answer, commit, exit 3. Second: exit
    at once (what was committed stays committed; an in-flight call is reconciled on resume)."""
    loop = asyncio.get_running_loop()
    hits = {"n": 0}

    def on_signal(signame: str) -> None:
        hits["n"] += 1
        if hits["n"] == 1:
            notice(
                f"{signame}: stopping: no new calls; "
                f"waiting up to {rt.options.drain_timeout:.0f}s for calls in "
                "flight (press again to exit at once)",
                style="yellow",
            )
            rt.request_stop(f"interrupted by {signame}", EXIT_STOPPED)
        else:
            with contextlib.suppress(Exception):
                os.write(2, f"{signame} again: exiting now; resume will reconcile calls in flight\n".encode())
            os._exit(EXIT_STOPPED)

    installed: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        try:
            loop.add_signal_handler(sig, on_signal, sig.name)
            installed[sig] = previous
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass

    def restore() -> None:
        for sig, previous in installed.items():
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
            # back to the process-wide handler (exit 3 outside the engine: cli._on_signal for SIGTERM)
            with contextlib.suppress(Exception):
                signal.signal(sig, previous)

    return restore


def _confirmer(proc: ProcessOptions) -> Callable[[Confirm], Any]:
    async def confirm(c: Confirm) -> bool | None:
        if proc.yes:
            return True
        if not sys.stdin.isatty():
            return None
        return await _ask(c.prompt, default=False)

    return confirm


async def _ask(prompt: str, *, default: bool) -> bool:
    def ask() -> bool:
        try:
            answer = input(prompt + " ").strip().lower()
        except EOFError:
            return default
        if not answer:
            return default
        return answer in ("y", "yes")

    return await asyncio.get_running_loop().run_in_executor(None, ask)


def _notify_url(given: str | None, inv: Any) -> str | None:
    url = (
        given
        or (getattr(inv, "notify", None) if inv is not None else None)
        or os.environ.get("ORCHESTRATOR_NOTIFY_URL")
    )
    if not url:
        return None
    from orchestrator.notify import check_notify_url

    try:
        check_notify_url(url)
    except ValueError as exc:
        raise UsageError(f"--notify: {exc}") from None
    return url


def _metrics(proc: ProcessOptions) -> tuple[Any, Any]:
    """This process's metrics (None without ``--metrics-*``) and their ``/metrics`` server (None without
    ``--metrics-port``)."""
    if proc.metrics_port is None and not proc.metrics_textfile:
        return None, None
    from orchestrator.metrics import Metrics

    m = Metrics()
    if proc.metrics_port is None:
        return m, None
    try:
        server = m.serve(proc.metrics_port, host=proc.metrics_host)
    except OSError as exc:
        raise UsageError(f"--metrics-port {proc.metrics_port} on {proc.metrics_host}: {exc}") from None
    notice(f"metrics: {server.url}")  # the port it bound when 0 (any free port) was asked
    return m, server


def _per_s(rate: str) -> float:
    from orchestrator.limiter import parse_rate

    r = parse_rate(rate)
    return r.count / r.period


def _warn_clock(rt: Runtime) -> None:
    clock = rt.cloud.clock
    if clock.large:
        notice(f"warning: this host's clock differs from the cloud's: {clock.describe()}", style="yellow")
