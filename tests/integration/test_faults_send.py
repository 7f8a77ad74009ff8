"""Issue 11 kinds 1, 2, 3 and 5: what could let a second upgrade call through, or freeze a run.

1. A stalled process (SIGSTOP between its intent and its send) whose claim was taken over never sends its
   stale call when it wakes (SIGCONT): the fence (``runtime.LeaseKeeper``) is checked as the request
   leaves, on the process's own monotonic clock.
2. Two ``run``s of one inventory started together create exactly one run.
3. Clock skew: an orchestrator 3 minutes fast (libfaketime) still matches lost answers to their workflows
   on the cloud's clock, and warns; a PostgreSQL worker 60 s fast does not declare the live runner dead.
5. A SIGSTOPped worker holding a transaction (and the run's advisory lock) costs the others at most a few
   seconds (the session timeouts of ``store.sql.PG_SETTINGS``).

After each, the simulator's log shows no upgrade call after an applied one for the same proxy, and every
workflow id the cloud issued is in the job table.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import Sim, _create_pg_db, cli, cli_bg, db_rows, make_inventory, text_of, wait_until
from tests.faultkit import (
    FAST,
    assert_no_second_upgrade,
    faketime_env,
    freeze_holding_run_lock,
    freeze_when,
    job_statuses,
    parse_ts,
    rows,
    scenario,
    sqlite_unlocked,
    upgraded_proxies,
)
from tests.simlog import upgrades_per_proxy


def outputs(tmp: Path) -> str:
    return "\n".join(f"--- {p.name}\n{text_of(p)[-2500:]}" for p in sorted(tmp.glob("*.out")))


def wait_for_run(db: str, runner: subprocess.Popen[bytes], tmp: Path) -> int:
    return int(
        wait_until(
            "the run to exist",
            lambda: db_rows(db, "SELECT max(r.id) FROM runs r JOIN jobs j ON j.run_id = r.id")[0][0],
            120,
            (runner,),
            lambda: outputs(tmp),
        )
    )


def worker_id_of(db: str, pid: int) -> str:
    rows = db_rows(db, f"SELECT id FROM workers WHERE pid = {pid} ORDER BY started_at DESC")
    assert rows, f"no registration of pid {pid}"
    return str(rows[0][0])


def unsent_intents(db: str, sim: Sim, worker_id: str) -> dict[str, int]:
    """Proxy -> attempt id of the upgrade intents ``worker_id`` recorded (in flight, claimed by it) that
    the cloud has not seen a call for. Asked while that process is frozen: once the simulator has answered
    everything it received (it logs a call when it answers), a call missing from its log never left."""
    if sim.stats()["in_flight"]:
        return {}
    held = rows(
        db,
        "SELECT j.proxy_id, a.id FROM jobs j JOIN attempts a"
        " ON a.job_id = j.id AND a.number = j.attempt_count WHERE j.status = 'in_flight'"
        " AND j.claimed_by = :w AND a.worker = :w AND a.outcome = 'in_flight'",
        w=worker_id,
    )
    seen = upgraded_proxies(sim)
    return {str(p): int(a) for p, a in held if p not in seen}


def finish(ps: list[subprocess.Popen[bytes]], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in ps:
        try:
            codes.append(p.wait(max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(-999)
    return codes


def assert_stale_never_sent(sim: Sim, db: str, stale: dict[str, int], victim_out: Path) -> None:
    """The stalled process never sent the calls of its ``stale`` intents (proxy -> attempt id): it fenced
    each one when it woke, and the cloud saw exactly one call for each of those proxies (sent by whoever took
    the job over, or by the woken process itself on a fresh claim of a job the takeover put back)."""
    calls = upgrades_per_proxy(sim.log())
    assert all(calls[p] == 1 for p in stale), {p: calls[p] for p in stale}
    fenced = [ln for ln in text_of(victim_out).splitlines() if "event='upgrade.fenced'" in ln]
    unfenced = [p for p in stale if not any(f"proxy='{p}'" in ln for ln in fenced)]
    assert not unfenced, f"not fenced: {unfenced}; fenced: {fenced}"
    ids = ", ".join(str(a) for a in stale.values())
    outcomes = dict(rows(db, f"SELECT id, outcome FROM attempts WHERE id IN ({ids})"))
    # not_sent as the frozen process recorded it, or lost once the reconcile that resent concluded nothing
    # had started from it
    assert set(outcomes.values()) <= {"not_sent", "lost"}, outcomes


# ------------------------------------------------------------------ kind 1: the send fence
FENCE_FLAGS = [
    "--rate", "1/s", "--concurrency", "4", "--no-preflight", "--no-wait", "--timeout", "2",
    "--lease", "3", "--heartbeat", "0.5", "--drain-timeout", "10",
]  # fmt: skip


@pytest.mark.slow
def test_a_stalled_process_never_sends_after_its_claim_was_taken_over_pg(
    sim_factory: Callable[..., Sim], tmp_path: Path, pg_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Runner + 2 workers at 1/s: the runner holds intents waiting for send permits; it is frozen, its
    lease (3 s) runs out, the workers reconcile its jobs and resend them; thawed, it never sends them."""
    sim = sim_factory(scenario(20))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    victim = cli_bg(
        "run", str(inv), "--db", pg_url, "--endpoint", sim.url, *FENCE_FLAGS, *FAST,
        stdout=tmp_path / "runner.out",
    )  # fmt: skip
    procs.append(victim)
    run_id = wait_for_run(pg_url, victim, tmp_path)
    vid = worker_id_of(pg_url, victim.pid)
    workers = [
        cli_bg("worker", str(run_id), "--db", pg_url, stdout=tmp_path / f"worker{i}.out") for i in range(2)
    ]
    procs.extend(workers)
    for w in workers:
        wait_until("the workers to register", lambda w=w: worker_id_of(pg_url, w.pid), 60, procs)

    stale: dict[str, int] = freeze_when(victim, lambda: unsent_intents(pg_url, sim, vid), settle=1.0)
    wait_until(
        "the workers to take over and resend a stale job",
        lambda: set(stale) & upgraded_proxies(sim),
        90,
        workers,
        lambda: outputs(tmp_path),
    )
    victim.send_signal(signal.SIGCONT)

    codes = finish([victim, *workers], 180)
    assert codes == [0, 0, 0], f"{codes}\n{outputs(tmp_path)}"
    assert_no_second_upgrade(sim, pg_url)
    assert_stale_never_sent(sim, pg_url, stale, tmp_path / "runner.out")
    assert set(job_statuses(pg_url, run_id).values()) == {"accepted"}, job_statuses(pg_url, run_id)


