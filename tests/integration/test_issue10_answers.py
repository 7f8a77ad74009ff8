"""Issue 10, kinds 2, 3, 4 and 7: what might have changed the cloud is reconciled, never resent blindly or
taken for "nothing happened"; what preflight learned is kept; a partial accept is tracked to its end.

The real CLI against the real simulator, with a hostile gateway (tests/hostile.py) in front of it where
the kind is an answer no honest cloud gives; on both backends where the job table is what is judged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Sim, cli, db_rows, on_both_backends_once
from tests.issue10 import (
    CURRENT,
    INSTANCE,
    PROXY,
    SUBNET,
    TARGET,
    Hostile,
    attempts,
    created_by_proxy,
    inventory,
    jobs,
    run_cli,
    scenario,
    workflows,
)
from tests.simlog import applied_per_proxy, sent_after_applied, upgrades_per_proxy


def assert_succeeded_with_its_workflow(sim: Sim, db: str, proxy: str = PROXY) -> None:
    """The right value of kinds 2 and 3: the job succeeded, and every workflow the cloud created for the
    proxy is recorded on it (the audit trail keeps this run's upgrade); the proxy was upgraded once."""
    job = jobs(db)[proxy]
    assert job["status"] == "succeeded", job
    created = created_by_proxy(sim)[proxy]
    assert len(created) == 1, created
    recorded = {w["workflow_id"] for w in workflows(db, proxy) if w["workflow_id"]}
    assert created <= recorded, (created, workflows(db, proxy))
    assert applied_per_proxy(sim.log())[proxy] == 1
    assert not sent_after_applied(sim.log()), "an upgrade call was sent after the cloud had applied one"
    fleet = {p["proxy_id"]: p for p in sim.fleet()}
    assert fleet[proxy]["current_version"] == TARGET


# ------------------------------------------------------------------------------------------- kind 3
# An ACCEPT that does not prove its state: the cloud applied the upgrade, the answer lies about it. The
# static bodies are forwarded first (the backend acts), then replaced.
OTHER_INSTANCE = "99999999999999999999999999999999in07"
WF = "6f1c2d3e-0000-4000-8000-00000000000"  # + a digit: workflow ids the cloud never issued


def forged(*items: dict[str, Any]) -> dict[str, Any]:
    """A rule: the backend acts on the call, then the client gets 200 with these items instead."""
    return {
        "route": "upgrade", "action": "raw", "forward": True, "status": 200,
        "body": json.dumps({"update_result": list(items)}),
    }  # fmt: skip


ITEM_REWRITES: dict[str, dict[str, Any]] = {
    "null workflow id": {"route": "upgrade", "action": "null_workflow_id"},
    "lower-case accept": {"route": "upgrade", "action": "lower_state"},
    "unknown state": forged({"instance_id": INSTANCE, "workflow_id": WF + "1", "state": "QUEUED"}),
    "another instance": forged({"instance_id": OTHER_INSTANCE, "workflow_id": WF + "2", "state": "ACCEPT"}),
    "workflow id twice": forged(
        {"workflow_id": WF + "3", "state": "ACCEPT"}, {"workflow_id": WF + "3", "state": "ACCEPT"}
    ),
    "workflow id not a string": forged({"instance_id": INSTANCE, "workflow_id": 17, "state": "ACCEPT"}),
    "empty update_result": forged(),
}


@on_both_backends_once("rewrite", list(ITEM_REWRITES))
def test_items_that_do_not_prove_their_state_are_reconciled(
    rewrite: str,
    sim_factory: Callable[..., Sim],
    hostile_factory: Callable[..., Hostile],
    tmp_path: Path,
    db_url: str,
) -> None:
    """The issue's small input (one proxy, 2.23.12.000 -> 2.24.03.000, the cloud applies the upgrade and
    the answer's item does not prove its state), for every way an item can fail to prove it: the job
    succeeds with the real workflow recorded, never "workflow completed" without one tracked."""
    sim = sim_factory(scenario())
    gw = hostile_factory(sim.url, [{**ITEM_REWRITES[rewrite], "calls": [1]}])
    inv = inventory(sim, tmp_path / "fleet.yaml")
    r = run_cli(inv, db_url, gw.url)
    assert r.code == 0, str(r)
    assert_succeeded_with_its_workflow(sim, db_url)
    # the lie is not recorded as a workflow to follow: only the cloud's own id is
    created = created_by_proxy(sim)[PROXY]
    accepted = {w["workflow_id"] for w in workflows(db_url, PROXY) if w["state"] == "ACCEPT"}
    assert accepted == created, workflows(db_url, PROXY)
    first = attempts(db_url, PROXY)[0]
    assert first["outcome"] in ("reconcile", "reconciled"), attempts(db_url, PROXY)
    assert "rejected by the cloud" not in r.out + r.err
    # postflight names the workflow it tracked to its end: the cloud's, not one the answer made up
    (said,) = db_rows(db_url, "SELECT reason FROM events WHERE to_status = 'succeeded'")
    assert said[0] and created <= set(re.findall(r"[0-9a-f-]{36}", said[0])), said


# ------------------------------------------------------------------------------------------- kind 2
# Answers that do not prove the backend did nothing, after the backend applied the upgrade: a gateway
# page, a 5xx with a JSON body, a dropped connection. Each is reconciled: the workflow is found and
# recorded, the job succeeds by postflight, and no second upgrade call is sent.
UNPROVEN: dict[str, dict[str, Any]] = {
    "502 html page": {"route": "upgrade", "action": "status_html", "status": 502},
    "503 html page": {"route": "upgrade", "action": "status_html", "status": 503},
    "504 html page": {"route": "upgrade", "action": "status_html", "status": 504},
    "500 json error": {
        "route": "upgrade", "action": "raw", "forward": True, "status": 500,
        "body": '{"error_code": "DBS.05000000", "error_msg": "Internal error."}',
    },
    "503 apigw json": {
        "route": "upgrade", "action": "raw", "forward": True, "status": 503,
        "body": '{"error_code": "APIGW.0202", "error_msg": "The API is unavailable."}',
    },
    "200 html page": {
        "route": "upgrade", "action": "raw", "forward": True, "status": 200, "content_type": "text/html",
        "body": "<html><body>OK</body></html>",
    },
    "connection reset": {"route": "upgrade", "action": "reset"},
}  # fmt: skip


@pytest.mark.parametrize("answer", list(UNPROVEN), ids=list(UNPROVEN))
def test_unproven_answer_after_the_backend_applied_is_reconciled_never_skipped(
    answer: str, sim_factory: Callable[..., Sim], hostile_factory: Callable[..., Hostile], tmp_path: Path
) -> None:
    sim = sim_factory(scenario())
    gw = hostile_factory(sim.url, [{**UNPROVEN[answer], "calls": [1]}])
    inv = inventory(sim, tmp_path / "fleet.yaml")
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    r = run_cli(inv, db, gw.url)
    assert r.code == 0, str(r)
    assert_succeeded_with_its_workflow(sim, db)
    assert upgrades_per_proxy(sim.log())[PROXY] == 1, "resent although the backend had applied it"
    assert attempts(db, PROXY)[0]["outcome"] in ("reconcile", "reconciled"), attempts(db, PROXY)


@pytest.mark.parametrize("answer", ["502 html page", "503 html page"])
def test_gateway_page_after_the_backend_applied_on_both_backends(
    answer: str,
    sim_factory: Callable[..., Sim],
    hostile_factory: Callable[..., Hostile],
    tmp_path: Path,
    db_url: str,
) -> None:
    sim = sim_factory(scenario())
    gw = hostile_factory(sim.url, [{**UNPROVEN[answer], "calls": [1]}])
    inv = inventory(sim, tmp_path / "fleet.yaml")
    r = run_cli(inv, db_url, gw.url)
    assert r.code == 0, str(r)
    assert_succeeded_with_its_workflow(sim, db_url)
    assert jobs(db_url)[PROXY]["status"] != "skipped"


# The resend meets "already at target" or "busy" after an earlier attempt whose answer proved nothing and
# whose workflow the cloud's job list did not show yet (it lags): the earlier attempt did it. The first
# answer is a gateway page after the backend applied; the first two listings of recent jobs come back
# empty (so reconcile concludes "nothing started" and resends); the resend is answered by the gateway.
EMPTY_JOBS = '{"jobs": [], "total_count": 0}'
RESEND_MEETS: dict[str, dict[str, Any]] = {
    "already at target": {
        "status": 400, "error_code": "DBS.05000008",
        "error_msg": "The proxy version is already the latest version.",
    },
    "another operation in progress": {
        "status": 409, "error_code": "DBS.200019",
        "error_msg": "Another operation is being performed on the instance.",
    },
}  # fmt: skip


@on_both_backends_once("met", list(RESEND_MEETS))
def test_resend_meeting_at_target_or_busy_reconciles_and_records_the_workflow(
    met: str,
    sim_factory: Callable[..., Sim],
    hostile_factory: Callable[..., Hostile],
    tmp_path: Path,
    db_url: str,
) -> None:
    sim = sim_factory(scenario(running_s=12, speed=1))  # the workflow outlives reconcile's wait
    gw = hostile_factory(
        sim.url,
        [
            {"route": "upgrade", "action": "status_html", "status": 502, "calls": [1]},
            {"route": "upgrade", "action": "http_error", **RESEND_MEETS[met], "calls": [1]},
            {"route": "immediate_jobs", "action": "raw", "status": 200, "body": EMPTY_JOBS, "calls": [1, 2]},
        ],
    )
    inv = inventory(sim, tmp_path / "fleet.yaml")
    r = run_cli(inv, db_url, gw.url)
    assert r.code == 0, str(r)
    assert_succeeded_with_its_workflow(sim, db_url)
    tries = attempts(db_url, PROXY)
    assert len(tries) == 2, tries
    # the resend's answer stays on its attempt (reconcile does not erase it) ...
    assert tries[1]["http_status"] == RESEND_MEETS[met]["status"], tries
    assert tries[1]["error_code"] == RESEND_MEETS[met]["error_code"], tries
    # ... and the event log says which guard sent it to reconcile
    guards = db_rows(db_url, "SELECT rule FROM events WHERE rule LIKE 'default:resend-met-%'")
    assert guards, db_rows(db_url, "SELECT kind, from_status, to_status, rule FROM events ORDER BY id")
    assert jobs(db_url)[PROXY]["status"] != "skipped"


# ------------------------------------------------------------------------------------------- kind 4
# One transient answer before the upgrade is accepted, with no source_version in the inventory: every
# resend carries the version preflight read.
TRANSIENT: dict[str, dict[str, Any]] = {
    "503 APIGW.0202": {"http": 503, "error_code": "APIGW.0202"},
    "409 busy": {"http": 409, "error_code": "DBS.200019"},
    "429 throttled": {"http": 429, "error_code": "APIGW.0308"},
    "500 DBS.05000000": {"http": 500, "error_code": "DBS.05000000"},
}


@pytest.mark.parametrize("first", list(TRANSIENT), ids=list(TRANSIENT))
def test_a_resend_sends_the_version_preflight_read(
    first: str, sim_factory: Callable[..., Sim], tmp_path: Path
) -> None:
    sim = sim_factory(scenario([{"id": PROXY, "script": [TRANSIENT[first], {"accept": True}]}]))
    inv = inventory(sim, tmp_path / "fleet.yaml", source_version=False)
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    r = run_cli(inv, db, sim.url)
    assert r.code == 0, str(r)
    assert jobs(db)[PROXY]["status"] == "succeeded", jobs(db)
    calls = [c for c in sim.log() if c["route"] == "upgrade"]
    assert len(calls) == 2, calls
    assert [c["source_version"] for c in calls] == [CURRENT, CURRENT]


def test_issue_input_503_then_accept_without_source_version(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str
) -> None:
    """The issue's small input, on both backends: exit 0, job succeeded, two upgrade calls."""
    sim = sim_factory(scenario([{"id": PROXY, "script": [TRANSIENT["503 APIGW.0202"], {"accept": True}]}]))
    inv = inventory(sim, tmp_path / "fleet.yaml", source_version=False)
    r = run_cli(inv, db_url, sim.url)
    assert r.code == 0, str(r)
    assert jobs(db_url)[PROXY]["status"] == "succeeded"
    assert upgrades_per_proxy(sim.log())[PROXY] == 2
    assert "preflight is off" not in r.out + r.err


@on_both_backends_once("preflight", ["--preflight", "--no-preflight"])
def test_retry_flagged_and_resume_send_the_version_preflight_read(
    preflight: str, sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str
) -> None:
    """The operator's path: the first answer flags the job; ``retry --flagged`` then ``resume`` resend,
    with the source version read again (or kept), whatever --preflight says."""
    sim = sim_factory(scenario([{"id": PROXY, "script": [{"reject": SUBNET}, {"accept": True}]}]))
    inv = inventory(sim, tmp_path / "fleet.yaml", source_version=False)
    r = run_cli(inv, db_url, sim.url, preflight)
    assert r.code == 1, str(r)
    assert jobs(db_url)[PROXY]["status"] == "flagged"
    rq = cli("retry", "1", "--flagged", "--db", db_url)
    assert rq.code == 0 and "re-queued 1" in rq.out, str(rq)
    res = cli("resume", "1", "--db", db_url, timeout=120)
    assert res.code == 0, str(res)
    assert jobs(db_url)[PROXY]["status"] == "succeeded"
    calls = [c for c in sim.log() if c["route"] == "upgrade"]
    assert [c["source_version"] for c in calls] == [CURRENT, CURRENT], calls


# ------------------------------------------------------------------------------------------- kind 7
MIXED = {"id": PROXY, "nodes": 2, "reject": SUBNET, "reject_nodes": [1]}


def test_partial_accept_is_tracked_to_its_end_then_flagged(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str
) -> None:
    sim = sim_factory(scenario([MIXED], running_s=2, speed=1))
    inv = inventory(sim, tmp_path / "fleet.yaml")
    r = run_cli(inv, db_url, sim.url)
    assert r.code == 1, str(r)
    job = jobs(db_url)[PROXY]
    assert job["status"] == "flagged", job
    accepted = [w for w in workflows(db_url, PROXY) if w["state"] == "ACCEPT"]
    assert len(accepted) == 1 and accepted[0]["job_status"] == "Completed", workflows(db_url, PROXY)
    assert accepted[0]["workflow_id"] in created_by_proxy(sim)[PROXY]
    # the flag came after the workflow's end, and the job was polled until then
    polls = [c for c in sim.log() if c["route"] == "job" and c["workflow_id"] == accepted[0]["workflow_id"]]
    assert polls, "the accepted node's workflow was never polled"
    assert upgrades_per_proxy(sim.log())[PROXY] == 1
    # one consistent next step (kind 10): retry, with the real run id, and no warning against it
    assert "again" not in (job["hint"] or ""), job["hint"]
    assert INSTANCE not in job["reason"], job["reason"]
    shown = cli("flagged", "1", "--db", db_url)
    assert shown.code == 0, str(shown)
    assert "orchestrator retry 1 --flagged" in shown.out, shown.out
    assert "{run}" not in shown.out and "retry RUN" not in shown.out, shown.out


def test_retry_never_resends_while_a_workflow_of_the_proxy_runs_and_says_when(
    sim_factory: Callable[..., Sim], tmp_path: Path, db_url: str
) -> None:
    """A partial accept whose accepted workflow still runs when the job is flagged (the wait for it timed
    out): ``retry --flagged`` says which workflow was running and since when, and the resume sends
    nothing to the proxy while it runs (it looks first, and hands the job back); once the workflow has
    ended and the cause is fixed, ``retry`` + ``resume`` upgrade the proxy."""
    sim = sim_factory(scenario([{**MIXED, "workflow": "hang"}]))
    inv = inventory(sim, tmp_path / "fleet.yaml")
    r = run_cli(inv, db_url, sim.url, "--poll-timeout", "1")
    assert r.code == 1, str(r)
    job = jobs(db_url)[PROXY]
    assert job["status"] == "flagged", job
    running = [w for w in workflows(db_url, PROXY) if w["state"] == "ACCEPT"]
    assert len(running) == 1 and running[0]["job_status"] in ("Pending", "Running"), running
    wid = running[0]["workflow_id"]

    for _ in range(2):  # asking twice changes nothing
        rq = cli("retry", "1", "--flagged", "--db", db_url)
        assert rq.code == 0, str(rq)
        assert wid in rq.out and "while that workflow runs" in rq.out, str(rq)
        assert re.search(r"\d\d:\d\d:\d\d UTC", rq.out), rq.out  # when it was last seen, with its zone
        before = upgrades_per_proxy(sim.log())[PROXY]
        res = cli("resume", "1", "--db", db_url, timeout=60)
        assert res.code == 1, str(res)
        assert upgrades_per_proxy(sim.log())[PROXY] == before == 1, "resent while its workflow runs"
        job = jobs(db_url)[PROXY]
        assert job["status"] == "flagged" and wid in job["reason"], job

    # the workflow ends and the subnet is fixed: the retry goes through and the proxy is upgraded
    sim.patch(
        {
            "workflows": {wid: {"outcome": "complete"}},
            "proxies": {PROXY: {"reject": None, "workflow": "complete"}},
        }
    )
    rq = cli("retry", "1", "--flagged", "--db", db_url)
    res = cli("resume", "1", "--db", db_url, timeout=120)
    assert res.code == 0, f"{rq}\n{res}"
    assert jobs(db_url)[PROXY]["status"] == "succeeded"
    assert upgrades_per_proxy(sim.log())[PROXY] == 2
    polled = [c for c in sim.log() if c["route"] == "job" and c["workflow_id"] == wid]
    last_upgrade = max(c["seq"] for c in sim.log() if c["route"] == "upgrade")
    assert any(c["seq"] < last_upgrade for c in polled[-1:]), "resent before looking at the workflow"
