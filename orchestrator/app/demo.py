"""``orchestrator demo``: a maintenance window rehearsed end to end on this machine.

Starts the simulator on a free loopback port with the bundled scenario, writes an inventory for its
fleet, runs it into a fresh SQLite job table through the same path as ``run``, prints the summary and two
audit queries (on the audit views, run for real), and checks the outcome against the simulator's own
record: every workflow it created is in the job table, no proxy accepted more than one upgrade, a job is
``succeeded`` exactly when the simulator's proxy runs its target, and every ``flagged`` job has a reason.
Exit 0 only if all of that holds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from orchestrator.app.common import opened
from orchestrator.app.runs import ProcessOptions, run_inventory
from orchestrator.observe import notice
from orchestrator.states import JobStatus
from orchestrator.store import JobStore

DEMO_OPTIONS: dict[str, Any] = {
    "rate": "50/s",
    "concurrency": 16,
    "timeout": 10.0,
    "poll_initial": 0.5,
    "poll_interval": 0.5,
    "poll_timeout": 120.0,
    "reconcile_grace": 3.0,
    "lease": 10.0,
    "heartbeat": 2.0,
    "seed": 7,
}

AUDIT_QUERIES = [
    (
        "every upgrade call of a proxy, with its answer",
        "SELECT number, sent_at, latency_s, http_status, error_code, outcome, rule\n"
        "  FROM v_attempts\n"
        " WHERE run_id = {run} AND proxy_id = '{proxy}' ORDER BY number;",
    ),
    (
        "what needs an operator, and why",
        "SELECT proxy_id, instance_id, status, reason, hint\n"
        "  FROM v_flagged WHERE run_id = {run} ORDER BY job_id;",
    ),
]


async def run_demo(db: str, proxies: int | None, out: Console) -> int:
    """``orchestrator demo`` (see the module docstring). ``db``: the SQLite file of the job table,
    deleted first with its ``-wal``/``-shm``; ``proxies``: a generated fleet of that size (seed 7, ten
    times faster) instead of the bundled scenario. Returns the exit code: the run's own when it did not
    finish (neither 0 nor 1), 1 when the outcome is not the scenario's, else 0."""
    from orchestrator.simulator import SimulatorServer, generate_scenario, load_bundled, scenario_to_inventory

    scenario = load_bundled() if proxies is None else generate_scenario(proxies, seed=7, speed=10.0)
    db_path = Path(db)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="orchestrator-demo-") as tmp:
        inventory = str(Path(tmp) / "demo-fleet.yaml")
        scenario_to_inventory(scenario, inventory, fmt="yaml")
        async with SimulatorServer(scenario) as sim:
            notice(f"simulator (bundled scenario) listening on {sim.url}")
            code = await run_inventory(
                inventory,
                db=str(db_path),
                name="demo",
                policy_file=None,
                resume_mode="new",
                kw={**DEMO_OPTIONS, "endpoint": sim.url},
                proc=ProcessOptions(),
                out=out,
            )
            async with opened(str(db_path), create=False) as store:
                run = await store.latest_run()
                assert run is not None
                await _audit_examples(store, run.id, out, db_path)
                problems = await _check(store, run.id, sim)
    if code not in (0, 1):
        notice(f"the demo run did not finish (exit {code})")
        return code
    if problems:
        for p in problems:
            notice(f"not as the scenario predicts: {p}", style="red")
        return 1
    out.print(
        Text(
            f"the run ended as the scenario predicts (simulator: {sim.stats['total_calls']} calls, "
            f"at most {sim.stats['max_concurrent']} at once)",
            style="green",
        )
    )
    out.print(Text(f"job table: {db_path} (try: orchestrator report {run.id} --db {db_path})"))
    return 0


async def _audit_examples(store: JobStore, run_id: int, out: Console, db_path: Path) -> None:
    from orchestrator.store import reports

    flagged = await store.jobs(run_id, [JobStatus.FLAGGED], limit=1)
    sample = flagged[0].proxy_id if flagged else (await store.jobs(run_id, limit=1))[0].proxy_id
    for title, sql in AUDIT_QUERIES:
        q = sql.format(run=run_id, proxy=sample)
        out.print(Text(f"\naudit query: {title}  (sqlite3 {db_path})", style="bold"))
        out.print(Text(q))
        async with store.read() as conn:
            cols, rows = await reports.run_sql(conn, q)
        t = Table(*cols)
        for row in rows[:8]:
            t.add_row(*(Text("" if v is None else str(v)) for v in row))
        out.print(t)
        if len(rows) > 8:
            out.print(Text(f"... {len(rows) - 8} more rows"))


async def _check(store: JobStore, run_id: int, sim: Any) -> list[str]:
    problems: list[str] = []
    fleet = sim.fleet.snapshot()
    jobs = {j.proxy_id: j for j in await store.jobs(run_id)}
    created = set()
    for rec in sim.log:
        if rec.get("route") == "upgrade":
            for item in rec.get("items") or []:
                if item.get("workflow_id"):
                    created.add(item["workflow_id"])
    known = await store.known_workflow_ids(created)
    missing = created - known
    if missing:
        problems.append(f"{len(missing)} workflow ids the simulator created are missing from the job table")
    twice = []
    for p in fleet:
        job = jobs.get(p["proxy_id"])
        if job is None:
            continue
        if p.get("accepted_calls", 0) > 1:
            twice.append(p["proxy_id"])
        at_target = p["current_version"] == job.target_version
        if at_target != (job.status is JobStatus.SUCCEEDED):
            problems.append(
                f"proxy {p['proxy_id']}: simulator runs {p['current_version']}, job is {job.status}"
            )
    if twice:
        problems.append(f"{len(twice)} proxies accepted more than one upgrade")
    for j in jobs.values():
        if j.status is JobStatus.FLAGGED and not j.reason:
            problems.append(f"proxy {j.proxy_id} flagged without a reason")
    return problems
