"""Issue 13 acceptance: maintenance windows, canary waves, the failure breaker, the availability guard and
the notification, through the real CLI against the real simulator, on SQLite and on PostgreSQL (there with
the runner and two ``worker`` processes sharing the run, so every control is shown to hold across
processes, not just in the process that reads it).

The simulator's own records are the truth: its call log (when each call arrived) and its fleet (when each
workflow was created and ended). Times there are the host's wall clock, as are the SQLite job table's; the
PostgreSQL server runs on this host too.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Sim, cli, cli_bg, db_rows, make_inventory
from tests.simlog import ARRIVAL_JITTER_S, applied_per_proxy, upgrade_calls

FAST = ["--poll-initial", "0.2", "--poll-interval", "0.2", "--reconcile-grace", "1", "--seed", "1"]
FAILING = "Proxy kernel upgrade failed: the proxy node did not come back after restart."
# Another process learns what one process recorded at its next read of the run (at most once a second,
# runtime.Controls.refresh_s), plus a commit and the simulator's stamping lag.
CROSS_PROCESS_S = 1.5
SENT_ATTEMPTS = (
    "SELECT a.sent_at FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.sent_at IS NOT NULL"
    " AND a.outcome != 'not_sent'"
)


# ------------------------------------------------------------------------------------------- helpers
def scenario(n: int, *, per_instance: int = 1, running_s: float = 2.0, **extra: Any) -> dict[str, Any]:
    """``n`` proxies, ``per_instance`` per instance, workflows of about ``running_s`` + 0.5 real seconds."""
    base: dict[str, Any] = {
        "seed": 13,
        "speed": 1,
        "latency_s": 0.01,
        "workflow": {"pending_s": 0.5, "running_s": running_s, "job_visible_after_s": 0.2},
        "fleet": {"generate": {"proxies": n, "proxies_per_instance": per_instance}},
    }
    base.update(extra)
    return base


def iso(t: float) -> str:
    """A POSIX time as an ISO 8601 instant in UTC, whole seconds (rounded down)."""
    return datetime.fromtimestamp(int(t), UTC).isoformat()


def ts(value: Any) -> float:
    """A timestamp read from the job table (naive UTC on SQLite, aware on PostgreSQL) as POSIX seconds."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime), value
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


def run_id_of(db_url: str) -> int:
    return int(db_rows(db_url, "SELECT max(id) FROM runs")[0][0])


def run_row(db_url: str, run_id: int) -> tuple[str, str | None, dict[str, Any]]:
    status, reason, options = db_rows(
        db_url, f"SELECT status, stop_reason, options FROM runs WHERE id = {run_id}"
    )[0]
    return str(status), reason, options if isinstance(options, dict) else json.loads(options)


def job_statuses(db_url: str, run_id: int) -> Counter[str]:
    return Counter(s for (s,) in db_rows(db_url, f"SELECT status FROM jobs WHERE run_id = {run_id}"))


def workflows_by_proxy(sim: Sim) -> dict[str, list[dict[str, Any]]]:
    """Each proxy's workflows at the simulator: id, status, created_at, ended_at (None: still running)."""
    return {p["proxy_id"]: p["workflows"] for p in sim.fleet()}


def is_pg(db_url: str) -> bool:
    return db_url.startswith("postgresql")


def drive(
    db_url: str, args: list[str], tmp: Path, procs: list[subprocess.Popen[bytes]], *, timeout: float = 180
) -> tuple[int, list[int], str]:
    """``orchestrator ARGS`` (a run or a resume); on PostgreSQL two ``worker`` processes join it as soon as
    it exists. Returns the runner's exit code, the workers' and everything they printed."""
    tag = f"{args[0]}{len(list(tmp.glob('*.out')))}"
    runner = cli_bg(*args, stdout=tmp / f"{tag}-runner.out")
    procs.append(runner)
    workers: list[subprocess.Popen[bytes]] = []
    if is_pg(db_url):
        deadline = time.monotonic() + 60
        run_id = None
        while run_id is None and runner.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                rows = db_rows(db_url, "SELECT max(r.id) FROM runs r WHERE r.status = 'running'")
                run_id = rows[0][0]
            time.sleep(0.1)
        if run_id is not None:
            workers = [
                cli_bg("worker", str(run_id), "--db", db_url, stdout=tmp / f"{tag}-worker{i}.out")
                for i in range(2)
            ]
            procs.extend(workers)
    code = runner.wait(timeout)
    codes = [w.wait(60) for w in workers]
    text = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(tmp.glob(f"{tag}-*.out"))
    )
    return code, codes, text


