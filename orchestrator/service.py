"""The commands' coroutines: wire store, cloud client, limiter and engine for one process, and say what
happened. The CLI stays a parser; everything here can be driven from tests without click.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from orchestrator.cloud.auth import AuthError, credentials_from_env
from orchestrator.cloud.client import CloudClient, make_session
from orchestrator.engine import Engine
from orchestrator.errors import EXIT_OK, EXIT_PROBLEMS, EXIT_STOPPED, EXIT_USAGE, UsageError
from orchestrator.inventory import Inventory, load_inventory
from orchestrator.limiter import SlidingWindowLimiter, parse_rate
from orchestrator.observe import RunEvents
from orchestrator.options import RunOptions
from orchestrator.outcomes import HttpFailure
from orchestrator.policy import parse_policy
from orchestrator.runtime import Runtime
from orchestrator.states import JobStatus, RunStatus
from orchestrator.store import JobStore, NewJob, RunLocked, RunRow
from orchestrator.store.store import new_worker_id

__all__ = ["EXIT_OK", "EXIT_PROBLEMS", "EXIT_STOPPED", "EXIT_USAGE", "UsageError", "drive"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def entries_as_jobs(inv: Inventory) -> list[NewJob]:
    return [
        NewJob(
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
        for e in inv.entries()
    ]


@dataclass
class InventoryDiff:
    added: list[NewJob] = field(default_factory=list)
    removed: list[tuple[str, str, str]] = field(default_factory=list)
    retargeted: list[tuple[tuple[str, str, str], str, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.retargeted)


async def diff_inventory(store: JobStore, run: RunRow, inv: Inventory) -> InventoryDiff:
    existing = await store.iter_job_keys(run.id)
    diff = InventoryDiff()
    seen = set()
    for j in entries_as_jobs(inv):
        key = (j.project_id, j.instance_id, j.proxy_id)
        seen.add(key)
        if key not in existing:
            diff.added.append(j)
        elif existing[key][0] != j.target_version:
            diff.retargeted.append((key, existing[key][0], j.target_version))
    diff.removed = [k for k in existing if k not in seen]
    return diff


async def apply_diff(store: JobStore, run: RunRow, diff: InventoryDiff, say: Callable[[str], None]) -> None:
    """What a resume does with a changed inventory: new proxies join the run; proxies removed from it
    are skipped if nothing was sent for them yet (else their upgrade, already under way, is followed to
    its end); a changed target applies to proxies not yet sent."""
    now = utcnow()
    existing = await store.iter_job_keys(run.id)
    if diff.added:
        n = await store.add_jobs(run.id, diff.added, now)
        say(f"  added to the run: {n} proxies new in the inventory")
    for key in diff.removed:
        _target, status, job_id = existing[key]
        job = await store.get_job(job_id)
        if job and job.status is JobStatus.PENDING and job.attempt_count == 0:
            await store.move(
                job_id,
                frm=[JobStatus.PENDING],
                to=JobStatus.SKIPPED,
                now=now,
                fields={"reason": "removed from the inventory before it was sent"},
            )
            say(f"  removed from the inventory, skipped (never sent): proxy {key[2]}")
        else:
            say(f"  removed from the inventory but already {status}: proxy {key[2]} is followed to its end")
    for key, old, new in diff.retargeted:
        _target, status, job_id = existing[key]
        job = await store.get_job(job_id)
        if job and job.status is JobStatus.PENDING and job.attempt_count == 0:
            await store.update_job_fields(job_id, {"target_version": new}, now)
            say(f"  target changed {old} -> {new}: proxy {key[2]} (not yet sent) will get {new}")
        else:
            say(f"  target changed {old} -> {new} but proxy {key[2]} is already {status}: keeps {old}")


@dataclass
class Outcome:
    exit_code: int
    run_id: int | None = None
    message: str | None = None


def exit_code_for(counts: Mapping[JobStatus, int], finished: bool) -> int:
    if not finished:
        return EXIT_STOPPED
    if counts.get(JobStatus.FLAGGED, 0) or counts.get(JobStatus.FAILED, 0):
        return EXIT_PROBLEMS
    return EXIT_OK


def check_credentials_config(env: Mapping[str, str]) -> None:
    """Refuse half-configured credentials (AK without SK...) before anything is written."""
    try:
        credentials_from_env(env)
    except AuthError as exc:
        raise UsageError(f"credentials: {exc}") from None


def _iam_endpoint(options: RunOptions, env: Mapping[str, str]) -> str | None:
    return env.get("ORCHESTRATOR_IAM_ENDPOINT") or None


async def register(store: JobStore, run: RunRow, options: RunOptions, *, role: str, console: Console) -> str:
    """Join ``run`` as its runner (exclusive: refused with UsageError naming a live holder) or as a
    worker. A dead holder is taken over, its claims released."""
    worker_id = new_worker_id()
    try:
        taken = await store.register(
            run.id,
            worker_id=worker_id,
            role=role,
            now=utcnow(),
            lease_s=options.lease,
            exclusive=role == "runner",
        )
    except RunLocked as exc:
        raise UsageError(f"refused: {exc}; wait for it to finish or stop it first") from None
    for dead in taken:
        console.print(f"took over from a dead process: {dead.rsplit(':', 1)[0]}")
    return worker_id


async def drive(
    store: JobStore,
    run: RunRow,
    options: RunOptions,
    *,
    role: str,
    console: Console,
    env: Mapping[str, str] | None = None,
    progress: bool | None = None,
    install_signals: bool = True,
    worker_id: str | None = None,
) -> Outcome:
    """Work on ``run`` in this process until it is finished or stopped. ``worker_id``: this process is
    already registered (a resume takes the runner lock before it touches the run)."""
    env = os.environ if env is None else env
    if worker_id is None:
        try:
            worker_id = await register(store, run, options, role=role, console=console)
        except UsageError as exc:
            return Outcome(EXIT_USAGE, run.id, str(exc))
    session = make_session(ca_bundle=options.ca_bundle)
    try:
        try:
            creds = credentials_from_env(env, iam_endpoint=_iam_endpoint(options, env), session=session)
        except AuthError as exc:
            await store.leave(worker_id, utcnow())
            return Outcome(EXIT_USAGE, run.id, f"credentials: {exc}")
        client = CloudClient(session, creds, timeout=options.timeout, connect_timeout=options.connect_timeout)
        rt = Runtime(
            store=store,
            client=client,
            limiter=SlidingWindowLimiter(parse_rate(options.rate)),
            policy=parse_policy(options.policy),
            options=options,
            run_id=run.id,
            worker_id=worker_id,
            rng=random.Random(options.seed),
        )
        if store.is_postgres:
            from orchestrator.gate import SharedGate

            rt.gate = SharedGate(
                store, run.id, worker_id, parse_rate(options.rate), options.concurrency, lease_s=options.lease
            )
        refused = await probe_credentials(rt)
        if refused:
            await store.leave(worker_id, utcnow())
            await creds.aclose()
            if role == "runner":
                await store.set_run_status(run.id, RunStatus.STOPPED, utcnow(), refused)
            return Outcome(EXIT_USAGE, run.id, refused)
        counts = await store.counts(run.id)
        total = sum(counts.values())
        done = sum(n for s, n in counts.items() if s.terminal)
        events = RunEvents(total=total, done=done, progress=progress, accepted_is_done=not options.wait)
        rt.events = events
        if role == "runner":
            await store.set_run_status(run.id, RunStatus.RUNNING, utcnow())
        restore = _install_signals(rt, console) if install_signals else (lambda: None)
        try:
            with events:
                result = await Engine(rt).run()
        finally:
            restore()
            with contextlib.suppress(Exception):  # closing credentials must not mask the run's outcome
                await creds.aclose()
        await store.leave(worker_id, utcnow())
        counts = await store.counts(run.id)
        if result.finished:
            if role == "runner" or await store.active_count(run.id, track=options.wait) == 0:
                await store.set_run_status(run.id, RunStatus.FINISHED, utcnow())
            return Outcome(exit_code_for(counts, True), run.id)
        reason = result.stop_reason or "stopped"
        if role == "runner":
            await store.set_run_status(run.id, RunStatus.STOPPED, utcnow(), reason)
        code = result.exit_code if result.exit_code is not None else EXIT_STOPPED
        return Outcome(code, run.id, reason)
    finally:
        await session.close()


async def probe_credentials(rt: Runtime) -> str | None:
    """One read call before the pool starts: a refused credential stops the run after one call, not after
    ``concurrency`` of them (the gateway locks a key after five bad signatures)."""
    job = await rt.store.first_job(
        rt.run_id, [JobStatus.PENDING, JobStatus.RETRY_WAIT, JobStatus.UNKNOWN, JobStatus.ACCEPTED]
    )
    if job is None:
        return None
    async with rt.permit() as sent:
        res = await rt.client.proxy_version(rt.ref(job), on_sent=sent)
    if isinstance(res, HttpFailure) and res.http_status in (401, 403):
        what = "refused the credentials" if res.http_status == 401 else "denied permission"
        return (
            f"the cloud {what} ({res.error_code or res.http_status}: {res.error_msg or 'no message'}); "
            "nothing was upgraded. Check the credentials (and the IAM permission "
            "gaussdbformysql:proxy:upgrade), then resume"
        )
    return None


def _install_signals(rt: Runtime, console: Console) -> Callable[[], None]:
    """First SIGINT/SIGTERM: stop dispatching, let in-flight calls answer, commit, exit 3. Second: exit
    at once (what was committed stays committed; an in-flight call is reconciled on resume)."""
    loop = asyncio.get_running_loop()
    hits = {"n": 0}

    def on_signal(signame: str) -> None:
        hits["n"] += 1
        if hits["n"] == 1:
            console.print(
                f"[yellow]{signame}: stopping: no new calls; waiting up to {rt.options.drain_timeout:.0f}s "
                "for calls in flight (press again to exit at once)[/]"
            )
            rt.request_stop(f"interrupted by {signame}", EXIT_STOPPED)
        else:
            sys.stderr.write(f"{signame} again: exiting now; resume will reconcile calls in flight\n")
            sys.stderr.flush()
            os._exit(EXIT_STOPPED)

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig.name)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass

    def restore() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return restore


def load(path: str, endpoint_override: str | None) -> Inventory:
    return load_inventory(path, endpoint_override=endpoint_override)


def default_run_name(path: str) -> str:
    return f"{Path(path).stem}-{utcnow():%Y%m%d-%H%M%S}"


def options_with_policy(options: RunOptions, inv: Inventory, policy_file: str | None) -> RunOptions:
    """The run's policy: a separate file wins over the inventory's ``policy:`` block; stored resolved so
    a resume uses the rules it started with even if the files change."""
    from orchestrator.policy import PolicyError, policy_to_dict

    raw: Any = inv.policy
    where = f"{inv.path}:{inv.policy_line or 1}: policy"
    if policy_file:
        import yaml

        try:
            raw = yaml.safe_load(Path(policy_file).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"{policy_file}: cannot read policy: {str(exc).splitlines()[0]}") from None
        if isinstance(raw, dict) and "policy" in raw and len(raw) == 1:
            raw = raw["policy"]
        where = f"{policy_file}: policy"
    try:
        policy = parse_policy(raw)
    except PolicyError as exc:
        raise UsageError(f"{where}: {exc}") from None
    return RunOptions.from_dict({**options.to_dict(), "policy": policy_to_dict(policy)})
