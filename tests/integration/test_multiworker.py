"""Issue acceptance: several processes sharing one run on PostgreSQL.

One `orchestrator run` (the runner) and N `orchestrator worker RUN` processes work the same job table,
against one real simulator process. The simulator's own call log is the truth: every proxy upgraded
exactly once, the run's rate and concurrency cap held for the sum of all processes, nothing sent twice
and no workflow lost when a worker is SIGKILLed mid-run.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import DBAPIError

from tests.conftest import Sim, cli, cli_bg, db_rows, make_inventory
from tests.simlog import (
    applied_per_proxy,
    created_workflow_ids,
    gateway_width,
    gateway_worst,
    max_in_window,
    upgrades_by_proxy,
)

HOST = socket.gethostname()
# The shared-run acceptance: at least 2,000 proxies at 100 calls/s and 16 at once for the whole run.
# --no-preflight: three calls per proxy (upgrade, one workflow poll, postflight) instead of four, ~61 s
# at the rate; each call costs ~25-30 ms of CPU (orchestrator + simulator), so on a 2-CPU machine the
# run is CPU-bound at about 90-100 s, longer on a shared machine. DEADLINE_S only catches a run that
# does not finish (the time taken is printed, not asserted).
FLEET, RATE, CAP, DEADLINE_S = 2000, 100, 16, 600
FAST = ["--poll-initial", "0.2", "--poll-interval", "0.2", "--reconcile-grace", "1", "--seed", "1"]


# ------------------------------------------------------------------ helpers
def fleet_scenario(
    n: int, *, per_instance: int = 1, multi_node_rate: float = 0.1, **extra: Any
) -> dict[str, Any]:
    """A clean fleet: every proxy can and should be upgraded once (no rejects, no old versions)."""
    base: dict[str, Any] = {
        "seed": 23,
        "speed": 200,
        "latency_s": 0.01,
        "workflow": {"pending_s": 2, "running_s": 4, "job_visible_after_s": 1},
        "fleet": {
            "generate": {
                "proxies": n,
                "proxies_per_instance": per_instance,
                "multi_node_rate": multi_node_rate,
            }
        },
    }
    base.update(extra)
    return base


def wait_until(
    what: str, cond: Callable[[], Any], timeout: float, procs: Sequence[subprocess.Popen[bytes]] = ()
) -> Any:
    """Poll ``cond`` until it returns something truthy (its value is returned); fail after ``timeout``
    or as soon as one of ``procs`` exits with an error."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(DBAPIError, OSError):  # the tables do not exist yet, ...
            value = cond()
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                raise AssertionError(f"{what}: process {p.pid} exited {p.returncode} first")
        time.sleep(0.1)


def wait_for_run(db_url: str, runner: subprocess.Popen[bytes]) -> int:
    """The run's id once `run` has created it with its jobs (the workers need it)."""
    return int(
        wait_until(
            "the run to exist",
            lambda: db_rows(db_url, "SELECT max(r.id) FROM runs r JOIN jobs j ON j.run_id = r.id")[0][0],
            60,
            [runner],
        )
    )


def join_workers(
    runner: subprocess.Popen[bytes], k: int, db_url: str, tmp: Path, procs: list[subprocess.Popen[bytes]]
) -> tuple[int, list[subprocess.Popen[bytes]]]:
    """Start ``k`` `worker RUN` processes (output in ``tmp``/worker<i>.out) on the run the ``runner``
    creates, once it exists. ``runner`` and the workers join ``procs``, killed at the test's end."""
    procs.append(runner)
    run_id = wait_for_run(db_url, runner)
    workers = [cli_bg("worker", str(run_id), "--db", db_url, stdout=tmp / f"worker{i}.out") for i in range(k)]
    procs.extend(workers)
    return run_id, workers


