"""Issue acceptance: follow every upgrade to its end (preflight, workflow tracking, postflight, plan).

The real CLI runs as a subprocess against the real simulator process on 127.0.0.1; the simulator's call
log and fleet are the truth, the job table is what the orchestrator believes.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import Sim, cli, cli_bg, db_rows
from tests.simlog import busiest_window, gateway_width, gateway_worst, max_in_window, upgrades_per_proxy

PROJECT = "054e292c9880d4992f02c0196d3ea468"
OLD = "2.23.06.000"
SOURCE = "2.23.12.000"
TARGET = "2.24.03.000"
FINAL = {"Completed", "Failed", "Canceled", "Unauthorized"}

FAST = ["--poll-initial", "0.2", "--poll-interval", "0.2", "--reconcile-grace", "1", "--seed", "1"]


# ------------------------------------------------------------------------------------------- helpers
def ids(tag: str) -> tuple[str, str]:
    """A reproducible (instance_id, proxy_id) pair in the cloud's id shapes, one instance per tag."""
    h = hashlib.sha256(tag.encode()).hexdigest()
    return h[:32] + "in07", h[32:64] + "po01"


def scenario(proxies: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Every proxy on its own instance (the cloud runs one operation per instance at a time)."""
    base: dict[str, Any] = {
        "seed": 7,
        "speed": 4,
        "project_id": PROJECT,
        "current_version": SOURCE,
        "latest_version": TARGET,
        "latency_s": 0.01,
        "workflow": {"pending_s": 1, "running_s": 2, "job_visible_after_s": 0.5},
        "fleet": {
            "instances": [
                {"id": ids(tag)[0], "proxies": [{"id": ids(tag)[1], **spec}]} for tag, spec in proxies.items()
            ]
        },
    }
    base.update(extra)
    return base


def write_inventory(path: Path, tags: list[str], overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    entries = []
    for tag in tags:
        inst, proxy = ids(tag)
        entries.append(
            {"instance_id": inst, "proxy_id": proxy, "name": tag, **(overrides or {}).get(tag, {})}
        )
    doc = {
        "defaults": {
            "project_id": PROJECT,
            "region": "cn-north-4",
            "source_version": SOURCE,
            "target_version": TARGET,
        },
        "proxies": entries,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def jobs_by_proxy(db_url: str) -> dict[str, dict[str, Any]]:
    rows = db_rows(db_url, "SELECT proxy_id, status, reason, rule, attempt_count FROM jobs")
    return {p: {"status": s, "reason": r or "", "rule": rule, "attempts": n} for p, s, r, rule, n in rows}


def workflows_by_id(sim: Sim) -> dict[str, dict[str, Any]]:
    return {w["id"]: {**w, "proxy_id": p["proxy_id"]} for p in sim.fleet() for w in p["workflows"]}


def polls_after_end(log: list[dict[str, Any]], workflows: dict[str, dict[str, Any]]) -> dict[str, list[int]]:
    """Job polls that came after the workflow's final answer had already been given.

    The call log does not carry the job status, but the simulator computes it from the clock while it
    handles the call, between ``received_at`` and ``answered_at``: a 200 answer to a poll received at or
    after the workflow's ``ended_at`` was final. Any later poll of that id is a poll after the end.
    """
    polls: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in log:
        if rec["route"] == "job":
            polls[rec["workflow_id"]].append(rec)
    bad: dict[str, list[int]] = {}
    for wid, recs in polls.items():
        ended = workflows.get(wid, {}).get("ended_at")
        if ended is None:
            continue
        recs.sort(key=lambda r: r["seq"])
        first_final = next(
            (k for k, r in enumerate(recs) if r["http_status"] == 200 and r["received_at"] >= ended), None
        )
        if first_final is not None and first_final != len(recs) - 1:
            bad[wid] = [r["seq"] for r in recs[first_final + 1 :]]
    return bad


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


# ------------------------------------------------------------------------------ the mixed fleet
MIXED: dict[str, dict[str, Any]] = {
    "at-target": {"current_version": TARGET},
    "behind": {"workflow": "complete"},
    "mismatch": {"current_version": OLD},  # the inventory says SOURCE
    "cannot": {"can_upgrade": False},
    "above-latest": {"latest_version": "2.23.18.000"},
    "wf-fails": {"workflow": "fail", "fail_reason": "node restart timed out"},
    "no-change": {"workflow": "no_version_change"},
    "hangs": {"workflow": "hang"},
    "no-source": {"current_version": OLD, "workflow": "complete"},  # inventory entry without source
}
PLANNED = {
    "at-target": "skip",
    "behind": "upgrade",
    "mismatch": "flag",
    "cannot": "flag",
    "above-latest": "flag",
    "wf-fails": "upgrade",
    "no-change": "upgrade",
    "hangs": "upgrade",
    "no-source": "upgrade",
}


def test_mixed_fleet_ends_as_planned(sim_factory, tmp_path: Path, db_url: str) -> None:
    sim = sim_factory(scenario(MIXED))
    tags = list(MIXED)
    inv = write_inventory(tmp_path / "mixed.yaml", tags, {"no-source": {"source_version": None}})
    pid = {tag: ids(tag)[1] for tag in tags}

    # ---- plan first: read-only, and it must predict the run's split
    p = cli("plan", str(inv), "--endpoint", sim.url, "--format", "json")
    assert p.code == 0, str(p)
    plan = json.loads(p.out)
    assert upgrades_per_proxy(sim.log()) == Counter(), "plan sent upgrade calls"
    assert {r["route"] for r in sim.log()} == {"proxy_version"}
    verdicts = {r["proxy_id"]: r for r in plan["proxies"]}
    assert {tag: verdicts[pid[tag]]["verdict"] for tag in tags} == PLANNED
    assert plan["summary"]["upgrade"] == 5 and plan["summary"]["skip"] == 1 and plan["summary"]["flag"] == 3
    assert plan["summary"]["unreachable"] == 0
    assert verdicts[pid["no-source"]]["current_version"] == OLD
    plan_calls = len(sim.log())

    # ---- the run
    r = cli(
        "run",
        str(inv),
        "--db",
        db_url,
        "--endpoint",
        sim.url,
        "--rate",
        "50/s",
        "--concurrency",
        "8",
        "--poll-timeout",
        "4",
        *FAST,
    )
    assert r.code == 1, str(r)  # finished, with flagged jobs

    log = sim.log()[plan_calls:]
    fleet = {f["proxy_id"]: f for f in sim.fleet()}
    calls = upgrades_per_proxy(log)
    jobs = jobs_by_proxy(db_url)
    wf = {f["proxy_id"]: f["workflows"] for f in fleet.values()}

    # plan's prediction held: upgrade verdicts got exactly one call, the others none
    for tag in tags:
        expected_calls = 1 if PLANNED[tag] == "upgrade" else 0
        assert calls.get(pid[tag], 0) == expected_calls, (tag, calls.get(pid[tag], 0))
        assert fleet[pid[tag]]["upgrade_calls"] == expected_calls, tag
    for tag in tags:
        if PLANNED[tag] == "skip":
            assert jobs[pid[tag]]["status"] == "skipped", (tag, jobs[pid[tag]])
        if PLANNED[tag] == "flag":
            assert jobs[pid[tag]]["status"] == "flagged", (tag, jobs[pid[tag]])
            assert jobs[pid[tag]]["reason"] == verdicts[pid[tag]]["reason"], tag

    expect = {
        "at-target": ("skipped", f"already at target {TARGET}"),
        "behind": ("succeeded", ""),
        "mismatch": ("flagged", f"source mismatch: inventory says {SOURCE}, proxy runs {OLD}"),
        "cannot": ("flagged", f"the cloud reports can_upgrade: false for {SOURCE}"),
        "above-latest": ("flagged", f"target {TARGET} is above the latest available version 2.23.18.000"),
        "wf-fails": ("flagged", f"workflow {wf[pid['wf-fails']][0]['id']} Failed: node restart timed out"),
        "no-change": (
            "flagged",
            f"workflow {wf[pid['no-change']][0]['id']} completed "
            f"but the proxy runs {SOURCE} (target {TARGET})",
        ),
        "hangs": ("flagged", f"timed out waiting for workflow {wf[pid['hangs']][0]['id']}"),
        "no-source": ("succeeded", ""),
    }
    got = {tag: (jobs[pid[tag]]["status"], jobs[pid[tag]]["reason"]) for tag in tags}
    # the hung workflow's reason ends with its last progress ("... (last status Running 42%)")
    assert got["hangs"][1].startswith(expect["hangs"][1] + " (last status Running"), got["hangs"]
    got["hangs"] = (got["hangs"][0], expect["hangs"][1])
    assert got == expect

    # the simulator agrees on versions
    assert fleet[pid["behind"]]["current_version"] == TARGET
    assert fleet[pid["no-source"]]["current_version"] == TARGET
    assert fleet[pid["no-change"]]["current_version"] == SOURCE
    assert fleet[pid["wf-fails"]]["current_version"] == SOURCE
    assert [w["status"] for w in wf[pid["hangs"]]] == ["Running"]

    # the entry without source_version was upgraded from the version the proxy really ran
    sent = [rec for rec in log if rec["route"] == "upgrade" and rec["proxy_id"] == pid["no-source"]]
    assert [(rec["source_version"], rec["target_version"]) for rec in sent] == [(OLD, TARGET)]
    sent = [rec for rec in log if rec["route"] == "upgrade" and rec["proxy_id"] == pid["behind"]]
    assert [(rec["source_version"], rec["target_version"]) for rec in sent] == [(SOURCE, TARGET)]

    # postflight: every succeeded job's version was read after its workflow ended
    for tag in ("behind", "no-source"):
        ended = max(w["ended_at"] for w in wf[pid[tag]])
        reads = [rec for rec in log if rec["route"] == "proxy_version" and rec["proxy_id"] == pid[tag]]
        assert any(rec["received_at"] >= ended for rec in reads), tag

    # the job table followed each workflow to the state the cloud reports
    rows = db_rows(db_url, "SELECT workflow_id, job_status FROM workflows")
    recorded = dict(rows)
    for tag in ("behind", "no-source", "no-change"):
        assert recorded[wf[pid[tag]][0]["id"]] == "Completed", tag
    assert recorded[wf[pid["wf-fails"]][0]["id"]] == "Failed"
    assert recorded[wf[pid["hangs"]][0]["id"]] not in FINAL

    assert polls_after_end(log, workflows_by_id(sim)) == {}
    fl = cli("flagged", "1", "--db", db_url)
    assert fl.code == 0 and "timed out waiting for workflow" in fl.out, str(fl)


# -------------------------------------------------------------------------- rate and poll ends
def test_tracking_polls_respect_the_rate_and_stop_at_the_end(sim_factory, tmp_path: Path) -> None:
    proxies: dict[str, dict[str, Any]] = {}
    for n in range(16):
        spec: dict[str, Any] = {"workflow": "fail" if n % 5 == 4 else "complete"}
        if n % 4 == 1:
            spec["nodes"] = 2
        proxies[f"p{n}"] = spec
    sim = sim_factory(
        scenario(proxies, speed=1, workflow={"pending_s": 1, "running_s": 5, "job_visible_after_s": 0.5})
    )
    inv = write_inventory(tmp_path / "fleet.yaml", list(proxies))
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    rate = 10
    r = cli(
        "run",
        str(inv),
        "--db",
        db,
        "--endpoint",
        sim.url,
        "--rate",
        f"{rate}/s",
        "--concurrency",
        "8",
        "--poll-timeout",
        "120",
        "--poll-initial",
        "0.1",
        "--poll-interval",
        "0.1",
        "--reconcile-grace",
        "1",
        "--seed",
        "1",
    )
    assert r.code == 1, str(r)  # the failing workflows are flagged

    log = sim.log()
    workflows = workflows_by_id(sim)
    by_route = Counter(rec["route"] for rec in log)
    # tracking really polled, and competed with preflight/upgrade/postflight for the limit
    assert by_route["job"] >= 2 * len(workflows), by_route
    assert workflows and all(w["ended_at"] is not None for w in workflows.values())
    assert polls_after_end(log, workflows) == {}
    # every workflow's end was seen: its last poll was answered after it ended
    last_poll: dict[str, dict[str, Any]] = {}
    for rec in log:
        if rec["route"] == "job":
            last_poll[rec["workflow_id"]] = rec
    for wid, w in workflows.items():
        assert wid in last_poll, wid
        assert last_poll[wid]["answered_at"] >= w["ended_at"], wid
    recorded = dict(db_rows(db, "SELECT workflow_id, job_status FROM workflows"))
    assert {wid: recorded.get(wid) for wid in workflows} == {wid: w["status"] for wid, w in workflows.items()}

    jobs = jobs_by_proxy(db)
    for tag, spec in proxies.items():
        want = "flagged" if spec["workflow"] == "fail" else "succeeded"
        assert jobs[ids(tag)[1]]["status"] == want, (tag, jobs[ids(tag)[1]])
    assert max(upgrades_per_proxy(log).values()) == 1

    # the limit holds where it matters, at the gateway: every call of every route, any 1 s window (less
    # the simulator's own stamping lag, see tests/simlog.py)
    arrivals = [rec["received_at"] for rec in log]
    worst = gateway_worst(arrivals, 1.0)
    assert worst <= rate, (worst, busiest_window(log, gateway_width(1.0)))
    busiest = max_in_window(arrivals, 1.0)
    assert busiest >= rate * 0.6, busiest  # the limiter is not starving the run either


# ------------------------------------------------------------------------- resume mid-tracking
def test_resume_in_the_middle_of_tracking_sends_nothing_again(
    sim_factory, tmp_path: Path, db_url: str
) -> None:
    tags = [f"slow{n}" for n in range(6)]
    # 1 s pending + 7 s running (real seconds at speed 1): mid-flight when the process is killed
    sim = sim_factory(
        scenario(
            {t: {"workflow": "complete", "nodes": 2 if n % 3 == 0 else 1} for n, t in enumerate(tags)},
            speed=1,
            workflow={"pending_s": 1, "running_s": 7, "job_visible_after_s": 0.5},
        )
    )
    inv = write_inventory(tmp_path / "fleet.yaml", tags)
    args = [
        "--endpoint",
        sim.url,
        "--rate",
        "50/s",
        "--concurrency",
        "8",
        "--poll-initial",
        "0.2",
        "--poll-interval",
        "0.3",
        "--reconcile-grace",
        "1",
        "--lease",
        "2",
        "--heartbeat",
        "0.5",
        "--seed",
        "1",
    ]
    proc = cli_bg("run", str(inv), "--db", db_url, *args, stdout=tmp_path / "run1.out")
    try:

        def all_accepted() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"run ended early ({proc.returncode}): {(tmp_path / 'run1.out').read_text()}"
                )
            try:
                rows = db_rows(db_url, "SELECT status FROM jobs")
            except Exception:  # the table may not exist yet
                return False
            polled = any(rec["route"] == "job" and rec["http_status"] == 200 for rec in sim.log())
            return len(rows) == len(tags) and all(s == "accepted" for (s,) in rows) and polled

        wait_for(all_accepted, 60, "every job accepted and a workflow polled")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    killed_at = time.time()

    # precondition: the workflows are still running in the cloud
    running = [w for f in sim.fleet() for w in f["workflows"] if w["ended_at"] is None]
    assert running, "every workflow had already ended: the test did not kill mid-tracking"
    assert {row[0] for row in db_rows(db_url, "SELECT status FROM jobs")} == {"accepted"}

    r = cli("resume", "1", "--db", db_url, *args, timeout=120)
    assert r.code == 0, str(r)

    log = sim.log()
    assert upgrades_per_proxy(log) == Counter({ids(t)[1]: 1 for t in tags})
    fleet = {f["proxy_id"]: f for f in sim.fleet()}
    for t in tags:
        assert fleet[ids(t)[1]]["upgrade_calls"] == 1, t
        assert fleet[ids(t)[1]]["current_version"] == TARGET, t
    jobs = jobs_by_proxy(db_url)
    assert {j["status"] for j in jobs.values()} == {"succeeded"}, jobs
    assert {j["attempts"] for j in jobs.values()} == {1}
    assert db_rows(db_url, "SELECT count(*) FROM attempts")[0][0] == len(tags)
    # the resumed process tracked the workflows that were still running, and stopped at their end
    late = {rec["workflow_id"] for rec in log if rec["route"] == "job" and rec["received_at"] > killed_at}
    assert {w["id"] for w in running} <= late
    assert polls_after_end(log, workflows_by_id(sim)) == {}


# ------------------------------------------------------------------------------------- --no-wait
def test_no_wait_stops_at_accept(sim_factory, tmp_path: Path) -> None:
    tags = ["nw0", "nw1", "nw2", "nw-at-target"]
    sim = sim_factory(
        scenario({"nw0": {}, "nw1": {"nodes": 2}, "nw2": {}, "nw-at-target": {"current_version": TARGET}})
    )
    inv = write_inventory(tmp_path / "fleet.yaml", tags)
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    r = cli("run", str(inv), "--db", db, "--endpoint", sim.url, "--no-wait", *FAST)
    assert r.code == 0, str(r)

    log = sim.log()
    assert not [rec for rec in log if rec["route"] == "job"]
    assert upgrades_per_proxy(log) == Counter({ids(t)[1]: 1 for t in tags[:3]})
    jobs = jobs_by_proxy(db)
    assert {t: jobs[ids(t)[1]]["status"] for t in tags} == {
        "nw0": "accepted",
        "nw1": "accepted",
        "nw2": "accepted",
        "nw-at-target": "skipped",
    }
    # no postflight either: after the upgrade call nothing more was asked about those proxies
    for t in tags[:3]:
        recs = [rec["route"] for rec in log if rec["proxy_id"] == ids(t)[1]]
        assert recs[-1] == "upgrade" and recs.count("upgrade") == 1, (t, recs)
