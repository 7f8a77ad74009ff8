"""A test bench for the engine's steps on virtual time: no sockets, no subprocess, no real waiting.

One ``Bench`` is a whole process of a run in miniature: the simulator's ``Fleet`` on the virtual clock,
``FakeCloud`` over it (faults injected per route and proxy), a real SQLite job table (a copy of a migrated
template, with its batches run inline on the loop's thread), a run created by ``store.create_run`` and the
``Runtime`` built by ``app.runtime.build_runtime`` with the loop's clock as its monotonic clock. Tests
either drive one step at a time (``Bench.step``: claim the job as the engine does, hand it to the step its
status calls for) or the whole ``Engine``.

Time: the loop is ``VirtualTimeLoop`` (tests/virtual.py: its clock jumps to the next timer), so
``asyncio.sleep(3600)`` returns at once with an hour passed. Every clock of the bench follows it: the fleet's
(``EPOCH`` + loop time), the job table's and the cloud clock's local side (both shifted by ``skew_s``: our
host's clock against the cloud's) and the runtime's monotonic clock.

Usage::

    def test_something(tmp_path: Path) -> None:
        async def body(b: Bench) -> None:
            await b.step()                      # the upgrade step
            assert (await b.job()).status is JobStatus.ACCEPTED

        run_bench(tmp_path, body, proxies=[proxy(P1)])
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.app.runs import wave_planner
from orchestrator.app.runtime import build_runtime
from orchestrator.cloud.fake import DEFAULT_EPOCH, FakeCloud, Fault
from orchestrator.engine import IDLE_S, Engine, EngineResult
from orchestrator.options import RunOptions
from orchestrator.runtime import Runtime
from orchestrator.simulator import Fleet, Scenario
from orchestrator.states import JobStatus
from orchestrator.steps.reconcile import run_reconcile
from orchestrator.steps.track import run_track
from orchestrator.steps.upgrade import run_upgrade
from orchestrator.store import AttemptRow, JobRow, JobStore, NewJob, WorkflowRow, new_worker_id, open_store
from tests.virtual import run_virtual

T = TypeVar("T")

EPOCH = DEFAULT_EPOCH  # the fleet's clock reads EPOCH + loop time
PROJECT = "054e292c9880d4992f02c0196d3ea468"
INST_A = "517ea793ab91438cbfcd9c4b1c958b1ein07"
INST_B = "627ea793ab91438cbfcd9c4b1c958b1ein07"
INST_C = "737ea793ab91438cbfcd9c4b1c958b1ein07"
P1, P2, P3, P4, P5, P6 = (f"{c * 32}po01" for c in "abcdef")
OLD, NEW = "2.23.12.000", "2.24.03.000"
ENDPOINT = "http://127.0.0.1:9"  # stored on the jobs; never connected to (the fake has no sockets)
SUBNET_MSG = "Upgrade failed due to insufficient subnet ip"
QUOTA_MSG = "The quota of proxy nodes is insufficient"


# ------------------------------------------------------------------------------------- virtual time
def loop_time() -> float:
    return asyncio.get_running_loop().time()


def at(seconds: float) -> datetime:
    """The fleet's (the cloud's) clock at ``seconds`` of loop time, as aware UTC."""
    return datetime.fromtimestamp(EPOCH + seconds, UTC)


# ---------------------------------------------------------------------------------------- scenarios
def proxy(pid: str, **spec: Any) -> dict[str, Any]:
    """One proxy of a scenario (``ProxySpec`` keys: nodes, reject, reject_nodes, workflow, script...)."""
    return {"id": pid, **spec}


def scenario(
    fleet: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    pending_s: float = 5.0,
    running_s: float = 60.0,
    visible_after_s: float = 0.0,
    **extra: Any,
) -> Scenario:
    """A small scenario: ``{instance id: [proxy(...), ...]}``, at OLD with NEW the latest version."""
    data: dict[str, Any] = {
        "seed": 7,
        "project_id": PROJECT,
        "current_version": OLD,
        "latest_version": NEW,
        "workflow": {"pending_s": pending_s, "running_s": running_s, "job_visible_after_s": visible_after_s},
        "fleet": {"instances": [{"id": iid, "proxies": list(ps)} for iid, ps in fleet.items()]},
    }
    data.update(extra)
    return Scenario.from_dict(data)


# ------------------------------------------------------------------------------------- the job table
_TEMPLATE: dict[str, Path] = {}


SHM = Path("/dev/shm")


def scratch_dir(fallback: Path) -> Path:
    """A fresh directory for job tables: on a tmpfs when the machine has one, else ``fallback``.

    Why: the store commits with ``PRAGMA synchronous=FULL`` (a commit survives a power cut), so every
    commit waits for an fsync; on a disk that is most of these tests' time (22 s against 3 s here), and
    durability is not what they check. The caller removes a tmpfs directory when done."""
    if SHM.is_dir() and os.access(SHM, os.W_OK | os.X_OK):
        return Path(tempfile.mkdtemp(prefix="orch-bench-", dir=SHM))
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _template_db() -> Path:
    """A job table migrated to head once per test process (migrations take a while; copies are cheap)."""
    if "path" not in _TEMPLATE:
        home = scratch_dir(Path(tempfile.mkdtemp(prefix="orch-steps-")))
        atexit.register(shutil.rmtree, home, True)
        path = home / "template.db"

        async def make() -> None:
            store = await open_store(f"sqlite:///{path}")
            await store.close()

        asyncio.run(make())
        with sqlite3.connect(path) as conn:  # fold the WAL into the file: a copy of the file is whole
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        _TEMPLATE["path"] = path
    return _TEMPLATE["path"]


def fresh_db(directory: Path) -> Path:
    """A migrated, empty job table file in ``directory``."""
    target = directory / "jobs.db"
    shutil.copyfile(_template_db(), target)
    return target


# --------------------------------------------------------------------------------------------- bench
class Recorder:
    """``Events`` that keeps what was emitted: (event name, fields)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event: str, **fields: Any) -> None:
        self.seen.append((event, fields))

    def names(self) -> list[str]:
        return [e for e, _ in self.seen]


