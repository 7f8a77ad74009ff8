"""Issue 11 kind 4: the job table goes away mid-run.

A database that comes back within ``--db-outage-timeout`` is waited for and the run goes on; one that
does not gives a clean stop: a line naming the cause, exit 3, and ``resume`` continues the run. The
faults are real: ``pg_ctl restart``/``stop`` of a PostgreSQL cluster the test started itself, a SQLite
write lock held by another process, a job table made read-only (``chattr +i`` on SQLite, a read-only
database on PostgreSQL, as after a fail-over to a standby). After each: no upgrade call after an applied
one for the same proxy, every workflow id the cloud issued is in the job table.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Sim, cli, cli_bg, db_rows, make_inventory, text_of, wait_until
from tests.faultkit import (
    FAST,
    PgCluster,
    assert_no_second_upgrade,
    fresh_db,
    job_statuses,
    private_cluster,
    scenario,
    sqlite_file,
    upgraded_proxies,
)

DONE = {"succeeded"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    yield from private_cluster()


def n_upgrades(sim: Sim) -> int:
    return len(upgraded_proxies(sim))


def start_run(
    sim: Sim, inv: Path, db: str, out: Path, procs: list[subprocess.Popen[bytes]], *flags: str
) -> subprocess.Popen[bytes]:
    p = cli_bg("run", str(inv), "--db", db, "--endpoint", sim.url, *flags, *FAST, stdout=out)
    procs.append(p)
    return p


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-3000:]


# ------------------------------------------------------------------ PostgreSQL restarted / stopped
def test_pg_restart_mid_run_is_waited_for_and_the_run_goes_on(
    sim_factory: Callable[..., Sim], tmp_path: Path, cluster: PgCluster, procs: list[subprocess.Popen[bytes]]
) -> None:
    db = fresh_db(cluster)
    sim = sim_factory(scenario(16))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    out = tmp_path / "run.out"
    p = start_run(sim, inv, db, out, procs, "--rate", "4/s", "--concurrency", "4")
    wait_until("a few upgrade calls", lambda: n_upgrades(sim) >= 4, 120, (p,), lambda: text_of(out))
    cluster.restart("fast")
    at_restart = n_upgrades(sim)
    code = p.wait(180)
    text = text_of(out)
    assert code == 0, f"exit {code}\n{text}"
    no_traceback(text)
    assert at_restart < 16, "the run was over before the restart"
    assert_no_second_upgrade(sim, db)
    assert set(job_statuses(db).values()) <= DONE, job_statuses(db)
    assert db_rows(db, "SELECT status FROM runs") == [("finished",)]


def test_pg_down_longer_than_the_outage_budget_stops_cleanly_and_resume_continues(
    sim_factory: Callable[..., Sim], tmp_path: Path, cluster: PgCluster, procs: list[subprocess.Popen[bytes]]
) -> None:
    db = fresh_db(cluster)
    sim = sim_factory(scenario(16))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    out = tmp_path / "run.out"
    p = cli_bg(
        "--log-format", "json", "run", str(inv), "--db", db, "--endpoint", sim.url, "--rate", "4/s",
        "--concurrency", "4", "--db-outage-timeout", "4", *FAST, stdout=out,
    )  # fmt: skip
    procs.append(p)
    wait_until("a few upgrade calls", lambda: n_upgrades(sim) >= 4, 120, (p,), lambda: text_of(out))
    cluster.stop("fast")
    stopped = time.monotonic()
    try:
        code = p.wait(120)
        took = time.monotonic() - stopped
    finally:
        cluster.start()
    text = text_of(out)
    assert code == 3, f"exit {code}\n{text}"
    assert took < 60, f"took {took:.0f}s to stop with a 4 s outage budget"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    events = []
    for ln in lines:  # --log-format json: every line is an event, never a raw traceback
        try:
            events.append(json.loads(ln))
        except ValueError:
            raise AssertionError(f"not a JSON line: {ln!r}\n{text[-3000:]}") from None
    causes = [e for e in events if "unreachable" in json.dumps(e)]
    assert causes and any("PostgreSQL" in json.dumps(e) for e in causes), text[-3000:]
    assert any("orchestrator resume 1" in json.dumps(e) for e in events), text[-3000:]

    # resume continues it, with its own outage budget (not the 60 s default of opening the table)
    out2 = tmp_path / "resume.out"
    base = n_upgrades(sim)
    again = cli_bg("resume", "1", "--db", db, "--rate", "2/s", "--db-outage-timeout", "3", stdout=out2)
    procs.append(again)
    wait_until("the resume to send", lambda: n_upgrades(sim) > base, 120, (again,), lambda: text_of(out2))
    cluster.stop("fast")
    stopped = time.monotonic()
    try:
        code = again.wait(120)
        took = time.monotonic() - stopped
    finally:
        cluster.start()
    assert code == 3 and took < 30, f"exit {code} after {took:.0f}s\n{text_of(out2)}"
    no_traceback(text_of(out2))

    r = cli("resume", "1", "--db", db, "--rate", "50/s")
    assert r.code == 0, str(r)
    assert_no_second_upgrade(sim, db)
    assert set(job_statuses(db).values()) <= DONE, job_statuses(db)
    assert db_rows(db, "SELECT status FROM runs") == [("finished",)]


def test_pg_made_read_only_stops_cleanly_with_exit_3(
    sim_factory: Callable[..., Sim], tmp_path: Path, cluster: PgCluster, procs: list[subprocess.Popen[bytes]]
) -> None:
    """A fail-over to a read-only standby, as the orchestrator sees it: its sessions end and every new one
    is read-only. Waited for like an outage, then a clean stop; writable again, ``resume`` finishes."""
    db = fresh_db(cluster)
    name = db.rsplit("/", 1)[1]
    sim = sim_factory(scenario(16))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    out = tmp_path / "run.out"
    p = start_run(sim, inv, db, out, procs, "--rate", "4/s", "--concurrency", "4", "--db-outage-timeout", "3")
    wait_until("a few upgrade calls", lambda: n_upgrades(sim) >= 4, 120, (p,), lambda: text_of(out))
    cluster.sql("postgres", f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    cluster.sql(
        "postgres", f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    )
    try:
        code = p.wait(120)
    finally:
        cluster.sql("postgres", f'ALTER DATABASE "{name}" SET default_transaction_read_only = off')
    text = text_of(out)
    assert code == 3, f"exit {code}\n{text}"
    no_traceback(text)
    assert "read-only" in text, text[-3000:]

    r = cli("resume", "1", "--db", db, "--rate", "50/s")
    assert r.code == 0, str(r)
    assert_no_second_upgrade(sim, db)
    assert set(job_statuses(db).values()) <= DONE, job_statuses(db)


# ------------------------------------------------------------------ SQLite locked / read-only
@pytest.mark.slow
def test_sqlite_lock_held_past_the_busy_timeout_is_waited_for(
    sim_factory: Callable[..., Sim], tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Another process (an auditor's shell, a backup) holds the write lock 8 s: longer than the busy
    timeout (5 s), shorter than the outage budget (60 s). The run waits and goes on."""
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    sim = sim_factory(scenario(16))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    out = tmp_path / "run.out"
    p = start_run(sim, inv, db, out, procs, "--rate", "4/s", "--concurrency", "4")
    wait_until("a few upgrade calls", lambda: n_upgrades(sim) >= 4, 120, (p,), lambda: text_of(out))
    holder = sqlite3.connect(sqlite_file(db), timeout=30, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        time.sleep(8)
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    code = p.wait(180)
    text = text_of(out)
    assert code == 0, f"exit {code}\n{text}"
    no_traceback(text)
    assert "db.down" in text and "db.recovered" in text, text
    assert_no_second_upgrade(sim, db)
    assert set(job_statuses(db).values()) <= DONE, job_statuses(db)


def chattr(flag: str, *paths: Path) -> None:
    for path in paths:
        if path.exists():
            subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)