def finish(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(-999)
    return codes


def live_workers(status_out: str) -> list[dict[str, str]]:
    """The rows of the "live workers" table of `orchestrator status RUN`, by column name."""
    if "live workers" not in status_out:
        return []
    lines = status_out[status_out.index("live workers") :].splitlines()
    cells = [
        [c.strip() for c in re.split(r"[│┃]", ln)[1:-1]] for ln in lines if ln.count("│") + ln.count("┃") > 2
    ]
    if not cells:
        return []
    header, *body = cells
    return [dict(zip(header, row, strict=True)) for row in body]


def pid_of(worker_id: str) -> int:
    """Worker ids are host:pid:random."""
    return int(worker_id.rsplit(":", 2)[1])


def outputs(tmp: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(tmp.glob("*.out"))
    )


def progress(sim: Sim, db_url: str, run_id: int, started: float) -> str:
    """Where a run that did not finish stands: job statuses and what the simulator saw."""
    statuses = dict(
        Counter(s for (s,) in db_rows(db_url, f"SELECT status FROM jobs WHERE run_id = {run_id}"))
    )
    times = [r["received_at"] for r in sim.log()]
    span = (max(times) - min(times)) if times else 0.0
    return (
        f"after {time.monotonic() - started:.0f}s: jobs {statuses}; the simulator saw {len(times)} calls "
        f"({len(times) / span if span else 0:.1f}/s on average, busiest second {max_in_window(times, 1.0)}, "
        f"max concurrent {sim.stats()['max_concurrent']})"
    )


def not_finished(codes: list[int], sim: Sim, db_url: str, run_id: int, started: float, tmp: Path) -> str:
    return (
        f"exit codes {codes} (-999: still running after the deadline); "
        f"{progress(sim, db_url, run_id, started)}\n{outputs(tmp)}"
    )


# ------------------------------------------------------------------- tests
@pytest.mark.slow
def test_one_run_three_workers_share_fleet_rate_and_cap(
    sim_factory: Callable[..., Sim], tmp_path: Path, pg_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    n, rate, cap = FLEET, RATE, CAP
    sim = sim_factory(fleet_scenario(n, per_instance=2))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    started = time.monotonic()
    runner = cli_bg(
        "run",
        str(inv),
        "--db",
        pg_url,
        "--endpoint",
        sim.url,
        "--rate",
        f"{rate}/s",
        "--concurrency",
        str(cap),
        "--no-preflight",
        *FAST,
        stdout=tmp_path / "runner.out",
    )
    run_id, workers = join_workers(runner, 3, pg_url, tmp_path, procs)
    pids = {p.pid for p in [runner, *workers]}

    # `status RUN` lists the live workers (host, pid, claimed) while they run
    def all_listed() -> list[dict[str, str]] | None:
        st = cli("status", str(run_id), "--db", pg_url)
        assert st.code == 0, str(st)
        rows = live_workers(st.out)
        return rows if {int(r["pid"]) for r in rows} == pids else None

    rows = wait_until("`status` to list all four processes", all_listed, 60, procs)
    assert sorted(r["role"] for r in rows) == ["runner", "worker", "worker", "worker"], rows
    assert {r["host"] for r in rows} == {HOST}, rows
    for r in rows:
        assert r["claimed now"].isdigit() and r["claimed total"].isdigit(), r
        assert int(r["claimed now"]) <= int(r["claimed total"]), r
    assert any(int(r["claimed total"]) > 0 for r in rows), rows

    codes = finish(procs, DEADLINE_S)
    elapsed = time.monotonic() - started
    assert codes == [0, 0, 0, 0], not_finished(codes, sim, pg_url, run_id, started, tmp_path)

    problems: list[str] = []
    log = sim.log()
    fleet = sim.fleet()
    assert len(fleet) == n
    assert all(p["current_version"] == p["latest_version"] for p in fleet)

    # the simulator's view: every proxy upgraded exactly once, and in this fault-free fleet with one
    # upgrade per instance at a time, with exactly one call
    by_proxy = upgrades_by_proxy(log)
    assert set(by_proxy) == {p["proxy_id"] for p in fleet}
    applied = applied_per_proxy(log)
    if set(applied.values()) != {1} or len(applied) != n:
        problems.append(
            f"proxies not applied exactly once: {[(p, k) for p, k in applied.items() if k != 1][:5]}"
        )
    extra = {
        p: [(r["seq"], r["http_status"], r["error_code"]) for r in recs]
        for p, recs in by_proxy.items()
        if len(recs) != 1
    }
    if extra:
        problems.append(f"{len(extra)} proxies got more than one upgrade call: {list(extra.items())[:3]}")
    # one upgrade per instance at a time holds across processes: the cloud never answered "busy"
    busy = [(r["seq"], r["instance_id"], r["proxy_id"]) for r in log if r["http_status"] == 409]
    if busy:
        problems.append(
            f"{len(busy)} calls answered 409 busy (two upgrades on one instance at once): {busy[:3]}"
        )

    # the run's rate and concurrency cap hold for the sum of the four processes, as the cloud saw it (the
    # rate tolerating the simulator's own stamping lag, see tests/simlog.py)
    api = [rec["received_at"] for rec in log]
    worst = gateway_worst(api, 1.0)
    if worst > rate:
        problems.append(f"{worst} calls within {gateway_width(1.0):g} s (rate {rate}/s)")
    stats = sim.stats()
    if stats["max_concurrent"] > cap:
        problems.append(f"{stats['max_concurrent']} calls at once (cap {cap})")

    # the work was spread: every process sent upgrades; four registrations
    senders = Counter(
        pid_of(w)
        for (w,) in db_rows(
            pg_url,
            f"SELECT a.worker FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.run_id = {run_id}",
        )
    )
    if set(senders) != pids:
        problems.append(f"upgrades per process {dict(senders)}, processes {pids}")
    regs = db_rows(pg_url, f"SELECT role, pid FROM workers WHERE run_id = {run_id}")
    if sorted(regs) != sorted([("runner", runner.pid)] + [("worker", w.pid) for w in workers]):
        problems.append(f"workers table {regs}")

    statuses = Counter(s for (s,) in db_rows(pg_url, f"SELECT status FROM jobs WHERE run_id = {run_id}"))
    if statuses != {"succeeded": n}:
        problems.append(f"job statuses {statuses}")
    issued = created_workflow_ids(log)
    recorded = {
        w
        for (w,) in db_rows(
            pg_url,
            f"SELECT w.workflow_id FROM workflows w JOIN jobs j ON j.id = w.job_id WHERE j.run_id = {run_id}",
        )
    }
    if issued - recorded:
        problems.append(f"workflows lost: {sorted(issued - recorded)[:5]}")
    assert not problems, "\n".join(problems)
    print(
        f"\n{n} proxies, {len(api)} calls, 4 processes: {elapsed:.1f}s; busiest second "
        f"{max_in_window(api, 1.0)} ({worst} within {gateway_width(1.0):g} s); "
        f"max concurrent {stats['max_concurrent']}; upgrades per process {dict(senders)}"
    )


def test_sigkilled_worker_is_taken_over_nothing_sent_twice_nothing_lost(
    sim_factory: Callable[..., Sim], tmp_path: Path, pg_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    """A worker dies (SIGKILL) while an upgrade it sent was applied by the cloud but not yet answered.
    After its lease runs out the others take its jobs over: the lost answer is reconciled (the workflow
    found, not resent) and every job ends succeeded."""
    n = 120
    started = time.monotonic()
    # timeout_after: the cloud applies the upgrade, then never answers; the live processes give up after
    # --timeout and reconcile, the victim is killed while waiting for such an answer.
    sim = sim_factory(
        fleet_scenario(
            n,
            per_instance=2,
            multi_node_rate=0.3,  # a lost answer of a multi-node proxy hides several workflows
            latency_s=0.05,
            faults={"routes": ["upgrade"], "timeout_after": 0.06, "hang_s": 60},
        )
    )
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    runner = cli_bg(
        "run",
        str(inv),
        "--db",
        pg_url,
        "--endpoint",
        sim.url,
        # 30/s: the fleet takes 4 s or more to send, so the victim, which joins after the runner made the
        # run (a process start, 1-2 s on a loaded machine), still finds pending jobs to claim
        "--rate",
        "30/s",
        "--concurrency",
        "8",
        "--timeout",
        "3",
        "--lease",
        "2",
        "--heartbeat",
        "0.5",
        *FAST,
        stdout=tmp_path / "runner.out",
    )
    run_id, workers = join_workers(runner, 2, pg_url, tmp_path, procs)
    victim = workers[0]

    def victim_id() -> str | None:
        rows = db_rows(pg_url, f"SELECT id FROM workers WHERE run_id = {run_id} AND pid = {victim.pid}")
        return rows[0][0] if rows else None

    vid = wait_until("the victim to register", victim_id, 30, procs)

    # Make sure the victim dies holding an upgrade the cloud applied but did not answer: the proxies it
    # claimed and has not sent yet get a scripted timeout_after (applied, then no answer) at the
    # simulator; wait until it has sent one of them (or any other applied, unanswered one).
    rigged: set[str] = set()

    def victim_holds_lost_answer() -> set[str] | None:
        claimed = dict(
            db_rows(
                pg_url, f"SELECT proxy_id, status FROM jobs WHERE run_id = {run_id} AND claimed_by = '{vid}'"
            )
        )
        fresh = {p for p, st in claimed.items() if st == "pending"} - rigged
        if fresh:
            sim.patch({"proxies": {p: {"script": [{"fault": "timeout_after"}]} for p in fresh}})
            rigged.update(fresh)
        hung = {
            r["proxy_id"]
            for r in sim.log()
            if r["route"] == "upgrade" and r["http_status"] == "hang" and r["effect"] == "applied"
        }
        mine = {p for p, st in claimed.items() if st == "in_flight"}
        return (hung & mine) or None

    lost = wait_until(
        "the victim to hold an applied, unanswered upgrade", victim_holds_lost_answer, 60, procs
    )
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    # What the dead worker held. Its lease (2 s, renewed every 0.5 s) keeps these rows claimed for at
    # least 1.5 s after the kill, so this read sees them before anyone takes them over.
    held = dict(
        db_rows(pg_url, f"SELECT proxy_id, status FROM jobs WHERE run_id = {run_id} AND claimed_by = '{vid}'")
    )
    assert set(lost) <= set(held), (lost, held)

    # while the others run: the dead worker is not listed as live
    st = cli("status", str(run_id), "--db", pg_url)
    assert st.code == 0, str(st)
    assert victim.pid not in {int(r["pid"]) for r in live_workers(st.out)}, st.out

    codes = finish([runner, workers[1]], 180)
    assert codes == [0, 0], not_finished(codes, sim, pg_url, run_id, started, tmp_path)

    problems: list[str] = []
    log = sim.log()
    by_proxy = upgrades_by_proxy(log)
    fleet = sim.fleet()
    assert set(by_proxy) == {p["proxy_id"] for p in fleet}
    assert all(p["current_version"] == p["latest_version"] for p in fleet)
    # nothing sent twice: no upgrade call for a proxy after one the cloud applied
    for proxy, recs in by_proxy.items():
        applied = [i for i, r in enumerate(recs) if r["effect"] == "applied"]
        if applied != [len(recs) - 1]:
            problems.append(
                f"sent again after an applied upgrade: {proxy} "
                f"{[(r['seq'], r['effect'], r['http_status'], r['fault']) for r in recs]}"
            )

    # no workflow lost: every id the cloud created is in the job table, under the right proxy
    created = {
        (rec["proxy_id"], w) for rec in log if rec["route"] == "upgrade" for w in rec.get("workflows") or []
    }
    recorded = set(
        db_rows(
            pg_url,
            "SELECT j.proxy_id, w.workflow_id FROM workflows w JOIN jobs j ON j.id = w.job_id "
            f"WHERE j.run_id = {run_id}",
        )
    )
    assert created, "the simulator created no workflow"
    for proxy, wf in sorted(created - recorded):
        rule = db_rows(
            pg_url,
            "SELECT a.rule, a.outcome, a.worker = " + f"'{vid}' FROM attempts a JOIN jobs j ON "
            f"j.id = a.job_id WHERE j.run_id = {run_id} AND j.proxy_id = '{proxy}'",
        )
        nodes = len([w for r in by_proxy[proxy] for w in r.get("workflows") or []])
        problems.append(
            f"workflow {wf} of {proxy} ({nodes} node(s)) created by the cloud, missing from the job "
            f"table; attempts (rule, outcome, by the victim): {rule}"
        )

    jobs = dict(db_rows(pg_url, f"SELECT proxy_id, status FROM jobs WHERE run_id = {run_id}"))
    if Counter(jobs.values()) != {"succeeded": n}:
        problems.append(f"job statuses {Counter(jobs.values())}")

    # the victim's jobs were taken over: the lost answers reconciled (found, not resent) ...
    for proxy in lost:
        rows = db_rows(
            pg_url,
            "SELECT a.number, a.worker, a.outcome, a.rule FROM attempts a JOIN jobs j ON j.id = a.job_id "
            f"WHERE j.run_id = {run_id} AND j.proxy_id = '{proxy}' ORDER BY a.number",
        )
        if [(w, o) for _, w, o, _ in rows] != [(vid, "reconciled")]:
            problems.append(f"lost answer of the dead worker not reconciled: {proxy} {rows}")
    # ... and what it had claimed but not sent was sent by the survivors
    survivors = {runner.pid, workers[1].pid}
    for proxy, status in held.items():
        if status not in ("pending", "retry_wait"):
            continue
        senders = {
            pid_of(w)
            for (w,) in db_rows(
                pg_url,
                "SELECT a.worker FROM attempts a JOIN jobs j ON "
                f"j.id = a.job_id WHERE j.proxy_id = '{proxy}'",
            )
        }
        if not senders or not senders <= survivors:
            problems.append(f"{proxy} (claimed by the dead worker, {status}) sent by {senders}")
    if [r for r in log if r["http_status"] == 409]:
        problems.append("409 busy: two upgrades on one instance at once")
    assert not problems, "\n".join(problems)