class Receiver:
    """A tiny webhook receiver on 127.0.0.1: records every POSTed JSON body; answers ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                outer.paths.append(self.path)
                outer.bodies.append(json.loads(self.rfile.read(n)))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, secret: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/{secret}?token={secret}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def run_args(inv: Path, db_url: str, sim: Sim, *more: str) -> list[str]:
    return ["run", str(inv), "--db", db_url, "--endpoint", sim.url, *FAST, *more]


# -------------------------------------------------------------------------- (a) the window and cutoff
def test_window_closes_paused_then_resume_in_a_new_window(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    # three instances of ten proxies, one upgrade per instance at a time: upgrades go on right up to
    # the cutoff
    sim = sim_factory(scenario(30, per_instance=10))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    start = int(time.time())
    end, cutoff = start + 15, 5
    code, codes, text = drive(
        db_url,
        run_args(
            inv, db_url, sim, "--rate", "20/s", "--window", f"{iso(start)}/PT15S", "--cutoff", f"{cutoff}s"
        ),
        tmp_path,
        procs,
    )
    assert code == 3, text
    assert all(c == 3 for c in codes), (codes, text)
    run_id = run_id_of(db_url)
    status, reason, _ = run_row(db_url, run_id)
    counts = job_statuses(db_url, run_id)
    not_started = counts["pending"] + counts["retry_wait"]
    assert status == "paused", (status, reason)
    assert reason is not None and reason.startswith(
        f"window closed: {not_started} proxies not started; resume in the next window"
    ), reason
    assert f"stopped: window closed: {not_started} proxies not started" in text
    assert 0 < not_started < 30, counts

    # no upgrade call reached the simulator after the window's end minus the cutoff
    last_start = end - cutoff
    calls = upgrade_calls(sim.log())
    assert calls, "nothing was upgraded in the window"
    late = [
        (c["seq"], c["proxy_id"], round(c["received_at"] - last_start, 3))
        for c in calls
        if c["received_at"] > last_start + ARRIVAL_JITTER_S
    ]
    assert not late, f"upgrade calls after end - cutoff (s late): {late}"
    # (an attempt the fence stopped is recorded as not_sent, with the time of its intent)
    sent = [ts(t) for (t,) in db_rows(db_url, f"{SENT_ATTEMPTS} AND j.run_id = {run_id}")]
    assert sent and max(sent) <= last_start, max(sent) - last_start
    # work accepted before the cutoff was tracked to its end in the window
    assert counts["succeeded"] == len({c["proxy_id"] for c in calls if c["effect"] == "applied"}), counts
    assert counts["accepted"] == counts["in_flight"] == counts["unknown"] == 0, counts

    # the next window: resume with it finishes every proxy, each upgraded once
    code, codes, text = drive(
        db_url,
        [
            "resume",
            str(run_id),
            "--db",
            db_url,
            "--endpoint",
            sim.url,
            "--window",
            f"{iso(time.time())}/PT5M",
            "--rate",
            "20/s",
        ],
        tmp_path,
        procs,
    )
    assert code == 0, text
    assert all(c in (0, 3) for c in codes), (codes, text)  # a worker may find nothing left to do
    assert job_statuses(db_url, run_id) == Counter({"succeeded": 30})
    status, reason, options = run_row(db_url, run_id)
    assert status == "finished", (status, reason)
    assert options["window"].endswith("/PT5M")
    applied = applied_per_proxy(sim.log())
    assert len(applied) == 30 and set(applied.values()) == {1}, applied


def test_started_outside_the_window_exits_3_naming_the_next_start(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str
) -> None:
    from zoneinfo import ZoneInfo

    sim = sim_factory(scenario(3))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    # a weekly window three days from now, in Shanghai's time
    zone = ZoneInfo("Asia/Shanghai")
    day = datetime.fromtimestamp(time.time() + 3 * 86400, zone)
    opens = day.replace(hour=1, minute=0, second=0, microsecond=0)
    window = f"{day:%a} 01:00-02:00 Asia/Shanghai"
    named = f"{opens:%a %Y-%m-%d} 01:00 Asia/Shanghai"
    # a webhook that always fails: the run's exit and its time are not the notification's business
    failing = Receiver(status=500)
    try:
        t0 = time.monotonic()
        r = cli(*run_args(inv, db_url, sim, "--window", window, "--notify", failing.url("XSECRETX")))
        took = time.monotonic() - t0
    finally:
        failing.close()
    assert r.code == 3, str(r)
    assert took < 60, "did not stop at once"
    assert f"outside the maintenance window; the next one opens {named}" in r.err, r.err
    assert not upgrade_calls(sim.log())
    run_id = run_id_of(db_url)
    status, reason, _ = run_row(db_url, run_id)
    assert status == "paused" and reason is not None and named in reason, (status, reason)
    assert len(failing.bodies) == 3 and failing.bodies[0]["event"] == "run.paused", failing.bodies
    assert "notify.gave_up" in r.err and "XSECRETX" not in r.err + r.out, r.err

    st = cli("status", str(run_id), "--db", db_url)
    assert st.code == 0, str(st)
    utc = opens.astimezone(UTC)
    assert f"window: {window} (cutoff 0s)" in st.out, st.out
    assert f"closed; the next one opens {named} ({utc:%Y-%m-%d %H:%M} UTC)" in st.out, st.out
    assert f"last stop: {reason}" in st.out, st.out


def test_wait_for_window_waits_then_runs(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    sim = sim_factory(scenario(4))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    opens = int(time.time()) + 15  # after the processes started (a loaded machine takes seconds)
    code, codes, text = drive(
        db_url,
        run_args(inv, db_url, sim, "--rate", "20/s", "--window", f"{iso(opens)}/PT2M", "--wait-for-window"),
        tmp_path,
        procs,
    )
    assert code == 0, text
    assert all(c == 0 for c in codes), (codes, text)
    # one line saying what it waits for (not one a second), from each process that waited
    waiting = [ln for ln in text.splitlines() if "run.waiting" in ln]
    assert waiting and "waiting for the maintenance window opening" in waiting[0], text
    assert len(waiting) <= (3 if is_pg(db_url) else 1), waiting
    calls = upgrade_calls(sim.log())
    assert len(calls) == 4 and min(c["received_at"] for c in calls) >= opens, calls


# ---------------------------------------------------------------------------------------- (b) waves
def wave_of(db_url: str, run_id: int) -> dict[str, int]:
    return {
        str(p): int(w) for p, w in db_rows(db_url, f"SELECT proxy_id, wave FROM jobs WHERE run_id = {run_id}")
    }


def test_waves_open_only_after_the_previous_wave_ended(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    from orchestrator.schedule.waves import order_keys

    sim = sim_factory(scenario(12))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    pause = 2.0
    code, codes, text = drive(
        db_url,
        run_args(
            inv,
            db_url,
            sim,
            "--rate",
            "20/s",
            "--waves",
            "1,5,100%",
            "--order",
            "shuffle",
            "--pause-between",
            f"{pause:g}s",
        ),
        tmp_path,
        procs,
    )
    assert code == 0, text
    assert all(c == 0 for c in codes), (codes, text)
    run_id = run_id_of(db_url)

    # membership: decided once, stored per job, from the stored seed
    waves = wave_of(db_url, run_id)
    assert sorted(Counter(waves.values()).items()) == [(1, 1), (2, 5), (3, 6)]
    _, _, options = run_row(db_url, run_id)
    seed = options["order_seed"]
    assert options["order"] == "shuffle" and isinstance(seed, int), options
    rows = db_rows(
        db_url,
        f"SELECT id, project_id || '/' || instance_id, proxy_id, wave FROM jobs"
        f" WHERE run_id = {run_id} ORDER BY id",
    )
    expected = order_keys([(int(i), str(k), str(p)) for i, k, p, _ in rows], "shuffle", seed)
    by_id = {int(i): int(w) for i, _, _, w in rows}
    assert [by_id[i] for i in expected] == sorted(by_id.values()), "waves do not follow the stored seed"

    # the simulator's view: no call of wave k before every workflow of the waves before it ended, and
    # not before the pause after that
    calls = upgrade_calls(sim.log())
    flows = workflows_by_proxy(sim)
    assert all(len(flows[p]) == 1 and flows[p][0]["ended_at"] for p in waves), flows
    for k in (2, 3):
        first_call = min(c["received_at"] for c in calls if waves[c["proxy_id"]] == k)
        earlier_end = max(flows[p][0]["ended_at"] for p, w in waves.items() if w < k)
        assert first_call >= earlier_end + pause, (k, first_call - earlier_end)
    applied = applied_per_proxy(sim.log())
    assert len(applied) == 12 and set(applied.values()) == {1}

    # the pause counts from the moment the wave was recorded done (one event per wave, 'wave-done')
    done = {
        json.loads(d)["wave"] if isinstance(d, str) else d["wave"]: ts(at)
        for at, d in db_rows(
            db_url, f"SELECT at, detail FROM events WHERE run_id = {run_id} AND kind = 'wave-done'"
        )
    }
    assert sorted(done) == [1, 2], done
    for k in (2, 3):
        first_call = min(c["received_at"] for c in calls if waves[c["proxy_id"]] == k)
        assert first_call >= done[k - 1] + pause, (k, first_call - done[k - 1])

    # status and report show the waves
    st = cli("status", str(run_id), "--db", db_url)
    assert st.code == 0, str(st)
    assert "wave: 3 of 3 open" in st.out, st.out
    rep = cli("report", str(run_id), "--db", db_url, "--format", "json")
    assert rep.code == 0, str(rep)
    reported = {r["proxy"] if "proxy" in r else r["proxy_id"]: r["wave"] for r in json.loads(rep.out)}
    assert reported == waves


def test_confirm_off_a_terminal_stops_unless_yes(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    sim = sim_factory(scenario(4))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    code, codes, text = drive(
        db_url,
        run_args(inv, db_url, sim, "--rate", "20/s", "--waves", "1,100%", "--confirm"),
        tmp_path,
        procs,
    )
    assert code == 3, text
    assert codes == ([3, 3] if is_pg(db_url) else []), (codes, text)  # workers cannot ask: they stop too
    run_id = run_id_of(db_url)
    status, reason, _ = run_row(db_url, run_id)
    assert status == "halted", (status, reason)
    assert reason is not None and reason.startswith("wave 2 (3 proxies) awaits confirmation"), reason
    assert job_statuses(db_url, run_id) == Counter({"succeeded": 1, "pending": 3})
    st = cli("status", str(run_id), "--db", db_url)
    assert f"last stop: {reason}" in st.out, st.out

    code, codes, text = drive(
        db_url, ["resume", str(run_id), "--db", db_url, "--endpoint", sim.url, "--yes"], tmp_path, procs
    )
    assert code == 0, text
    assert all(c == 0 for c in codes), (codes, text)
    assert job_statuses(db_url, run_id) == Counter({"succeeded": 4})


def test_confirm_on_a_terminal_asks_before_each_wave(sim_factory: Callable[..., Sim], tmp_path: Path) -> None:
    import os
    import pty

    from tests.conftest import PY, clean_env

    sim = sim_factory(scenario(3))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    db_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    master, slave = pty.openpty()
    out = tmp_path / "run.out"
    with open(out, "wb") as fh:
        p = subprocess.Popen(
            [
                PY,
                "-m",
                "orchestrator",
                *run_args(inv, db_url, sim, "--rate", "20/s", "--waves", "1,1,1", "--confirm"),
            ],
            stdin=slave,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
    os.close(slave)
    try:
        asked: list[str] = []
        deadline = time.monotonic() + 120
        while p.poll() is None and time.monotonic() < deadline:
            prompts = re.findall(r"continue with wave \d+ \(\d+ prox(?:y|ies)\)\? \[y/N\]", out.read_text())
            if len(prompts) > len(asked):
                asked = prompts
                # yes to wave 2, no to wave 3
                os.write(master, b"y\n" if len(asked) == 1 else b"n\n")
            time.sleep(0.1)
        code = p.wait(30)
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
    assert asked == ["continue with wave 2 (1 proxy)? [y/N]", "continue with wave 3 (1 proxy)? [y/N]"], (
        out.read_text()
    )
    assert code == 3, out.read_text()
    run_id = run_id_of(db_url)
    status, reason, _ = run_row(db_url, run_id)
    assert status == "halted" and reason is not None and reason.startswith("wave 3 (1 proxy) awaits"), reason
    assert job_statuses(db_url, run_id) == Counter({"succeeded": 2, "pending": 1})


# ------------------------------------------------------------------------------ (c) the failure breaker
SUBNET = "Upgrade failed due to insufficient subnet ip"


def breaker_scenario() -> dict[str, Any]:
    """Two proxies whose upgrade is refused for want of subnet IPs (flagged, not counted), then twelve of
    one instance whose workflows all fail (counted). One upgrade per instance at a time makes the twelve
    go one after the other, so without the breaker the next call would follow each failure at once."""
    return scenario(
        12,
        per_instance=12,
        workflow={"pending_s": 0.5, "running_s": 1.5, "job_visible_after_s": 0.2, "fail_rate": 1.0},
        fleet={
            "instances": [
                {
                    "id": f"a{i}7ea793ab91438cbfcd9c4b1c958b1ein07",
                    "proxies": [{"id": f"a{i}46fc46396e4fb19a0cb52f578e9511po01", "reject": SUBNET}],
                }
                for i in range(2)
            ],
            "generate": {"proxies": 12, "proxies_per_instance": 12},
        },
    )


def counted_failures(db_url: str, run_id: int) -> list[tuple[str, float]]:
    """(proxy, when its counted failure was recorded), oldest first."""
    rows = db_rows(
        db_url,
        "SELECT j.proxy_id, min(e.at) FROM jobs j JOIN events e ON e.job_id = j.id AND e.kind = 'move'"
        f" AND e.to_status IN ('flagged', 'failed') WHERE j.run_id = {run_id} AND j.counts_failure"
        " GROUP BY j.proxy_id",
    )
    return sorted(((str(p), ts(at)) for p, at in rows), key=lambda r: r[1])


def test_breaker_halts_then_resume_with_a_new_limit_and_ack(
    sim_factory: Callable[..., Sim],
    tmp_path: Path,
    db_url: str,
    procs: list[subprocess.Popen[bytes]],
    receiver: Receiver,
) -> None:
    sim = sim_factory(breaker_scenario())
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    hook = receiver.url("XSECRETX")
    code, codes, text = drive(
        db_url,
        run_args(inv, db_url, sim, "--rate", "20/s", "--max-failures", "2", "--notify", hook),
        tmp_path,
        procs,
    )
    assert code == 4, text
    assert all(c == 4 for c in codes), (codes, text)
    run_id = run_id_of(db_url)
    status, reason, _ = run_row(db_url, run_id)
    failures = counted_failures(db_url, run_id)
    assert status == "halted", (status, reason)
    assert reason == (
        f"halted: {len(failures)} failures exceed the limit of 2; a person must decide: "
        "resume --ack to count failures anew, or resume --max-failures M"
    ), reason
    assert len(failures) >= 3
    # the refused-for-subnet proxies are flagged but did not count
    flagged = dict(
        db_rows(
            db_url,
            f"SELECT proxy_id, counts_failure FROM jobs WHERE run_id = {run_id} AND status = 'flagged'",
        )
    )
    refused = {f"a{i}46fc46396e4fb19a0cb52f578e9511po01" for i in range(2)}
    assert {p for p, c in flagged.items() if not c} == refused
    counts = job_statuses(db_url, run_id)
    assert counts["pending"] > 0 and counts["accepted"] == counts["in_flight"] == 0, counts

    # no upgrade call started after the third failure was known: the job table's record of it, and the
    # simulator's answer to the poll that saw it
    third_proxy, third_at = failures[2]
    # (another process learns of it at its next read of the run: CROSS_PROCESS_S)
    slack = CROSS_PROCESS_S if is_pg(db_url) else ARRIVAL_JITTER_S
    log = sim.log()
    calls = upgrade_calls(log)
    late = [
        (c["proxy_id"], round(c["received_at"] - third_at, 3))
        for c in calls
        if c["received_at"] > third_at + slack
    ]
    assert not late, f"upgrade calls after the third failure was recorded (s late): {late}"
    sent = [ts(t) for (t,) in db_rows(db_url, f"{SENT_ATTEMPTS} AND j.run_id = {run_id}")]
    assert max(sent) <= third_at + (CROSS_PROCESS_S if is_pg(db_url) else 0.0), max(sent) - third_at
    wf = workflows_by_proxy(sim)[third_proxy][0]
    failing_poll = min(
        (
            r
            for r in log
            if r["route"] == "job" and r["workflow_id"] == wf["id"] and r["answered_at"] >= wf["ended_at"]
        ),
        key=lambda r: r["received_at"],
    )
    late = [
        (c["proxy_id"], round(c["received_at"] - failing_poll["answered_at"], 3))
        for c in calls
        if c["received_at"] > failing_poll["answered_at"] + slack
    ]
    assert not late, f"upgrade calls after the poll that saw the third failure (s late): {late}"
    if not is_pg(db_url):
        assert max(sent) <= failing_poll["answered_at"], max(sent) - failing_poll["answered_at"]

    # the halt was notified (URL masked in the logs), status says why and the count against the limit
    assert [b["event"] for b in receiver.bodies] == ["run.halted"], receiver.bodies
    body = receiver.bodies[0]
    assert body["exit_code"] == 4 and body["run_id"] == str(run_id) and body["reason"] == reason, body
    assert body["flagged_total"] == len(flagged), body
    assert "XSECRETX" not in text and "notify.sent" in text, text
    st = cli("status", str(run_id), "--db", db_url)
    assert st.code == 0, str(st)
    assert f"failures: {len(failures)} counted (limit --max-failures 2)" in st.out, st.out
    assert f"last stop: {reason}" in st.out, st.out

    # a higher limit: the run goes on, and halts again past it
    code, codes, text = drive(
        db_url,
        ["resume", str(run_id), "--db", db_url, "--endpoint", sim.url, "--max-failures", "5"],
        tmp_path,
        procs,
    )
    assert code == 4, text
    status, reason, options = run_row(db_url, run_id)
    assert options["max_failures"] == "5"
    n = len(counted_failures(db_url, run_id))
    assert status == "halted" and n > 5 and f"{n} failures exceed the limit of 5" in (reason or ""), (
        n,
        reason,
    )

    # the build is fixed: acknowledge what failed so far and finish the fleet
    sim.patch({"workflow": {"fail_rate": 0.0}})
    code, codes, text = drive(
        db_url,
        ["resume", str(run_id), "--db", db_url, "--endpoint", sim.url, "--ack", "--notify", hook],
        tmp_path,
        procs,
    )
    assert code == 1, text  # finished, with the flagged proxies from before
    assert "acknowledged" in text
    counts = job_statuses(db_url, run_id)
    assert counts["pending"] == counts["accepted"] == 0 and counts["succeeded"] > 0, counts
    assert counts["flagged"] + counts["failed"] == n + 2, counts
    assert receiver.bodies[-1]["event"] == "run.finished" and receiver.bodies[-1]["exit_code"] == 1


# --------------------------------------------------------------------------- (d) the availability guard
def calls_while_instance_busy(sim: Sim) -> list[tuple[str, str]]:
    """Upgrade calls that reached an instance while a workflow of another of its proxies was running
    there: (calling proxy, proxy whose workflow ran)."""
    fleet = sim.fleet()
    instance = {p["proxy_id"]: p["instance_id"] for p in fleet}
    running: dict[str, list[tuple[float, float, str]]] = {}
    for p in fleet:
        for w in p["workflows"]:
            end = w["ended_at"] if w["ended_at"] is not None else float("inf")
            running.setdefault(p["instance_id"], []).append((w["created_at"], end, p["proxy_id"]))
    return [
        (c["proxy_id"], owner)
        for c in upgrade_calls(sim.log())
        for start, end, owner in running.get(instance[c["proxy_id"]], [])
        if owner != c["proxy_id"] and start <= c["received_at"] < end
    ]


def test_per_instance_one_never_overlaps_two_allows_two(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    sim = sim_factory(scenario(12, per_instance=3))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")

    # plan names the guard and sizes the fleet against the window
    window = f"{iso(time.time())}/PT1M"
    plan = cli(
        "plan", str(inv), "--endpoint", sim.url, "--per-instance", "1", "--window", window, "--cutoff", "10s"
    )
    assert plan.code == 0, str(plan)
    assert "at most 1 proxies of an instance at once" in plan.out, plan.out
    assert re.search(rf"window {re.escape(window)}: (fits the window|does NOT fit one window)", plan.out), (
        plan.out
    )

    code, codes, text = drive(
        db_url, run_args(inv, db_url, sim, "--rate", "50/s", "--per-instance", "1"), tmp_path, procs
    )
    assert code == 0, text
    assert all(c == 0 for c in codes), (codes, text)
    busy = [r["seq"] for r in sim.log() if r["http_status"] == 409]
    assert not busy, f"the simulator answered busy: {busy}"
    overlaps = calls_while_instance_busy(sim)
    assert not overlaps, f"upgrade calls while another proxy of the instance was upgrading: {overlaps}"
    # every instance's three proxies went one after the other, so the run was not just slow
    assert len(upgrade_calls(sim.log())) == 12

    # --per-instance 2 lets a second proxy of an instance start while the first one's workflow runs (this
    # simulator answers it 409 busy; the policy retries it later)
    sim2 = sim_factory(scenario(4, per_instance=2), name="sim2")
    inv2 = make_inventory(sim2, tmp_path / "fleet2.yaml")
    db2 = db_url.replace("jobs.db", "jobs2.db") if not is_pg(db_url) else db_url
    code, codes, text = drive(
        db2, run_args(inv2, db2, sim2, "--rate", "50/s", "--per-instance", "2"), tmp_path, procs
    )
    assert code in (0, 1), text
    assert calls_while_instance_busy(sim2), "--per-instance 2 never had two proxies of an instance upgrading"


# ------------------------------------------------------- the inventory's window: a cron entry is one line
def test_inventory_window_and_a_second_run_resumes_the_paused_run(
    sim_factory: Callable[..., Sim],
    tmp_path: Path,
    db_url: str,
    procs: list[subprocess.Popen[bytes]],
    receiver: Receiver,
) -> None:
    from datetime import timedelta, timezone

    sim = sim_factory(scenario(12, per_instance=4))
    inv = make_inventory(sim, tmp_path / "prod.yaml")
    body = inv.read_text()
    shanghai = timezone(timedelta(hours=8))

    def with_window(seconds: int) -> str:
        start = datetime.fromtimestamp(int(time.time()), shanghai)
        inv.write_text(
            f'window: "{start.isoformat()}/PT{seconds}S"\nnotify: "{receiver.url("XSECRETX")}"\n{body}'
        )
        return start.isoformat()

    with_window(12)
    # what a cron line runs: the window and the webhook come from the inventory
    cron = ["run", str(inv), "--db", db_url, "--endpoint", sim.url, "--rate", "20/s", "--cutoff", "4s", *FAST]
    code, codes, text = drive(db_url, cron, tmp_path, procs)
    assert code == 3, text
    assert all(c == 3 for c in codes), (codes, text)
    run_id = run_id_of(db_url)
    status, reason, options = run_row(db_url, run_id)
    assert status == "paused" and (reason or "").startswith("window closed: "), (status, reason)
    assert "XSECRETX" not in json.dumps(options) and "XSECRETX" not in text
    assert [b["event"] for b in receiver.bodies] == ["run.paused"], receiver.bodies
    assert receiver.bodies[0]["exit_code"] == 3 and receiver.bodies[0]["reason"] == reason
    assert receiver.paths[0] == "/services/T000/XSECRETX?token=XSECRETX"

    # next window: the same line again resumes the paused run (no new run), under the inventory's window
    opened = with_window(120)
    code, _, text = drive(db_url, cron[: -len(FAST)], tmp_path, procs)
    assert code == 0, text
    assert f"run {run_id} " in text and "is paused: resuming it" in text, text
    assert db_rows(db_url, "SELECT count(*) FROM runs")[0][0] == 1
    assert job_statuses(db_url, run_id) == Counter({"succeeded": 12})
    status, reason, options = run_row(db_url, run_id)
    assert status == "finished" and options["window"] == f"{opened}/PT120S", (status, options)
    assert [b["event"] for b in receiver.bodies] == ["run.paused", "run.finished"], receiver.bodies
    applied = applied_per_proxy(sim.log())
    assert len(applied) == 12 and set(applied.values()) == {1}

    # status: the window in its own zone and in the viewer's
    st = cli("status", str(run_id), "--db", db_url, "--tz", "Europe/Berlin")
    assert st.code == 0, str(st)
    assert f"window: {opened}/PT120S (cutoff 4s)" in st.out, st.out
    assert re.search(
        r"open now, \w{3} \d{4}-\d\d-\d\d \d\d:\d\d \+08:00 \(\d{4}-\d\d-\d\d \d\d:\d\d CES?T\) - ", st.out
    ), st.out
