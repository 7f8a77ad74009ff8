"""Issue 11 kinds 6-9: hostile input, through the real CLI.

6. ``resume`` (inventory moved away) is refused an endpoint ``run`` refuses (one validator), and stored
   options that fail it (an edited table, an older release) are refused too, never connected to.
7. A 100 MB answer and an endless one (a hostile server on 127.0.0.1) leave the orchestrator's peak RSS
   bounded; the upgrades they answered are reconciled, not resent.
8. A cloud message with ``[/bold]`` and a run named ``[/x]`` never crash run/status/resume/report/flagged;
   CSV cells beginning with ``= + - @`` are escaped.
9. The job table is created 0600; SIGTERM during start-up exits 3; a certificate that fails verification
   stops at once with exit 2 naming the failed check, after one connection.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from tests.conftest import Sim, clean_env, cli, cli_bg, db_rows, make_inventory, text_of, wait_until
from tests.faultkit import (
    FAST,
    CountingListener,
    assert_no_second_upgrade,
    hostile_log,
    job_statuses,
    rss_wrapped,
    scenario,
    self_signed_cert,
    start_hostile,
)
from tests.simlog import upgrades_per_proxy


def no_traceback(*texts: str) -> None:
    for t in texts:
        assert "Traceback" not in t, t[-3000:]


def paused_run(sim: Sim, tmp: Path, db: str) -> Path:
    """An unfinished run that sent nothing: started outside its (tomorrow's) window, so it pauses."""
    inv = make_inventory(sim, tmp / "fleet.yaml")
    start = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    r = cli("run", str(inv), "--db", db, "--endpoint", sim.url, "--window", f"{start}/PT1H", *FAST)
    assert r.code == 3, str(r)
    assert db_rows(db, "SELECT status FROM runs") == [("paused",)]
    return inv


# ------------------------------------------------------------------ kind 6: one endpoint validator
def test_resume_refuses_the_endpoints_run_refuses_and_never_connects(
    sim_factory: Callable[..., Sim], tmp_path: Path
) -> None:
    sim = sim_factory(scenario(3))
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    inv = paused_run(sim, tmp_path, db)
    moved = inv.rename(tmp_path / "elsewhere.yaml")  # the inventory file is gone from where the run saw it
    options = db_rows(db, "SELECT options FROM runs")
    calls = len(sim.log())
    trap = CountingListener()  # 0.0.0.0:PORT would reach this listener if anything connected
    try:
        for url, says in (
            (f"http://0.0.0.0:{trap.port}", "plain http:// is only allowed for loopback hosts"),
            (f"https://admin:s3cret@127.0.0.1:{trap.port}/v3", "must not carry a user or password"),
            (f"http://127.0.0.1:{trap.port}/api", "no path"),
        ):
            by_run = cli("run", str(moved), "--db", f"sqlite:///{tmp_path / 'other.db'}", "--endpoint", url)
            by_resume = cli("resume", "1", "--db", db, "--endpoint", url)
            for r in (by_run, by_resume):
                assert r.code == 2, str(r)
                assert says in r.err and "s3cret" not in r.err + r.out, str(r)
                assert len(r.err.strip().splitlines()) == 1, str(r)
            # one validator: the same words for the same URL
            assert by_run.err.split("--endpoint", 1)[1] == by_resume.err.split("--endpoint", 1)[1]

        # stored options that fail the validator (an edited table): refused, not connected to
        stored = json.loads(options[0][0])
        stored["endpoint_override"] = f"http://0.0.0.0:{trap.port}"
        with sqlite3.connect(db.split("///", 1)[1]) as conn:
            conn.execute("UPDATE runs SET options = ?", (json.dumps(stored),))
        r = cli("resume", "1", "--db", db)
        assert r.code == 2, str(r)
        assert (
            "plain http:// is only allowed for loopback hosts" in r.err
            and len(r.err.strip().splitlines()) == 1
        ), str(r)
        no_traceback(r.err)
        assert trap.accepted == 0, "something connected to the refused endpoint"
    finally:
        trap.close()
    assert len(sim.log()) == calls, "a refused resume sent nothing"
    assert db_rows(db, "SELECT count(*) FROM events WHERE kind = 'options'") == [(0,)]


# ------------------------------------------------------------------ kind 7: unbounded answers
@pytest.mark.slow
def test_huge_and_endless_answers_keep_memory_bounded_and_are_reconciled(
    sim_factory: Callable[..., Sim], tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    sim = sim_factory(scenario(4))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    proxies = sorted(p["proxy_id"] for p in sim.fleet())
    rules = [
        {"route": "upgrade", "proxy_id": proxies[0], "action": "huge_body", "size": 100 * 1024 * 1024},
        {"route": "upgrade", "proxy_id": proxies[1], "action": "endless_body"},
    ]
    hostile, url = start_hostile(tmp_path, sim.url, rules)
    procs.append(hostile)
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    rss = tmp_path / "rss"
    args = ["run", str(inv), "--db", db, "--endpoint", url, "--rate", "20/s", "--timeout", "10", *FAST]
    p = subprocess.run(
        rss_wrapped(*args, rss_file=rss), capture_output=True, text=True, env=clean_env(), timeout=300
    )
    assert p.returncode == 0, f"{p.returncode}\n{p.stderr[-3000:]}"
    peak_mb = int(rss.read_text()) / 1024
    assert peak_mb < 200, f"peak RSS {peak_mb:.0f} MB"
    streamed = [e for e in hostile_log(url) if e["status"] == "stream"]
    assert {e["proxy_id"] for e in streamed} == set(proxies[:2]), streamed
    log = assert_no_second_upgrade(sim, db)
    assert upgrades_per_proxy(log) == {p: 1 for p in proxies}
    found = {
        p
        for (p,) in db_rows(
            db,
            "SELECT j.proxy_id FROM workflows w JOIN jobs j ON j.id = w.job_id WHERE w.source = 'reconciled'",
        )
    }
    assert found == set(proxies[:2]), found
    assert set(job_statuses(db).values()) == {"succeeded"}
    print(f"\npeak RSS {peak_mb:.0f} MB with a 100 MB and an endless answer")


# ------------------------------------------------------------------ kind 8: markup and formulas
FORMULAS = ['=HYPERLINK("http://x","y")', "+1+1", "-2+3", "@SUM(A1:A2)"]
MARKUP = "subnet [/bold] exhausted [red]retry[/red] [link=http://x]here[/link]"


def test_markup_in_cloud_text_and_run_names_never_crashes_and_csv_formulas_are_escaped(
    sim_factory: Callable[..., Sim], tmp_path: Path
) -> None:
    sim = sim_factory(scenario(4))
    exported = yaml.safe_load(make_inventory(sim, tmp_path / "export.yaml").read_text())
    for entry, name in zip(exported["proxies"], FORMULAS, strict=True):
        entry["name"] = name
    inv = tmp_path / "fleet.yaml"
    inv.write_text(yaml.safe_dump(exported, sort_keys=False))
    rejected = exported["proxies"][0]["proxy_id"]
    sim.patch({"proxies": {rejected: {"reject": MARKUP}}})
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    texts: list[str] = []

    def ok(*args: str, codes: tuple[int, ...] = (0,)) -> str:
        r = cli(*args, "--db", db)
        texts.append(r.out + r.err)
        assert r.code in codes, str(r)
        no_traceback(r.out, r.err)
        return r.out + r.err

    first = ok("run", str(inv), "--endpoint", sim.url, "--name", "[/x]", "--rate", "20/s", *FAST, codes=(1,))
    assert "[/x]" in first
    assert "[/x]" in ok("status", "1") and "[/x]" in ok("status") and "[/x]" in ok("runs")
    assert "[/x]" in ok("status", "[/x]")  # found by its name, printed as itself
    report = ok("report", "1")
    assert "[/bold]" in report and "[red]retry[/red]" in report, report
    assert "[/bold]" in ok("flagged", "1")
    ok("flagged", "1", "--format", "csv")
    ok("report", "1", "--format", "json")
    ok("report", "1", "--format", "html", "-o", str(tmp_path / "report.html"))
    ok("history", "--proxy", rejected)
    ok("retry", "1", "--flagged")
    assert "[/x]" in ok("resume", "[/x]", "--rate", "20/s", codes=(1,))

    r = cli("report", "1", "--format", "csv", "--db", db)
    assert r.code == 0, str(r)
    cells = [cell for row in csv.reader(io.StringIO(r.out)) for cell in row]
    for name in FORMULAS:
        assert name not in cells, f"{name!r} is a raw CSV cell (a spreadsheet would run it)"
        assert any(c.endswith(name) and c != name for c in cells), (name, cells[:40])
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@")], [c for c in cells if c[:1] in "=+-@"]


# ------------------------------------------------------------------ kind 9: small ones
def test_the_job_table_is_created_owner_only(sim_factory: Callable[..., Sim], tmp_path: Path) -> None:
    sim = sim_factory(scenario(2))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    path = tmp_path / "jobs.db"
    old = os.umask(0o022)  # a usual umask: files would be 0644 unless created otherwise
    try:
        r = cli("run", str(inv), "--db", str(path), "--endpoint", sim.url, *FAST)
    finally:
        os.umask(old)
    assert r.code == 0, str(r)
    for f in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if f.exists():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f"{f.name}: {oct(f.stat().st_mode)}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def handles_sigterm(pid: int) -> bool:
    """Process ``pid`` has a SIGTERM handler (``SigCgt`` in /proc): the earliest moment it can act on it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.parametrize("moment", ["handler set (imports)", "job table created", "runner registered"])
def test_sigterm_during_start_up_exits_3(
    sim_factory: Callable[..., Sim], tmp_path: Path, procs: list[subprocess.Popen[bytes]], moment: str
) -> None:
    sim = sim_factory(scenario(4, latency_s=0.5))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    path = tmp_path / "jobs.db"
    out = tmp_path / "run.out"
    p = cli_bg("run", str(inv), "--db", str(path), "--endpoint", sim.url, *FAST, stdout=out)
    procs.append(p)
    if moment.startswith("handler set"):
        wait_until(moment, lambda: handles_sigterm(p.pid), 60, (p,), lambda: text_of(out), every=0.002)
    elif moment == "job table created":
        wait_until(moment, path.exists, 60, (p,), lambda: text_of(out), every=0.005)
    else:
        wait_until(
            moment,
            lambda: db_rows(f"sqlite:///{path}", "SELECT count(*) FROM workers")[0][0],
            60,
            (p,),
            lambda: text_of(out),
            every=0.02,
        )
    p.send_signal(signal.SIGTERM)
    code = p.wait(60)
    assert code == 3, f"exit {code} after SIGTERM at '{moment}'\n{text_of(out)}"
    no_traceback(text_of(out))
    # whatever the moment, the job table is whole (or not there yet): the next command works on it
    r = cli("run", str(inv), "--db", str(path), "--endpoint", sim.url, "--resume", *FAST)
    assert r.code == 0, str(r)


def test_a_certificate_that_fails_verification_stops_at_once_naming_the_check(
    sim_factory: Callable[..., Sim], tmp_path: Path
) -> None:
    sim = sim_factory(scenario(4))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    server = CountingListener(tls=self_signed_cert(tmp_path))
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    try:
        started = time.monotonic()
        r = cli("run", str(inv), "--db", db, "--endpoint", f"https://127.0.0.1:{server.port}", *FAST)
        took = time.monotonic() - started
        accepted = server.accepted
    finally:
        server.close()
    assert r.code == 2, str(r)
    no_traceback(r.out, r.err)
    assert "self-signed certificate" in r.err and f"127.0.0.1:{server.port}" in r.err, r.err
    assert accepted == 1, f"{accepted} connections: a certificate error is not retried"
    assert took < 30, f"took {took:.0f}s"
    assert db_rows(db, "SELECT count(*) FROM attempts") == [(0,)], "nothing was sent"
    assert db_rows(db, "SELECT status FROM runs") == [("stopped",)]
