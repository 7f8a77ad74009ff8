"""Issue 10, kinds 1, 5 and 6, and the review items about processes: no two runs over the same proxies at
once; a run whose log reader went away finishes, and signals still stop it; ``plan`` with a refused
credential stops at the first 401; a clean stop leaves no registration behind; ``plan`` takes ``run``'s
flags.

The real CLI (as a subprocess, in a real shell pipeline where the kind is about one) against the real
simulator; on both backends where the job table decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import (
    PY,
    Sim,
    clean_env,
    cli,
    cli_bg,
    db_rows,
    on_both_backends_once,
    text_of,
    wait_until,
)
from tests.issue10 import (
    TERMINAL,
    fast,
    inventory,
    jobs,
    proxy_id,
    scenario,
)
from tests.simlog import applied_per_proxy, upgrades_per_proxy

HOST = socket.gethostname()


def fleet(n: int, **extra: Any) -> dict[str, Any]:
    return scenario([{"id": proxy_id(i + 1)} for i in range(n)], **extra)


def registered(db: str) -> list[tuple[Any, ...]]:
    return db_rows(db, "SELECT host, pid, role, left_at FROM workers ORDER BY started_at")


def n_upgrades(sim: Sim) -> int:
    return sum(1 for r in sim.log() if r["route"] == "upgrade")


def subset(inv: Path, out: Path, keep: int) -> Path:
    """Another inventory file over the last ``keep`` proxies of ``inv`` (the ones a run reaches last)."""
    data = yaml.safe_load(inv.read_text(encoding="utf-8"))
    data["proxies"] = data["proxies"][-keep:]
    out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------- kind 1
SUGGESTIONS = ("--new-run", "--resume", "--force", "pass ", "to start over")


def test_a_live_runs_proxies_are_refused_to_any_new_run(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    """While run 1 is live, every way of starting another run over its proxies (the same inventory with
    or without --new-run, another inventory sharing some of them) is refused with exit 2, naming run 1
    and its process, suggesting no way around; run 1 then finishes alone, each proxy upgraded once."""
    sim = sim_factory(fleet(10, latency_s=0.05))
    inv = inventory(sim, tmp_path / "fleet.yaml")
    other = subset(inv, tmp_path / "other.yaml", 2)
    out = tmp_path / "holder.out"
    holder = cli_bg(
        "run", str(inv), "--db", db_url, "--endpoint", sim.url, "--rate", "2/s", "--concurrency", "1",
        *fast(), stdout=out,
    )  # fmt: skip
    procs.append(holder)
    wait_until("run 1 to register and send", lambda: registered(db_url) and n_upgrades(sim) >= 1, 120,
               (holder,), lambda: text_of(out))  # fmt: skip

    for args in (
        [str(inv), "--new-run"],
        [str(inv)],
        [str(other), "--new-run"],
        [str(other)],
    ):
        r = cli("run", *args, "--db", db_url, "--endpoint", sim.url, *fast())
        assert r.code == 2, f"{args}: {r}"
        err = r.err
        assert "run 1" in err and f"pid {holder.pid}" in err and HOST in err, f"{args}: {err}"
        assert not [s for s in SUGGESTIONS if s in err], f"{args} suggests a way around: {err}"
        assert "Traceback" not in err
    assert holder.poll() is None, "the refused processes disturbed the live run"
    assert db_rows(db_url, "SELECT count(*) FROM runs")[0][0] == 1, "a refused run was created"

    assert holder.wait(180) == 0, text_of(out)
    log = sim.log()
    assert set(applied_per_proxy(log).values()) == {1}, applied_per_proxy(log)
    assert max(upgrades_per_proxy(log).values()) == 1, upgrades_per_proxy(log)
    assert Counter(j["status"] for j in jobs(db_url).values()) == {"succeeded": 10}


def test_resuming_an_old_run_over_proxies_a_live_run_holds_is_refused(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Run 1 stopped with its proxies unfinished; run 2 (``--new-run``) now holds them, live. Resuming
    run 1 (by ``resume 1``, or ``run --resume``) is refused naming run 2 and its process: it would send
    to the same proxies at the same time."""
    sim = sim_factory(fleet(8, latency_s=0.05))
    inv = inventory(sim, tmp_path / "fleet.yaml")
    first = cli_bg("run", str(inv), "--db", db_url, "--endpoint", sim.url, "--rate", "1/s", *fast(),
                   stdout=tmp_path / "first.out")  # fmt: skip
    procs.append(first)
    wait_until(
        "run 1 to send", lambda: n_upgrades(sim) >= 1, 120, (first,), lambda: text_of(tmp_path / "first.out")
    )
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 3
    out = tmp_path / "second.out"
    second = cli_bg("run", str(inv), "--new-run", "--db", db_url, "--endpoint", sim.url, "--rate", "1/s",
                    "--concurrency", "1", *fast(), stdout=out)  # fmt: skip
    procs.append(second)

    def second_registered() -> bool:
        return any(w[1] == second.pid for w in registered(db_url))

    wait_until("run 2 to register", second_registered, 120, (second,), lambda: text_of(out))
    for args in (["resume", "1"], ["run", str(inv), "--resume", "--endpoint", sim.url]):
        r = cli(*args, "--db", db_url, *fast())
        assert r.code == 2, f"{args}: {r}"
        assert f"pid {second.pid}" in r.err and HOST in r.err, f"{args}: {r.err}"
        assert not [s for s in SUGGESTIONS if s in r.err], r.err
    assert second.poll() is None, text_of(out)
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 3, text_of(out)
    assert max(upgrades_per_proxy(sim.log()).values()) == 1, upgrades_per_proxy(sim.log())