def test_sqlite_made_read_only_stops_cleanly_with_exit_3(
    sim_factory: Callable[..., Sim], tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """The job table file (and its WAL) made immutable under the running process: every write fails.
    One line naming the cause, exit 3, no traceback; writable again, ``resume`` finishes."""
    path = tmp_path / "jobs.db"
    db = f"sqlite:///{path}"
    probe = tmp_path / "probe"
    probe.write_text("x")
    try:
        chattr("+i", probe)
        chattr("-i", probe)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("chattr +i is not possible here (needs CAP_LINUX_IMMUTABLE and ext4/xfs)")
    sim = sim_factory(scenario(16))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    out = tmp_path / "run.out"
    p = start_run(sim, inv, db, out, procs, "--rate", "4/s", "--concurrency", "4", "--db-outage-timeout", "3")
    wait_until("a few upgrade calls", lambda: n_upgrades(sim) >= 4, 120, (p,), lambda: text_of(out))
    files = [path, Path(f"{path}-wal")]  # not -shm: it is mapped, and an immutable mapping faults
    try:
        chattr("+i", *files)
        code = p.wait(120)
    finally:
        with contextlib.suppress(Exception):
            chattr("-i", *files)
    text = text_of(out)
    assert code == 3, f"exit {code}\n{text}"
    no_traceback(text)
    assert "SQLite" in text and "unreachable" in text, text[-3000:]

    r = cli("resume", "1", "--db", db, "--rate", "50/s")
    assert r.code == 0, str(r)
    assert_no_second_upgrade(sim, db)
    assert set(job_statuses(db).values()) <= DONE, job_statuses(db)


# ------------------------------------------------------------------ no raw traceback under json
def test_an_unexpected_error_under_json_logs_is_one_json_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug anywhere (here: a read that raises) must not put a raw traceback on a JSON log stream."""
    from orchestrator import cli as cli_mod
    from orchestrator.app import reads

    async def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(reads, "show_status", broken)
    with pytest.raises(SystemExit) as exited:
        cli_mod.main(["--log-format", "json", "status", "--db", str(tmp_path / "none.db")])
    err = capsys.readouterr().err
    assert exited.value.code == 1
    lines = [json.loads(ln) for ln in err.splitlines() if ln.strip()]  # every line is JSON
    assert [e["event"] for e in lines] == ["crash"], err
    assert lines[0]["error"] == "RuntimeError: a bug" and "Traceback" in lines[0]["traceback"]