@dataclass
class Bench:
    """One run of one process on virtual time (see the module docstring)."""

    fleet: Fleet
    cloud: FakeCloud
    store: JobStore
    rt: Runtime
    run_id: int
    db_path: Path
    events: Recorder
    skew_s: float = 0.0
    steps: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------------------- reading
    async def job(self, pid: str = P1) -> JobRow:
        for j in await self.store.jobs(self.run_id):
            if j.proxy_id == pid:
                return j
        raise LookupError(pid)

    async def attempts(self, pid: str = P1) -> list[AttemptRow]:
        return await self.store.attempts((await self.job(pid)).id)

    async def workflows(self, pid: str = P1) -> list[WorkflowRow]:
        return await self.store.workflows_of((await self.job(pid)).id)

    async def workflow_ids(self, pid: str = P1) -> list[str]:
        return [w.workflow_id for w in await self.workflows(pid) if w.workflow_id]

    def upgrade_calls(self, pid: str | None = None) -> list[dict[str, Any]]:
        """Upgrade calls that reached the fleet (the fake's log), of ``pid`` or of every proxy."""
        return [
            r for r in self.cloud.log if r["route"] == "upgrade" and (pid is None or r["proxy_id"] == pid)
        ]

    def calls(self, route: str) -> list[dict[str, Any]]:
        return [r for r in self.cloud.log if r["route"] == route]

    def issued(self, pid: str | None = None) -> list[str]:
        """Workflow ids the fleet issued for ``pid`` (or for every proxy), in order."""
        return [w.id for w in self.fleet.workflows.values() if pid is None or w.proxy.spec.id == pid]

    def moves(self, pid: str = P1) -> list[tuple[str, str, str | None]]:
        """The job's status moves from the event log: (from, to, rule)."""
        with sqlite3.connect(self.db_path) as conn:
            rows = conn.execute(
                "SELECT e.from_status, e.to_status, e.rule FROM events e JOIN jobs j ON j.id = e.job_id"
                " WHERE j.run_id = ? AND j.proxy_id = ? AND e.kind = 'move' ORDER BY e.id",
                (self.run_id, pid),
            ).fetchall()
        return [(str(a), str(b), c) for a, b, c in rows]

    def move_reasons(self, pid: str = P1) -> list[tuple[str, str | None]]:
        """The job's status moves from the event log: (to, the reason the event records)."""
        with sqlite3.connect(self.db_path) as conn:
            rows = conn.execute(
                "SELECT e.to_status, e.reason FROM events e JOIN jobs j ON j.id = e.job_id"
                " WHERE j.run_id = ? AND j.proxy_id = ? AND e.kind = 'move' ORDER BY e.id",
                (self.run_id, pid),
            ).fetchall()
        return [(str(a), b) for a, b in rows]

    def now(self) -> float:
        return loop_time()

    # ------------------------------------------------------------------------------- driving
    def inject(self, route: str, *faults: Fault, pid: str | None = None) -> None:
        self.cloud.inject(route, *faults, proxy_id=pid)

    async def wait_due(self, pid: str = P1) -> None:
        """Sleep (virtually) until the job may be claimed again."""
        j = await self.job(pid)
        if j.next_attempt_at is not None:
            delay = (j.next_attempt_at - self.rt.now()).total_seconds()
            if delay > 0:
                await asyncio.sleep(delay + 0.001)

    async def claim(self, pid: str = P1) -> JobRow:
        """Claim ``pid``'s job as the engine's feeder does (the fence notes the claim's submit time)."""
        await self.wait_due(pid)
        submitted = self.rt.mono()
        claimed = await self.store.claim(
            self.run_id,
            worker_id=self.rt.worker_id,
            limit=100,
            lease_s=self.rt.options.lease,
            track=self.rt.options.wait,
            per_instance=100,
        )
        mine = [j for j in claimed.jobs if j.proxy_id == pid]
        for other in claimed.jobs:
            if other.proxy_id != pid:
                await self.store.release(other.id, self.rt.worker_id)
        if not mine:
            raise AssertionError(f"{pid} could not be claimed: {(await self.job(pid)).status}")
        self.rt.lease.claimed([mine[0].id], submitted)
        return mine[0]

    async def run_step(self, job: JobRow) -> str:
        """Hand a claimed job to the step its status calls for; returns the step's name."""
        try:
            if job.status in (JobStatus.PENDING, JobStatus.RETRY_WAIT):
                await upgrade_step(self.rt, job)
                return "upgrade"
            if job.status is JobStatus.UNKNOWN:
                await run_reconcile(self.rt, job)
                return "reconcile"
            if job.status is JobStatus.ACCEPTED:
                await run_track(self.rt, job)
                return "track"
            raise AssertionError(f"no step for {job.status}")
        finally:
            self.rt.lease.dropped(job.id)

    async def step(self, pid: str = P1) -> JobRow:
        """Wait until the job is due, claim it, run one step; returns the job afterwards."""
        job = await self.claim(pid)
        self.steps.append(await self.run_step(job))
        return await self.job(pid)

    async def settle(self, pid: str = P1, *, max_steps: int = 200) -> JobRow:
        """Run steps until the job ends (a terminal status); returns it."""
        for _ in range(max_steps):
            j = await self.job(pid)
            if j.status.terminal:
                return j
            await self.step(pid)
        raise AssertionError(f"{pid} did not end in {max_steps} steps: {self.steps[-10:]}")

    async def other_process(self, options: RunOptions | None = None) -> Bench:
        """A second process on the same run (a ``worker``: its own registration, runtime, lease keeper and
        limiter; this run's options unless given) over the same job table and cloud; it shares this
        bench's event recorder."""
        loop = asyncio.get_running_loop()
        options = options or self.rt.options
        reg = await self.store.register(
            self.run_id, role="worker", lease_s=options.lease, exclusive=False, worker_id=new_worker_id()
        )
        rt = await build_runtime(
            self.store,
            self.run_id,
            options,
            worker_id=reg.worker_id,
            role="worker",
            cloud=self.cloud,
            events=self.events,
            since=self.rt.now(),
            mono=loop.time,
        )
        return Bench(
            self.fleet, self.cloud, self.store, rt, self.run_id, self.db_path, self.events, self.skew_s
        )

    async def engine(self, *, idle_s: float = IDLE_S, timeout_s: float = 7 * 86400) -> EngineResult:
        """The whole engine until it returns (virtual time; ``timeout_s`` guards against a hang)."""
        return await asyncio.wait_for(Engine(self.rt, idle_s=idle_s).run(), timeout_s)