def test_two_runs_started_together_never_upgrade_a_proxy_twice(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Two overlapping runs started at the same moment: whichever registers first holds the proxies; the
    other is refused (or, if it came after the first ended, finds them at the target). No proxy gets a
    second upgrade call."""
    sim = sim_factory(fleet(5, latency_s=0.05))
    inv = inventory(sim, tmp_path / "fleet.yaml")
    other = subset(inv, tmp_path / "other.yaml", 3)
    outs = [tmp_path / "a.out", tmp_path / "b.out"]
    ps = [
        cli_bg(
            "run",
            str(path),
            "--db",
            db_url,
            "--endpoint",
            sim.url,
            "--rate",
            "3/s",
            "--new-run",
            *fast(),
            stdout=o,
        )
        for path, o in ((inv, outs[0]), (other, outs[1]))
    ]
    procs.extend(ps)
    codes = [p.wait(180) for p in ps]
    assert 0 in codes and set(codes) <= {0, 2}, (codes, [text_of(o) for o in outs])
    assert max(upgrades_per_proxy(sim.log()).values()) == 1, upgrades_per_proxy(sim.log())
    if 2 in codes:
        refused = text_of(outs[codes.index(2)])
        assert "held by run" in refused or "is held by" in refused, refused


def test_worker_on_sqlite_is_refused_with_the_reason(sim_factory: Callable[..., Sim], tmp_path: Path) -> None:
    sim = sim_factory(fleet(1))
    inv = inventory(sim, tmp_path / "fleet.yaml")
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    assert cli("run", str(inv), "--db", db, "--endpoint", sim.url, *fast()).code == 0
    before = len(sim.log())
    for args in (["worker", "1"], ["worker"]):
        r = cli(*args, "--db", db)
        assert r.code == 2, str(r)
        lines = [ln for ln in r.err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "PostgreSQL" in lines[0], str(r)
        assert "Traceback" not in r.err
    assert len(sim.log()) == before
    assert [row[2] for row in registered(db)] == ["runner"], "the refused worker registered"


# ------------------------------------------------------------------------------------------- kind 5
# A run whose output goes to a reader that stops reading (`| head`): writing a log line, a progress
# update or a notice fails from then on; the run goes on to its end regardless.
PIPED = {
    "console head -14": ("--log-format console --log-level info", "head -14"),
    "plain debug head -14": ("--log-format plain --log-level debug", "head -14"),
    "json debug head -3": ("--log-format json --log-level debug", "head -3"),
    "progress head -1": ("--log-level debug", "head -1", "--progress"),
}


@pytest.mark.parametrize("case", list(PIPED), ids=list(PIPED))
def test_a_run_piped_into_head_finishes(case: str, sim_factory: Callable[..., Sim], tmp_path: Path) -> None:
    global_opts, reader, *run_opts = PIPED[case]
    sim = sim_factory(fleet(6))
    inv = inventory(sim, tmp_path / "fleet.yaml")
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    rc = tmp_path / "rc"
    command = (
        f"{PY} -m orchestrator {global_opts} run {inv} --db {db} --endpoint {sim.url} --rate 20/s "
        f"{' '.join(fast())} {' '.join(run_opts)} 2>&1 | {reader} > {tmp_path / 'seen'}; "
        f'echo "${{PIPESTATUS[0]}}" > {rc}'
    )
    t0 = time.monotonic()
    subprocess.run(["bash", "-c", command], env=clean_env(), timeout=150, check=True)
    took = time.monotonic() - t0
    code = int(rc.read_text().strip())
    assert code in (0, 1), (code, text_of(tmp_path / "seen"))
    statuses = Counter(j["status"] for j in jobs(db).values())
    assert set(statuses) <= TERMINAL and sum(statuses.values()) == 6, statuses
    assert statuses["succeeded"] == 6, statuses
    assert db_rows(db, "SELECT status FROM runs")[0][0] == "finished"
    assert all(row[3] is not None for row in registered(db)), "the registration was left behind"
    assert took < 120, took


@on_both_backends_once("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signals_stop_a_run_whose_reader_went_away(
    signum: signal.Signals, sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str,
    procs: list[subprocess.Popen[bytes]],
) -> None:  # fmt: skip
    """``orchestrator run ... 2>&1 | head -3``: after head exited, a signal still stops the run within
    the drain timeout (exit 3), and it leaves no registration behind: the resume that finishes the run
    takes over from nobody."""
    sim = sim_factory(fleet(8, latency_s=0.05))
    inv = inventory(sim, tmp_path / "fleet.yaml")
    orch = subprocess.Popen(
        [PY, "-m", "orchestrator", "--log-level", "debug", "run", str(inv), "--db", db_url, "--endpoint",
         sim.url, "--rate", "1/s", "--concurrency", "1", *fast()],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    procs.append(orch)
    assert orch.stdout is not None
    head = subprocess.Popen(["head", "-3"], stdin=orch.stdout, stdout=subprocess.DEVNULL)
    orch.stdout.close()  # only head reads the pipe now
    procs.append(head)
    assert head.wait(60) == 0
    wait_until("two upgrade calls after head exited", lambda: n_upgrades(sim) >= 2, 60, (orch,))
    assert orch.poll() is None
    t0 = time.monotonic()
    orch.send_signal(signum)
    code = orch.wait(30)
    assert code == 3, code
    assert time.monotonic() - t0 < 20
    assert all(row[3] is not None for row in registered(db_url)), registered(db_url)
    assert db_rows(db_url, "SELECT status FROM runs")[0][0] == "stopped"

    r = cli("resume", "1", "--db", db_url, "--rate", "20/s", timeout=120)
    assert r.code == 0, str(r)
    assert "took over" not in r.err, r.err
    assert Counter(j["status"] for j in jobs(db_url).values()) == {"succeeded": 8}
    assert max(upgrades_per_proxy(sim.log()).values()) == 1


def test_a_clean_stop_leaves_no_registration_behind(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    sim = sim_factory(fleet(6, latency_s=0.05))
    inv = inventory(sim, tmp_path / "fleet.yaml")
    out = tmp_path / "run.out"
    p = cli_bg("run", str(inv), "--db", db_url, "--endpoint", sim.url, "--rate", "1/s", *fast(), stdout=out)
    procs.append(p)
    wait_until("an upgrade call", lambda: n_upgrades(sim) >= 1, 120, (p,), lambda: text_of(out))
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 3, text_of(out)
    assert [row[3] is not None for row in registered(db_url)] == [True], registered(db_url)
    r = cli("resume", "--db", db_url, "--rate", "20/s", timeout=120)
    assert r.code == 0, str(r)
    assert "took over from a dead process" not in r.err, r.err


# ------------------------------------------------------------------------------------------- kind 6
AK = "AKSIMTEST00000000001"
SK = "sk-9fJ3kL0pQ7rS2tU5vW8xY1zA4bC6dE"
TOKEN = "static-tok-7Qm2Vx9LrT4kPz8Hc3Nw"
REFUSED: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "wrong sk": ({"mode": "aksk", "keys": [{"ak": AK, "sk": SK}]},
                 {"HUAWEICLOUD_SDK_AK": AK, "HUAWEICLOUD_SDK_SK": "sk-WRONG-4hT9xQ2mZ7"}),
    "unknown ak": ({"mode": "aksk", "keys": [{"ak": AK, "sk": SK}]},
                   {"HUAWEICLOUD_SDK_AK": "AKUNKNOWN0000000000", "HUAWEICLOUD_SDK_SK": SK}),
    "wrong token": ({"mode": "token", "tokens": [TOKEN]}, {"ORCHESTRATOR_AUTH_TOKEN": "tok-WRONG-Zq8Lm4Rt2"}),
    "no credentials": ({"mode": "token", "tokens": [TOKEN]}, {}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_plan_stops_at_the_first_refused_credential(
    case: str, sim_factory: Callable[..., Sim], tmp_path: Path
) -> None:
    auth, env = REFUSED[case]
    sim = sim_factory(fleet(12, auth=auth))
    inv = inventory(sim, tmp_path / "fleet.yaml")
    r = cli("plan", str(inv), "--endpoint", sim.url, "--rate", "100/s", "--concurrency", "8", env=env)
    assert r.code == 2, str(r)
    errors = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "refused" in errors[0], str(r)
    assert "unreachable" not in r.out, r.out
    log = sim.log()
    assert len(log) == 1 and log[0]["http_status"] == 401, [(c["route"], c["http_status"]) for c in log]


# ------------------------------------------------------------------------- plan takes run's flags
def test_plan_accepts_every_flag_run_takes() -> None:
    from orchestrator.cli import plan, run

    def names(cmd: Any) -> set[str]:
        return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}

    assert names(run) - names(plan) == set()


def test_plan_with_a_run_command_line(sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str) -> None:
    """The operator's run command line with ``run`` replaced by ``plan``: it plans with those options
    (rate, concurrency, per-instance) and writes nothing to the job table."""
    sim = sim_factory(scenario([{"id": proxy_id(1)}, {"id": proxy_id(2), "current_version": "2.24.03.000"}]))
    inv = inventory(sim, tmp_path / "fleet.yaml")
    flags = [
        str(inv), "--db", db_url, "--name", "tonight", "--new-run", "--endpoint", sim.url, "--rate", "5/s",
        "--concurrency", "2", "--timeout", "10", "--wait", "--preflight", "--poll-interval", "5",
        "--poll-timeout", "600", "--per-instance", "1", "--max-failures", "3", "--waves", "1,100%",
        "--order", "inventory", "--db-outage-timeout", "30", "--yes", "--no-progress", "--tz", "UTC",
    ]  # fmt: skip
    r = cli("plan", *flags)
    assert r.code == 0, str(r)
    assert "rate 5/s" in r.out and "concurrency 2" in r.out, r.out
    assert [c["route"] for c in sim.log()] == ["proxy_version", "proxy_version"]
    with contextlib.suppress(Exception):  # a plan never creates a run
        assert db_rows(db_url, "SELECT count(*) FROM runs")[0][0] == 0


# ------------------------------------------------------------------ the limiter keeps send times
async def test_the_rate_window_is_kept_on_send_times_through_the_runtime(
    sim_factory: Callable[..., Sim], tmp_path: Path
) -> None:
    """Issue 10 review: the limiter's window is kept on when requests leave. Through the composition root
    (``build_runtime``), the permit's hook reaches the real client, whose send hook calls it: a request
    that leaves 0.4 s after its permit moves the window, so the next permit at 1/s comes 1 s after the
    send, not after the grant."""
    from datetime import UTC, datetime

    from orchestrator.app.runtime import build_cloud, build_runtime
    from orchestrator.cloud.api import ProxyRef
    from orchestrator.options import RunOptions
    from orchestrator.outcomes import VersionInfo
    from orchestrator.store import open_store
    from tests.issue10 import INSTANCE, PROJECT, PROXY

    sim = sim_factory(scenario())
    options = RunOptions().override(rate="1/s")
    store = await open_store(f"sqlite:///{tmp_path / 'jobs.db'}")
    cloud = await build_cloud(options, env={})
    try:
        rt = await build_runtime(
            store, 1, options, worker_id="test", role="runner", cloud=cloud.api, since=datetime.now(UTC)
        )
        ref = ProxyRef(project_id=PROJECT, instance_id=INSTANCE, proxy_id=PROXY, endpoint=sim.url)
        async with rt.permit("proxy_version") as on_sent:
            granted = time.monotonic()
            await asyncio.sleep(0.4)  # the request leaves late (a busy loop, a slow connect)
            assert isinstance(await cloud.api.proxy_version(ref, on_sent=on_sent), VersionInfo)
        async with rt.permit("proxy_version"):
            waited = time.monotonic() - granted
    finally:
        await cloud.close()
        await store.close()
    assert waited >= 1.4, (
        f"the next permit came {waited:.2f}s after the grant: the window kept the grant time"
    )