@pytest.mark.slow
def test_a_stalled_runner_never_sends_after_a_resume_took_its_run_over_sqlite(
    sim_factory: Callable[..., Sim], tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """SQLite: the runner holds intents waiting for its limiter; frozen (outside a transaction), its lease
    runs out, ``resume`` takes the run over and resends; thawed, the old runner sends nothing and stops."""
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    sim = sim_factory(scenario(16))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    old = cli_bg(
        "run", str(inv), "--db", db, "--endpoint", sim.url, *FENCE_FLAGS, *FAST, stdout=tmp_path / "old.out"
    )
    procs.append(old)
    wait_for_run(db, old, tmp_path)
    oid = wait_until("the runner to register", lambda: worker_id_of(db, old.pid), 60, (old,))

    stale: dict[str, int] = freeze_when(
        old, lambda: sqlite_unlocked(db) and unsent_intents(db, sim, oid), settle=1.0
    )
    expires = parse_ts(rows(db, "SELECT lease_expires_at FROM workers WHERE id = :w", w=oid)[0][0])
    wait_until("the frozen runner's lease to run out", lambda: datetime.now(UTC) > expires, 30)
    new = cli_bg("resume", "1", "--db", db, stdout=tmp_path / "new.out")
    procs.append(new)
    wait_until(
        "the resume to take over and resend a stale job",
        lambda: set(stale) & upgraded_proxies(sim),
        90,
        (new,),
        lambda: outputs(tmp_path),
    )
    old.send_signal(signal.SIGCONT)

    codes = finish([new, old], 180)
    assert codes == [0, 3], f"{codes}\n{outputs(tmp_path)}"
    assert "took over from a dead process" in text_of(tmp_path / "new.out")
    assert_no_second_upgrade(sim, db)
    assert_stale_never_sent(sim, db, stale, tmp_path / "old.out")
    assert set(job_statuses(db).values()) <= {"accepted", "succeeded"}, job_statuses(db)
    # the taken-over runner does not mark the run (it goes on in the other process): only the process that
    # finished it did
    marks = db_rows(db, "SELECT to_status FROM events WHERE kind = 'run' ORDER BY id")
    assert ("stopped",) not in marks and marks[-1] == ("finished",), marks
    assert "continue with" not in text_of(tmp_path / "old.out")


# ------------------------------------------------------------------ kind 2: two runs at once
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_runs_of_one_inventory_started_together_create_one_run(
    sim_factory: Callable[..., Sim],
    tmp_path: Path,
    pg_server: str | None,
    procs: list[subprocess.Popen[bytes]],
    backend: str,
) -> None:
    if backend == "postgresql" and pg_server is None:
        pytest.skip("no PostgreSQL here (set ORCHESTRATOR_TEST_PG_URL or install postgresql)")
    for attempt in range(3):
        sim = sim_factory(scenario(12), name=f"sim{attempt}")  # a fleet still to upgrade, each try
        inv = make_inventory(sim, tmp_path / f"fleet{attempt}.yaml")
        db = (
            f"sqlite:///{tmp_path / f'jobs{attempt}.db'}"
            if backend == "sqlite"
            else _create_pg_db(pg_server or "")
        )
        pair = [
            cli_bg(
                "run", str(inv), "--db", db, "--endpoint", sim.url, "--rate", "3/s", "--no-preflight",
                "--no-wait", *FAST, stdout=tmp_path / f"try{attempt}-{i}.out",
            )
            for i in range(2)
        ]  # fmt: skip
        procs.extend(pair)
        codes = sorted(finish(pair, 120))
        texts = "\n".join(text_of(tmp_path / f"try{attempt}-{i}.out") for i in range(2))
        assert codes == [0, 2], f"try {attempt}: exit codes {codes}\n{texts}"
        assert "held by" in texts, texts
        assert db_rows(db, "SELECT count(*) FROM runs")[0][0] == 1, f"try {attempt}: two runs\n{texts}"
        log = assert_no_second_upgrade(sim, db)
        assert upgrades_per_proxy(log) == {p["proxy_id"]: 1 for p in sim.fleet()}, upgrades_per_proxy(log)
        sim.stop()


# ------------------------------------------------------------------ kind 3: clock skew
@pytest.mark.slow
@pytest.mark.parametrize("db_kind", ["sqlite", "postgresql"])
def test_a_host_3_minutes_fast_still_matches_lost_answers_on_the_clouds_clock(
    sim_factory: Callable[..., Sim], tmp_path: Path, pg_server: str | None, db_kind: str
) -> None:
    """Upgrades applied but answered with a reset, a garbled body or nothing at all; workflows longer than
    the reconcile grace (a resend would be refused as busy, or upgrade twice). On a host whose clock is
    180 s ahead of the cloud's, every lost workflow id is found and nothing is resent."""
    if db_kind == "postgresql" and pg_server is None:
        pytest.skip("no PostgreSQL here (set ORCHESTRATOR_TEST_PG_URL or install postgresql)")
    db = f"sqlite:///{tmp_path / 'jobs.db'}" if db_kind == "sqlite" else _create_pg_db(pg_server or "")
    sim = sim_factory(scenario(9, running_s=1600))  # 8 s of real time per workflow
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    proxies = sorted(p["proxy_id"] for p in sim.fleet())
    lost = {"reset_after": proxies[0:2], "malformed_after": proxies[2:4], "timeout_after": proxies[4:6]}
    sim.patch({"proxies": {p: {"script": [{"fault": fault}]} for fault, ps in lost.items() for p in ps}})
    r = cli(
        "run", str(inv), "--db", db, "--endpoint", sim.url, "--rate", "20/s", "--timeout", "3",
        *FAST, env=faketime_env(180), timeout=300,
    )  # fmt: skip
    assert r.code == 0, str(r)
    assert "clock differs from the cloud's" in r.err, r.err  # the warning, with the measured offset
    log = assert_no_second_upgrade(sim, db)
    assert upgrades_per_proxy(log) == {p: 1 for p in proxies}, upgrades_per_proxy(log)
    found = db_rows(
        db,
        "SELECT j.proxy_id, w.workflow_id FROM workflows w JOIN jobs j ON j.id = w.job_id "
        "WHERE w.source = 'reconciled'",
    )
    assert {p for p, _ in found} == {p for ps in lost.values() for p in ps}, found
    # stored with each attempt: the cloud's clock minus the job table's (this host's on SQLite, the
    # server's on PostgreSQL)
    expected = -180.0 if db_kind == "sqlite" else 0.0
    offsets = [o for (o,) in db_rows(db, "SELECT cloud_offset_s FROM attempts")]
    assert offsets and all(o is not None and abs(o - expected) < 5 for o in offsets), offsets
    assert set(job_statuses(db).values()) == {"succeeded"}, job_statuses(db)


@pytest.mark.slow
def test_a_postgres_worker_60s_fast_does_not_declare_the_live_runner_dead(
    sim_factory: Callable[..., Sim], tmp_path: Path, pg_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Leases are written and compared in the database's clock: a worker whose clock is 60 s ahead (and a
    10 s lease) sees the runner alive, takes nothing over and shares the run."""
    sim = sim_factory(scenario(30))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    runner = cli_bg(
        "run", str(inv), "--db", pg_url, "--endpoint", sim.url, "--rate", "3/s", "--concurrency", "4",
        "--no-preflight", "--lease", "10", "--heartbeat", "1", *FAST, stdout=tmp_path / "runner.out",
    )  # fmt: skip
    procs.append(runner)
    run_id = wait_for_run(pg_url, runner, tmp_path)
    worker = cli_bg(
        "worker", str(run_id), "--db", pg_url, stdout=tmp_path / "worker.out", env=faketime_env(60)
    )
    procs.append(worker)
    codes = finish([runner, worker], 240)
    assert codes == [0, 0], f"{codes}\n{outputs(tmp_path)}"
    takeovers = db_rows(
        pg_url,
        "SELECT kind, rule, reason FROM events WHERE kind = 'takeover' OR rule = 'claim:holder-gone'",
    )
    assert not takeovers, takeovers
    # the fast worker took part: it claimed jobs (claims compare leases in the database's clock too)
    claims = dict(db_rows(pg_url, f"SELECT role, claimed FROM workers WHERE run_id = {run_id}"))
    assert claims.get("worker", 0) > 0 and claims.get("runner", 0) > 0, claims
    assert_no_second_upgrade(sim, pg_url)
    assert set(job_statuses(pg_url, run_id).values()) == {"succeeded"}


# ------------------------------------------------------------------ kind 5: a stalled transaction
@pytest.mark.slow
def test_a_worker_frozen_inside_a_transaction_costs_the_others_a_few_seconds(
    sim_factory: Callable[..., Sim], tmp_path: Path, pg_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    # 300 proxies at 5/s: a minute of work; the worker is stopped inside one of its run-lock batches
    # (its permit asks carry its releases, so each ask writes send_log under the run's lock)
    sim = sim_factory(scenario(300))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    runner = cli_bg(
        "run", str(inv), "--db", pg_url, "--endpoint", sim.url, "--rate", "5/s", "--concurrency", "4",
        "--no-preflight", "--no-wait", "--lease", "4", "--heartbeat", "1", *FAST,
        stdout=tmp_path / "runner.out",
    )  # fmt: skip
    procs.append(runner)
    run_id = wait_for_run(pg_url, runner, tmp_path)
    worker = cli_bg("worker", str(run_id), "--db", pg_url, stdout=tmp_path / "worker.out")
    procs.append(worker)
    wid = wait_until("the worker to register", lambda: worker_id_of(pg_url, worker.pid), 60, procs)
    wait_until(
        "the worker to send",
        lambda: rows(pg_url, "SELECT count(*) FROM attempts WHERE worker = :w", w=wid)[0][0],
        60,
        procs,
    )

    freeze_holding_run_lock(worker, pg_url)
    frozen_at = time.time()
    time.sleep(15)
    worker.send_signal(signal.SIGCONT)
    codes = finish([runner, worker], 240)
    assert codes[0] == 0 and codes[1] in (0, 3), f"{codes}\n{outputs(tmp_path)}"

    times = sorted(r["received_at"] for r in sim.log() if frozen_at <= r["received_at"] <= frozen_at + 15)
    gaps = [b - a for a, b in zip([frozen_at, *times], [*times, frozen_at + 15], strict=True)]
    assert len(times) >= 20, f"only {len(times)} calls in the 15 s the worker was frozen"
    assert max(gaps) < 8, f"the cloud got nothing for {max(gaps):.1f}s while a worker was frozen"
    assert_no_second_upgrade(sim, pg_url)
    assert set(job_statuses(pg_url, run_id).values()) <= {"accepted", "succeeded"}