async def upgrade_step(rt: Runtime, job: JobRow) -> None:
    """``run_upgrade`` and the background commit of its answer (``Runtime.defer``): the job stays claimed
    and the engine does not finish until that commit, so a test looks at the job after it too."""
    tail = await run_upgrade(rt, job)
    if tail is not None:
        await tail


def make_options(**overrides: Any) -> RunOptions:
    """Options for a bench: a fast rate, short polls and leases (all still overridable)."""
    base: dict[str, Any] = {
        "rate": "50/s",
        "concurrency": 4,
        "poll_initial": 10.0,
        "poll_interval": 10.0,
        "reconcile_grace": 30.0,
        "lease": 30.0,
        "heartbeat": 5.0,
        "seed": 1,
    }
    base.update(overrides)
    return RunOptions(**base)


def new_jobs(fleet: Mapping[str, Sequence[Mapping[str, Any]]], *, source: str | None = OLD) -> list[NewJob]:
    """One inventory entry per proxy of the scenario, in scenario order, to NEW."""
    return [
        NewJob(
            project_id=PROJECT,
            instance_id=iid,
            proxy_id=str(p["id"]),
            endpoint=ENDPOINT,
            target_version=NEW,
            source_version=source,
            name=f"proxy-{n}",
            line=n,
        )
        for n, (iid, p) in enumerate(((i, p) for i, ps in fleet.items() for p in ps), start=1)
    ]


