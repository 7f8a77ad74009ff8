"""Issue acceptance: crash-safe runs. Resume after any failure with nothing lost and nothing upgraded twice.

The real CLI runs as a subprocess against the real simulator process on 127.0.0.1 and a real job table.
The orchestrator is killed (SIGKILL), interrupted (SIGINT), frozen (SIGSTOP) and raced by a second
process; the simulator's own call log is the truth it is judged by:

- no proxy gets an upgrade call after one whose effect was ``applied`` (no second upgrade, not even a
  refused one: the orchestrator must know the first one happened);
- every workflow the simulator created is in the ``workflows`` table;
- the job table's final states match the simulator's fleet (succeeded <=> at the target version;
  flagged and failed jobs carry a reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.preflight import version_key
from tests.conftest import (
    Result,
    Sim,
    cli,
    cli_bg,
    db_rows,
    make_inventory,
    on_both_backends_once,
    stop_process,
    text_of,
    wait_until,
)
from tests.simlog import (
    applied_per_proxy,
    created_workflow_ids,
    sent_after_applied,
    upgrade_calls,
    upgrades_per_proxy,
)

HOST = socket.gethostname()
CURRENT = "2.23.12.000"
TARGET = "2.24.03.000"
NEWER = "2.24.06.000"
SUBNET = "Upgrade failed due to insufficient subnet ip"
TERMINAL = {"succeeded", "skipped", "flagged", "failed"}
CLEAN = {"reject_rate": 0, "multi_node_rate": 0, "at_target_rate": 0, "old_version_rate": 0}
QUIET = ["--log-level", "warning"]  # global option: fewer log lines to write (the chaos run is CPU-bound)


def fast(lease: float = 2, heartbeat: float = 0.5) -> list[str]:
    """The hidden test flags: fast polls, a short lease so a killed holder is taken over quickly."""
    return [
        "--poll-initial", "0.1", "--poll-interval", "0.1", "--reconcile-grace", "1",
        "--lease", str(lease), "--heartbeat", str(heartbeat), "--drain-timeout", "15", "--seed", "1",
    ]  # fmt: skip


def scenario(
    n: int,
    *,
    seed: int = 31,
    per_instance: int = 2,
    reject_rate: float = 0.04,
    latency_s: float = 0.01,
    speed: float = 200,
    running_s: float = 20,
    fail_rate: float = 0.01,
    **extra: Any,
) -> dict[str, Any]:
    """A generated fleet with every flavour: clean proxies, subnet REJECTs, mixed multi-node answers,
    proxies already at the target or on an old version, and a few workflows that fail."""
    base: dict[str, Any] = {
        "seed": seed,
        "speed": speed,
        "latency_s": latency_s,
        "current_version": CURRENT,
        "latest_version": TARGET,
        "workflow": {
            "pending_s": 4,
            "running_s": running_s,
            "job_visible_after_s": 2,
            "fail_rate": fail_rate,
        },
        "fleet": {
            "generate": {
                "proxies": n,
                "proxies_per_instance": per_instance,
                "reject_rate": reject_rate,
                "multi_node_rate": 0.1,
                "mixed_rate": 0.5,
                "at_target_rate": 0.02,
                "old_version_rate": 0.01,
            }
        },
    }
    base.update(extra)
    return base


# ------------------------------------------------------------------ helpers
def calls_after_applied(log: list[dict[str, Any]]) -> dict[str, list[tuple[Any, ...]]]:
    """Proxies that got any upgrade call after their first call whose effect was 'applied', with each
    of their calls as (seq, http_status, error_code, effect, workflows) for the message."""
    return {
        proxy: [(r["seq"], r["http_status"], r["error_code"], r["effect"], r["workflows"]) for r in recs]
        for proxy, recs in sent_after_applied(log).items()
    }


def recorded_workflow_ids(db: str) -> set[str]:
    return {w for (w,) in db_rows(db, "SELECT workflow_id FROM workflows WHERE workflow_id IS NOT NULL")}


def jobs_of(db: str, run_id: int = 1) -> dict[str, tuple[str, str, str | None, int]]:
    """proxy_id -> (status, target_version, reason, attempt_count)."""
    rows = db_rows(
        db,
        f"SELECT proxy_id, status, target_version, reason, attempt_count FROM jobs WHERE run_id = {run_id}",
    )
    return {p: (s, t, r, int(a)) for p, s, t, r, a in rows}


def assert_crash_safe(
    sim: Sim, db: str, run_id: int = 1, expect_proxies: set[str] | None = None
) -> dict[str, int]:
    """The three invariants of the issue, judged from the simulator's log and fleet. Returns the job
    status counts."""
    log = sim.log()
    fleet = {p["proxy_id"]: p for p in sim.fleet()}
    jobs = jobs_of(db, run_id)
    if expect_proxies is not None:
        assert set(jobs) == expect_proxies, (len(jobs), len(expect_proxies))

    # 1. nothing upgraded twice: no upgrade call after an accepted (applied) one
    twice = calls_after_applied(log)
    assert not twice, (
        f"{len(twice)} proxies got an upgrade call after one that the cloud had applied "
        f"(seq, http, error_code, effect, workflows): {dict(list(twice.items())[:4])}"
    )

    # 2. nothing lost: every workflow the cloud created is recorded
    missing = created_workflow_ids(log) - recorded_workflow_ids(db)
    lost = [r for r in upgrade_calls(log) if set(r["workflows"] or []) & missing]
    assert not missing, (
        f"{len(missing)} workflows created by the simulator are not in the workflows table: "
        f"{sorted(missing)[:5]}; their proxies: "
        f"{[(r['proxy_id'], jobs.get(r['proxy_id'])) for r in lost][:5]}"
    )

    # every upgrade call the cloud saw was preceded by an intent row of its job (intent before effect)
    sent = upgrades_per_proxy(log)
    over = {p: (n, jobs[p][3]) for p, n in sent.items() if p in jobs and n > jobs[p][3]}
    assert not over, f"upgrade calls without an attempt row (calls, attempt_count): {over}"

    # 3. the job table agrees with the fleet
    applied = applied_per_proxy(log)
    wrong = []
    for proxy, (status, target, reason, _n) in jobs.items():
        at_target = version_key(fleet[proxy]["current_version"]) == version_key(target)
        if status not in TERMINAL:
            wrong.append((proxy, status, "not finished"))
        elif status == "succeeded" and not (at_target and applied[proxy] == 1):
            wrong.append((proxy, status, fleet[proxy]["current_version"], applied[proxy]))
        elif status == "skipped" and not (applied[proxy] == 0 and (at_target or sent[proxy] == 0)):
            # skipped: already at the target, or never sent (removed from the inventory)
            wrong.append((proxy, status, fleet[proxy]["current_version"], applied[proxy]))
        elif status in ("flagged", "failed") and (at_target or not (reason or "").strip()):
            wrong.append((proxy, status, fleet[proxy]["current_version"], reason))
    assert not wrong, f"{len(wrong)} jobs disagree with the simulator's fleet: {wrong[:8]}"
    return dict(Counter(s for s, *_ in jobs.values()))


def expected_exit(counts: dict[str, int]) -> int:
    return 1 if counts.get("flagged", 0) + counts.get("failed", 0) else 0


def n_upgrades(sim: Sim) -> int:
    return sum(1 for r in sim.log() if r["route"] == "upgrade")


def run_until_upgrades(
    k: int, sim: Sim, inv: Path, db: str, out: Path, procs: list[subprocess.Popen[bytes]], *flags: str
) -> subprocess.Popen[bytes]:
    """A background `run` of ``inv`` with ``flags`` and the fast test flags (output in ``out``, killed at
    the test's end through ``procs``), returned once the simulator has seen ``k`` upgrade calls."""
    p = cli_bg("run", str(inv), "--db", db, "--endpoint", sim.url, *flags, *fast(), stdout=out)
    procs.append(p)
    wait_until("a few upgrade calls", lambda: n_upgrades(sim) >= k, 120, (p,), lambda: text_of(out))
    return p


def parse_ts(value: Any) -> datetime:
    """A timestamp column read through a raw query: a datetime (PostgreSQL) or text (SQLite, UTC)."""
    ts = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def runner_rows(db: str) -> list[tuple[Any, ...]]:
    return db_rows(
        db,
        "SELECT id, host, pid, started_at, lease_expires_at, left_at FROM workers "
        "WHERE role = 'runner' ORDER BY started_at",
    )


def wait_quiescent(db: str, holder: subprocess.Popen[bytes]) -> None:
    """SIGSTOP the holder at a moment it holds no database lock (a frozen process inside a write
    transaction would block every other process, which is a different test). Leaves it stopped."""
    for _ in range(200):
        holder.send_signal(signal.SIGSTOP)
        time.sleep(0.05)
        if db.startswith("sqlite"):
            conn = sqlite3.connect(db.split("///", 1)[1], timeout=0, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
                return
            except sqlite3.OperationalError:
                pass
            finally:
                conn.close()
        else:
            busy = db_rows(
                db,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state <> 'idle'",
            )[0][0]
            if busy == 0:
                return
        holder.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError("could not freeze the holder outside a database transaction")


# ------------------------------------------------------------------ chaos
CHAOS_PROXIES = 1000
CHAOS_KILLS = 20
REGISTERED = "SELECT count(*) FROM workers WHERE pid = ? AND left_at IS NULL"


@pytest.mark.slow
def test_chaos_sigkill_and_resume_until_done(
    sim_factory: Callable[..., Sim], tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """SIGKILL the orchestrator at seeded random moments (>= 20 times), resuming each time, until the
    run finishes; then judge the run by the simulator's log and fleet.

    Most kills land a random 0.2-2 s after the process registered as the run's runner (while it
    sends, tracks and records); some land a random moment after the process started (imports,
    migration, inventory check, registration). Start-up takes seconds on a busy machine, so a delay
    counted from the start alone would mostly kill processes that never did anything."""
    sim = sim_factory(scenario(CHAOS_PROXIES, latency_s=0.03))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    path = tmp_path / "jobs.db"
    db = f"sqlite:///{path}"
    flags = ["--rate", "300/s", "--concurrency", "16", *fast()]
    rng = random.Random(20261128)
    started = time.monotonic()
    deadline = started + 600  # a hard bound so a hang fails instead of blocking the suite
    kills = killed_in_flight = 0
    life = 0
    final: int | None = None
    outs: list[Path] = []

    def outputs() -> str:
        return "\n".join(f"--- {p.name}\n{text_of(p)[-1500:]}" for p in outs[-3:])

    def sql(q: str, *args: Any) -> Any:
        try:
            with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
                return conn.execute(q, args).fetchone()[0]
        except sqlite3.OperationalError:  # no such table yet: the first process is still migrating
            return 0

    while final is None:
        assert time.monotonic() < deadline, f"chaos run did not finish in time ({kills} kills)\n{outputs()}"
        out = tmp_path / f"life{life:02d}.out"
        outs.append(out)
        if life == 0:
            args = ["run", str(inv), "--db", db, "--endpoint", sim.url, *flags]
        elif life % 2:
            args = ["resume", "1", "--db", db]
        else:
            args = ["run", str(inv), "--resume", "--db", db, "--endpoint", sim.url, *flags]
        p = cli_bg(*QUIET, *args, stdout=out)
        procs.append(p)
        if kills >= CHAOS_KILLS:  # enough: let this one finish the run
            code = p.wait(max(1.0, deadline - time.monotonic()))
        else:
            during_startup = life > 0 and rng.random() < 0.15
            delay = rng.uniform(0.2, 1.5) if during_startup else rng.uniform(0.2, 2.0)
            if not during_startup:
                # until it holds the run (it may also end first: its exit code is judged below)
                while p.poll() is None and not sql(REGISTERED, p.pid):
                    assert time.monotonic() < deadline, f"life {life} never registered\n{outputs()}"
                    time.sleep(0.05)
                if life == 0:  # the run must have started sending before the first kill
                    wait_until("the first upgrade calls", lambda: n_upgrades(sim) >= 5, 120, (p,), outputs)
            try:
                code = p.wait(delay)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait(30)
                kills += 1
                life += 1
                killed_in_flight += sql("SELECT count(*) FROM jobs WHERE status = 'in_flight'") > 0
                continue
        assert code in (0, 1), f"life {life} ({' '.join(args[:2])}) exited {code}\n{outputs()}"
        final = code
    elapsed = time.monotonic() - started

    assert kills >= 20, f"the run finished after only {kills} kills: make the fleet larger or kills earlier"
    counts = assert_crash_safe(sim, db, expect_proxies={p["proxy_id"] for p in sim.fleet()})
    assert final == expected_exit(counts), (final, counts)
    assert len(sim.fleet()) >= 1000
    assert db_rows(db, "SELECT status FROM runs")[0][0] == "finished"
    # the kills hit calls in flight, and those went through reconciliation (never a blind resend)
    reconciled = db_rows(db, "SELECT count(*) FROM attempts WHERE rule LIKE 'reconcile:%'")[0][0]
    assert killed_in_flight > 0 and reconciled > 0, (killed_in_flight, reconciled)
    took_over = sum("took over from a dead process" in text_of(o) for o in outs)
    assert took_over >= 10, took_over
    print(
        f"\nchaos: {len(sim.fleet())} proxies, {kills} SIGKILLs ({killed_in_flight} with upgrade calls in "
        f"flight), {life + 1} lives, {elapsed:.0f}s, jobs {counts}, {reconciled} attempts reconciled, "
        f"{len(sim.log())} API calls"
    )


# ------------------------------------------------------------------ SIGINT
@pytest.mark.slow
def test_sigint_stops_with_exit_3_nothing_lost_and_resume_completes(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    sim = sim_factory(scenario(40, per_instance=1, latency_s=0.3, reject_rate=0.1))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    out = tmp_path / "run.out"
    p = run_until_upgrades(6, sim, inv, db_url, out, procs, "--rate", "10/s", "--concurrency", "4")
    p.send_signal(signal.SIGINT)
    code = p.wait(60)
    text = text_of(out)
    assert code == 3, f"exit {code}\n{text}"
    assert "orchestrator resume 1" in text, text  # says how to resume
    assert "SIGINT" in text

    # nothing lost: the calls in flight answered and were committed before exit
    log = sim.log()
    assert not created_workflow_ids(log) - recorded_workflow_ids(db_url)
    assert db_rows(db_url, "SELECT count(*) FROM jobs WHERE status = 'in_flight'")[0][0] == 0
    assert db_rows(db_url, "SELECT count(*) FROM attempts WHERE outcome = 'in_flight'")[0][0] == 0
    sent = db_rows(db_url, "SELECT count(*) FROM attempts WHERE outcome <> 'not_sent'")[0][0]
    assert sent == len(upgrade_calls(log)), "every call the cloud saw has its answered attempt row"
    left = db_rows(db_url, "SELECT count(*) FROM jobs WHERE status IN ('pending', 'retry_wait')")[0][0]
    assert left > 0, "the run was stopped before the end"
    assert db_rows(db_url, "SELECT status FROM runs")[0][0] == "stopped"

    r = cli("resume", "1", "--db", db_url, "--rate", "100/s", "--concurrency", "8")
    counts = assert_crash_safe(sim, db_url, expect_proxies={p["proxy_id"] for p in sim.fleet()})
    assert r.code == expected_exit(counts) == 1, f"{counts}\n{r}"
    assert counts.get("flagged", 0) > 0
    assert db_rows(db_url, "SELECT status FROM runs")[0][0] == "finished"


# ------------------------------------------------------------------ one runner per run
def start_holder(sim: Sim, inv: Path, db: str, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A `run` that keeps the run busy for a while; returned once it is registered and sending."""
    holder = cli_bg("run", str(inv), "--db", db, "--endpoint", sim.url, "--rate", "5/s", *extra, stdout=out)
    wait_until(
        "the holder to register and send",
        lambda: n_upgrades(sim) >= 2 and runner_rows(db),
        120,
        (holder,),
        lambda: text_of(out),
    )
    return holder


@pytest.mark.slow
def test_second_runner_is_refused_naming_the_holder_and_takes_over_a_killed_one(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    sim = sim_factory(scenario(40, per_instance=1, latency_s=0.05))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    holder = start_holder(sim, inv, db_url, tmp_path / "holder.out", *fast())
    procs.append(holder)
    (_, host, pid, *_rest) = runner_rows(db_url)[0]
    assert (host, pid) == (HOST, holder.pid)

    for args in (["run", str(inv), "--resume", "--endpoint", sim.url], ["resume", "1"]):
        second = cli(*args, "--db", db_url, *fast())
        assert second.code == 2, str(second)
        msg = second.err
        assert f"pid {holder.pid}" in msg and HOST in msg, msg  # names the holder (host, pid)
        assert "held" in msg, msg
    assert holder.poll() is None, "the refused processes did not disturb the holder"
    assert len(runner_rows(db_url)) == 1, "a refused process leaves no registration"

    # SIGKILL the holder: a resume from this host takes over at once (its pid is gone)
    holder.kill()
    holder.wait(10)
    r = cli("resume", "1", "--db", db_url, "--rate", "100/s", "--concurrency", "8")
    assert "took over from a dead process" in r.err, str(r)
    counts = assert_crash_safe(sim, db_url, expect_proxies={p["proxy_id"] for p in sim.fleet()})
    assert r.code == expected_exit(counts), f"{counts}\n{r}"
    rows = runner_rows(db_url)
    assert len(rows) == 2 and rows[0][5] is not None  # the dead holder's registration was closed


@pytest.mark.slow
def test_a_refused_runner_changes_nothing_in_the_held_run(
    sim_factory: Callable[..., Sim], tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """The refused process came with a grown inventory and other options: it must not touch the run
    another process is working on (add jobs, retarget, rewrite options) before being refused."""
    sim = sim_factory(scenario(30, per_instance=1, latency_s=0.05))
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    exported = yaml.safe_load(make_inventory(sim, tmp_path / "export.yaml").read_text())
    inv = tmp_path / "fleet.yaml"  # the last proxy of the fleet joins the inventory later
    inv.write_text(yaml.safe_dump({**exported, "proxies": exported["proxies"][:-1]}, sort_keys=False))
    holder = start_holder(sim, inv, db, tmp_path / "holder.out", *fast())
    procs.append(holder)

    inv.write_text(yaml.safe_dump(exported, sort_keys=False))
    options = db_rows(db, "SELECT options FROM runs")
    before = table_counts(db)
    second = cli(
        "run",
        str(inv),
        "--resume",
        "--db",
        db,
        "--endpoint",
        sim.url,
        "--rate",
        "77/s",
        "--concurrency",
        "3",
        *fast(),
    )
    assert second.code == 2 and f"pid {holder.pid}" in second.err, str(second)
    assert holder.poll() is None
    problems = []
    if db_rows(db, "SELECT count(*) FROM jobs")[0][0] != before["jobs"]:
        problems.append("it added the new proxy's job to the held run")
    if db_rows(db, "SELECT options FROM runs") != options:
        problems.append("it rewrote the held run's options (rate, concurrency)")
    assert not problems, f"the refused process changed the run: {problems}\n{second}"

    holder.kill()
    holder.wait(10)
    r = cli("resume", "1", "--db", db, "--rate", "100/s", "--concurrency", "8")
    assert "+1 added" in r.err, str(r)  # the grown inventory is taken in by the resume that runs
    counts = assert_crash_safe(sim, db, expect_proxies={p["proxy_id"] for p in sim.fleet()})
    assert r.code == expected_exit(counts), f"{counts}\n{r}"


@pytest.mark.slow
def test_frozen_holder_keeps_the_run_until_its_lease_expires_then_is_taken_over(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    """The lease path, not the dead-pid shortcut: a SIGSTOPped holder is alive (its pid exists) but sends
    no heartbeat. Others are refused while its lease is live and take over once it expired."""
    lease = 10.0
    sim = sim_factory(scenario(30, per_instance=1, latency_s=0.05, running_s=200))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    out = tmp_path / "holder.out"
    holder = cli_bg(
        "run",
        str(inv),
        "--db",
        db_url,
        "--endpoint",
        sim.url,
        "--rate",
        "10/s",
        *fast(lease=lease),
        stdout=out,
    )
    procs.append(holder)
    wait_until(
        "the holder to register and send",
        lambda: n_upgrades(sim) >= 4 and runner_rows(db_url),
        120,
        (holder,),
        lambda: text_of(out),
    )
    wait_quiescent(db_url, holder)  # frozen: alive, no heartbeat, no lock held
    holder_id, _host, pid, _started, expires, left = runner_rows(db_url)[0]
    assert pid == holder.pid and left is None
    lease_end = parse_ts(expires).timestamp()

    attempts: list[tuple[float, Result]] = []
    while True:
        launched = time.time()
        r = cli("resume", "1", "--db", db_url, "--rate", "100/s", "--concurrency", "8")
        attempts.append((launched, r))
        if r.code != 2:
            break
        assert f"pid {holder.pid}" in r.err and HOST in r.err, str(r)
        # a refusal is only right while the lease is live
        assert launched < lease_end, f"refused {launched - lease_end:.1f}s after the holder's lease expired"
        assert time.time() < lease_end + 60, "not taken over a minute after the lease expired"
        time.sleep(0.5)
    assert len(attempts) >= 2 and attempts[0][1].code == 2, (
        f"the first attempt, {lease_end - attempts[0][0]:.1f}s before the lease end, was not refused: "
        f"{attempts[0][1]}"
    )
    r = attempts[-1][1]
    assert "took over from a dead process" in r.err, str(r)
    rows = {row[0]: row for row in runner_rows(db_url)}
    assert rows[holder_id][5] is not None, "the frozen holder's registration was closed"
    new = [row for wid, row in rows.items() if wid != holder_id]
    assert len(new) == 1
    assert parse_ts(new[0][3]) >= parse_ts(expires), "taken over only once the lease had expired"

    stop_process(holder)  # SIGKILL the frozen one
    counts = assert_crash_safe(sim, db_url, expect_proxies={p["proxy_id"] for p in sim.fleet()})
    assert r.code == expected_exit(counts), f"{counts}\n{r}"


# ------------------------------------------------------------------ finished and unfinished runs
def table_counts(db: str) -> dict[str, int]:
    return {
        t: db_rows(db, f"SELECT count(*) FROM {t}")[0][0]
        for t in ("runs", "jobs", "attempts", "workflows", "workers")
    }


@on_both_backends_once("reject_rate", [0.2, 0.0], ids=["flagged", "clean"])
def test_resume_of_a_finished_run_says_so_and_changes_nothing(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str, reject_rate: float
) -> None:
    sim = sim_factory(
        scenario(
            12,
            per_instance=1,
            reject_rate=reject_rate,
            fail_rate=0,
            fleet={
                "generate": {"proxies": 12, "proxies_per_instance": 1, **CLEAN, "reject_rate": reject_rate}
            },
        )
    )
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    first = cli("run", str(inv), "--db", db_url, "--endpoint", sim.url, "--rate", "100/s", *fast())
    counts = assert_crash_safe(sim, db_url)
    want = expected_exit(counts)
    assert first.code == want == (1 if reject_rate else 0), f"{counts}\n{first}"

    before = table_counts(db_url)
    jobs_before = db_rows(
        db_url, "SELECT id, status, attempt_count, updated_at, reason FROM jobs ORDER BY id"
    )
    run_before = db_rows(db_url, "SELECT status, finished_at, stop_reason FROM runs")
    calls = len(sim.log())
    for args in (["resume", "1"], ["resume", "1", "--rate", "50/s"]):
        r = cli(*args, "--db", db_url)
        assert r.code == want, str(r)
        assert "already finished" in r.out + r.err, str(r)
        assert table_counts(db_url) == before
        assert (
            db_rows(db_url, "SELECT id, status, attempt_count, updated_at, reason FROM jobs ORDER BY id")
            == jobs_before
        )
        assert db_rows(db_url, "SELECT status, finished_at, stop_reason FROM runs") == run_before
        assert len(sim.log()) == calls, "a finished run sends nothing"


@pytest.mark.slow
def test_run_refuses_an_inventory_whose_last_run_is_unfinished(
    sim_factory: Callable[..., Sim], tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    sim = sim_factory(scenario(30, per_instance=1))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    out = tmp_path / "run.out"
    p = run_until_upgrades(3, sim, inv, db, out, procs, "--rate", "5/s")
    p.kill()
    p.wait(10)
    calls = len(sim.log())
    before = table_counts(db)

    r = cli("run", str(inv), "--db", db, "--endpoint", sim.url, *fast(), input="")  # stdin: not a tty
    assert r.code == 2, str(r)
    err = r.err.strip()
    assert "run 1" in err and "unfinished" in err, err
    assert "--resume" in err and "--new-run" in err, err
    assert len(err.splitlines()) == 1, err
    assert table_counts(db) == before, "the refusal wrote nothing"
    assert len(sim.log()) == calls, "the refusal sent nothing"

    r = cli("run", str(inv), "--resume", "--db", db, "--endpoint", sim.url, "--rate", "100/s", *fast())
    print(r)
    assert "took over from a dead process" in r.err, str(r)
    counts = assert_crash_safe(sim, db, expect_proxies={p["proxy_id"] for p in sim.fleet()})
    assert r.code == expected_exit(counts), f"{counts}\n{r}"
    assert db_rows(db, "SELECT count(*) FROM runs")[0][0] == 1


def test_inventory_changed_before_resume_is_reported_and_applied(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    """A proxy added to the file is upgraded; a new target applies to proxies not yet sent (the others
    keep theirs); a proxy removed before it was sent is skipped."""
    # the cloud offers NEWER; the run starts with TARGET, and the edit raises one proxy to NEWER
    sim = sim_factory(
        scenario(
            24,
            per_instance=1,
            reject_rate=0,
            fail_rate=0,
            latest_version=NEWER,
            fleet={"generate": {"proxies": 24, "proxies_per_instance": 1, **CLEAN}},
        )
    )
    exported = yaml.safe_load(make_inventory(sim, tmp_path / "export.yaml").read_text())
    assert exported["defaults"]["target_version"] == NEWER
    exported["defaults"]["target_version"] = TARGET
    everyone = list(exported["proxies"])
    added = everyone[-1]
    inv = tmp_path / "fleet.yaml"
    inv.write_text(yaml.safe_dump({**exported, "proxies": everyone[:-1]}, sort_keys=False))

    out = tmp_path / "run.out"
    p = run_until_upgrades(3, sim, inv, db_url, out, procs, "--rate", "4/s", "--concurrency", "2")
    p.send_signal(signal.SIGINT)
    assert p.wait(60) == 3, text_of(out)

    jobs = jobs_of(db_url)
    sent = sorted(x for x, (s, _t, _r, n) in jobs.items() if n > 0)
    unsent = sorted(x for x, (s, _t, _r, n) in jobs.items() if s == "pending" and n == 0)
    assert sent and len(unsent) >= 2, jobs
    retarget_sent, retarget_new, removed = sent[0], unsent[0], unsent[1]

    entries = []
    for e in everyone:  # now with the added proxy
        if e["proxy_id"] == removed:
            continue
        if e["proxy_id"] in (retarget_sent, retarget_new):
            e = {**e, "target_version": NEWER}
        entries.append(e)
    inv.write_text(yaml.safe_dump({**exported, "proxies": entries}, sort_keys=False))

    r = cli("resume", "1", "--db", db_url, "--rate", "100/s", "--concurrency", "8")
    assert (
        "changed" in r.err
        and "+1 added" in r.err
        and "-1 removed" in r.err
        and "2 with a new target" in r.err
    ), str(r)
    assert retarget_new in r.err and retarget_sent in r.err and removed in r.err, str(r)

    fleet = {x["proxy_id"]: x for x in sim.fleet()}
    counts = assert_crash_safe(sim, db_url, expect_proxies={e["proxy_id"] for e in everyone})
    assert r.code == expected_exit(counts), f"{counts}\n{r}"
    jobs = jobs_of(db_url)
    # the added proxy joined the run and was upgraded
    assert jobs[added["proxy_id"]][:2] == ("succeeded", TARGET), jobs[added["proxy_id"]]
    assert fleet[added["proxy_id"]]["current_version"] == TARGET
    # the new target applies to the proxy not yet sent
    assert jobs[retarget_new][:2] == ("succeeded", NEWER)
    assert fleet[retarget_new]["current_version"] == NEWER
    # ... and not to the one already sent (it keeps the target it was sent with)
    assert jobs[retarget_sent][1] == TARGET
    assert version_key(fleet[retarget_sent]["current_version"]) <= version_key(TARGET)
    # the removed proxy, never sent, is skipped and the cloud never heard of it
    assert jobs[removed][0] == "skipped" and "removed" in (jobs[removed][2] or ""), jobs[removed]
    assert not [x for x in sim.log() if x["route"] == "upgrade" and x["proxy_id"] == removed]
    assert fleet[removed]["current_version"] == CURRENT


# ------------------------------------------------------------------ crash mid-migration
def schema_tables(url: str) -> set[str]:
    if url.startswith("sqlite"):
        q = "SELECT name FROM sqlite_master WHERE type IN ('table', 'index') AND name NOT LIKE 'sqlite_%'"
    else:
        q = (
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' UNION "
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'"
        )
    return {n for (n,) in db_rows(url, q)}


class Crash(Exception):
    pass


@pytest.mark.empty_db  # migrates an empty database itself
def test_crash_halfway_through_a_migration_leaves_no_partial_schema(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alembic import op

    from orchestrator.store import db

    real = op.create_table
    made: list[str] = []

    def crashing_create_table(name: str, *cols: Any, **kw: Any) -> Any:
        if len(made) == 2:  # two tables (and an index) are in: the process "dies" here
            raise Crash("simulated crash halfway through the migration")
        made.append(name)
        return real(name, *cols, **kw)

    monkeypatch.setattr(op, "create_table", crashing_create_table)

    async def migrate() -> None:
        engine = db.create_engine(db.normalize_url(db_url))
        try:
            await db.upgrade(engine)
        finally:
            await engine.dispose()

    with pytest.raises(Crash):
        asyncio.run(migrate())
    assert len(made) == 2, made
    assert schema_tables(db_url) == set(), "the half-done migration left tables behind"

    async def revision() -> str | None:
        engine = db.create_engine(db.normalize_url(db_url))
        try:
            return await db.current_revision(engine)
        finally:
            await engine.dispose()

    assert asyncio.run(revision()) is None
    monkeypatch.setattr(op, "create_table", real)

    r = cli("db", "upgrade", "--db", db_url)
    assert r.code == 0, str(r)
    head = cli("db", "current", "--db", db_url)
    assert head.code == 0 and head.out.strip() not in ("", "None"), str(head)
    assert {
        "runs",
        "jobs",
        "attempts",
        "workflows",
        "workers",
        "send_log",
        "alembic_version",
    } <= schema_tables(db_url)
    # the table is usable: an empty status listing
    st = cli("status", "--db", db_url)
    assert st.code == 0 and "no runs yet" in st.out, str(st)
