"""``orchestrator demo``: a maintenance window rehearsed end to end on this machine.

Starts the simulator on a free loopback port with the bundled scenario, writes an inventory for its
fleet, runs it into a fresh SQLite job table, prints the summary and two audit queries (run for real),
and checks the outcome against the simulator's own record: every workflow it created is in the job
table, no proxy was upgraded twice, every proxy it upgraded is ``succeeded`` and every proxy the
scenario rejects for subnet IPs is ``flagged`` with that reason. Exit 0 only if all of that holds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import text

from orchestrator import reporting, service
from orchestrator.options import RunOptions
from orchestrator.states import JobStatus
from orchestrator.store import JobStore, open_store

DEMO_OPTIONS = RunOptions(
    rate="50/s",
    concurrency=16,
    timeout=10.0,
    poll_initial=0.5,
    poll_interval=0.5,
    poll_timeout=120.0,
    reconcile_grace=3.0,
    lease=10.0,
    heartbeat=2.0,
    seed=7,
)


async def run_demo(db: str, proxies: int | None, out: Console, err: Console) -> int:
    from orchestrator.simulator import SimulatorServer, generate_scenario, load_bundled, scenario_to_inventory

    scenario = load_bundled() if proxies is None else generate_scenario(proxies, seed=7, speed=10.0)
    db_path = Path(db)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="orchestrator-demo-") as tmp:
        inventory = str(Path(tmp) / "demo-fleet.yaml")
        scenario_to_inventory(scenario, inventory, fmt="yaml")
        async with SimulatorServer(scenario) as sim:
            err.print(f"simulator (bundled scenario) listening on {sim.url}")
            options = DEMO_OPTIONS.override(endpoint_override=sim.url)
            inv = service.load(inventory, sim.url)
            options = service.options_with_policy(options, inv, None)
            store = await open_store(str(db_path))
            try:
                run = await store.create_run(
                    name="demo",
                    inventory_path=inventory,
                    inventory_sha256=inv.sha256,
                    options=options.to_dict(),
                    jobs=service.entries_as_jobs(inv),
                    now=service.utcnow(),
                )
                err.print(
                    f"run {run.id}: {inv.count} proxies at {options.rate}, concurrency {options.concurrency}"
                )
                result = await service.drive(store, run, options, role="runner", console=err)
                counts = await store.counts(run.id)
                fresh = await store.get_run(run.id) or run
                out.print(
                    reporting.counts_table(fresh, counts, title=f"demo run {run.id}: {inv.count} proxies")
                )
                await _audit_examples(store, run.id, out, db_path)
                problems = await _check(store, run.id, sim, scenario)
            finally:
                await store.close()
    if result.exit_code not in (0, 1):
        err.print(f"the demo run did not finish: {result.message}")
        return result.exit_code
    if problems:
        for p in problems:
            err.print(f"[red]not as the scenario predicts:[/] {p}")
        return 1
    out.print(
        f"[green]the run ended as the scenario predicts[/] (simulator: {sim.stats['total_calls']} calls, "
        f"at most {sim.stats['max_concurrent']} at once)"
    )
    out.print(f"job table: {db_path} (try: orchestrator report {run.id} --db {db_path})")
    return 0


async def _audit_examples(store: JobStore, run_id: int, out: Console, db_path: Path) -> None:
    flagged = await store.jobs(run_id, [JobStatus.FLAGGED])
    sample = flagged[0].proxy_id if flagged else (await store.jobs(run_id))[0].proxy_id
    for title, sql in reporting.AUDIT_QUERIES[:2]:
        q = sql.format(run=run_id, proxy=sample)
        out.print(f"\n[bold]audit query: {title}[/]  (sqlite3 {db_path})")
        out.print(q, markup=False)
        async with store.session() as s:
            res = await s.execute(text(q))
            rows = res.all()
            cols = list(res.keys())
        t = Table(*cols)
        for row in rows[:8]:
            t.add_row(*("" if v is None else str(v) for v in row))
        out.print(t)
        if len(rows) > 8:
            out.print(f"... {len(rows) - 8} more rows")


async def _check(store: JobStore, run_id: int, sim: Any, scenario: Any) -> list[str]:
    problems: list[str] = []
    fleet = sim.fleet.snapshot() if hasattr(sim.fleet, "snapshot") else None
    known = await store.known_workflow_ids(run_id)
    jobs = {j.proxy_id: j for j in await store.jobs(run_id)}
    created = set()
    upgraded_twice = []
    for rec in sim.log:
        if rec.get("route") == "upgrade":
            for item in rec.get("items") or []:
                if item.get("workflow_id"):
                    created.add(item["workflow_id"])
    missing = created - known
    if missing:
        problems.append(f"{len(missing)} workflow ids the simulator created are missing from the job table")
    proxies = fleet if fleet is not None else []
    for p in proxies:
        job = jobs.get(p["proxy_id"])
        if job is None:
            continue
        if p.get("accepted_calls", 0) > 1:
            upgraded_twice.append(p["proxy_id"])
        at_target = p["current_version"] == job.target_version
        if at_target != (job.status is JobStatus.SUCCEEDED):
            problems.append(
                f"proxy {p['proxy_id']}: simulator runs {p['current_version']}, job is {job.status}"
            )
    if upgraded_twice:
        problems.append(f"{len(upgraded_twice)} proxies accepted more than one upgrade")
    for j in jobs.values():
        if j.status is JobStatus.FLAGGED and not j.reason:
            problems.append(f"proxy {j.proxy_id} flagged without a reason")
    return problems