async def open_bench(
    db_path: Path,
    fleet: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    options: RunOptions,
    source: str | None = OLD,
    skew_s: float = 0.0,
    timeout_s: float = 30.0,
    scenario_extra: Mapping[str, Any] | None = None,
) -> Bench:
    """Build the bench inside a running virtual-time loop (see ``run_bench``)."""
    loop = asyncio.get_running_loop()

    def cloud_now() -> float:
        return EPOCH + loop.time()

    def local_now() -> float:
        return cloud_now() + skew_s

    def table_now() -> datetime:
        return datetime.fromtimestamp(local_now(), UTC)

    fleet_obj = Fleet(scenario(fleet, **dict(scenario_extra or {})), clock=cloud_now)
    cloud = FakeCloud(fleet_obj, local_clock=local_now, timeout_s=timeout_s)
    store = await open_store(f"sqlite:///{db_path}", migrate=False, clock=table_now, inline=True)
    worker_id = new_worker_id()
    jobs = new_jobs(fleet, source=source)
    run, _reg = await store.create_run(
        name="bench",
        inventory_path=str(db_path.parent / "inventory.yaml"),
        inventory_sha256="0" * 64,
        options=options.to_dict(),
        jobs=lambda: iter(jobs),
        runner_id=worker_id,
        lease_s=options.lease,
        waves=wave_planner(options),
    )
    recorder = Recorder()
    rt = await build_runtime(
        store,
        run.id,
        options,
        worker_id=worker_id,
        role="runner",
        cloud=cloud,
        events=recorder,
        since=table_now(),
        mono=loop.time,
    )
    return Bench(fleet_obj, cloud, store, rt, run.id, db_path, recorder, skew_s)


def run_bench(
    tmp_path: Path,
    body: Callable[[Bench], Awaitable[T]],
    *,
    fleet: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    proxies: Sequence[Mapping[str, Any]] | None = None,
    options: RunOptions | None = None,
    **kw: Any,
) -> T:
    """Run ``body(bench)`` on a fresh virtual-time loop; ``proxies`` is a fleet of one instance."""
    if fleet is None:
        fleet = {INST_A: list(proxies or [proxy(P1)])}
    directory = scratch_dir(tmp_path)
    db_path = fresh_db(directory)

    async def main() -> T:
        bench = await open_bench(db_path, fleet, options=options or make_options(), **kw)
        try:
            return await body(bench)
        finally:
            await bench.store.close()

    try:
        return run_virtual(main)
    finally:
        if directory != tmp_path:
            shutil.rmtree(directory, ignore_errors=True)


def advance(seconds: float) -> Awaitable[None]:
    """Let ``seconds`` of virtual time pass."""
    return asyncio.sleep(seconds)
