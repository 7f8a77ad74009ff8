"""The simulated fleet with a fake clock: validation order, verdicts, scripts, workflow timing."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from orchestrator.simulator.fleet import BadRequest, Fleet, Reply
from orchestrator.simulator.scenario import Scenario

PROJECT = "054e292c9880d4992f02c0196d3ea468"
OLD, NEW = "2.23.12.000", "2.24.03.000"
BODY = {"source_version": OLD, "target_version": NEW}
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def make_fleet(proxies: list[dict[str, Any]], **extra: Any) -> tuple[Fleet, FakeClock]:
    data: dict[str, Any] = {
        "seed": 1,
        "project_id": PROJECT,
        "workflow": {"pending_s": 10, "running_s": 100, "job_visible_after_s": 5},
        "fleet": {"instances": [{"id": "inst1", "name": "one", "proxies": proxies}]},
    }
    data.update(extra)
    clock = FakeClock()
    return Fleet(Scenario.from_dict(data), clock=clock), clock


def upgrade(fleet: Fleet, proxy: str = "p1", body: Any = BODY, instance: str = "inst1") -> Reply:
    answer = fleet.upgrade(PROJECT, instance, proxy, body)
    assert answer.reply is not None
    return answer.reply


def version(fleet: Fleet, proxy: str = "p1") -> str:
    body = fleet.proxy_version(PROJECT, "inst1", proxy).body
    return str(body["current_version"])


def test_workflow_walks_pending_running_completed_and_only_then_changes_the_version() -> None:
    fleet, clock = make_fleet([{"id": "p1"}])
    reply = upgrade(fleet)
    assert reply.status == 200
    (item,) = reply.body["update_result"]
    assert item == {
        "instance_id": "inst1",
        "workflow_id": item["workflow_id"],
        "state": "ACCEPT",
        "error_message": None,
    }
    wid = item["workflow_id"]

    def job() -> Reply:
        return fleet.job(PROJECT, wid)

    assert job().body["error_code"] == "DBS.200543"  # not visible yet
    clock.now = T0 + 5
    assert (job().body["job"]["status"], job().body["job"]["process"]) == ("Pending", "0%")
    clock.now = T0 + 60
    assert (job().body["job"]["status"], job().body["job"]["process"]) == ("Running", "50%")
    assert version(fleet) == OLD
    clock.now = T0 + 110
    done = job().body["job"]
    assert (done["status"], done["process"], done["fail_reason"]) == ("Completed", "100%", None)
    assert done["ended"] == time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(T0 + 110))
    assert done["instance"] == {"id": "inst1", "name": "one"}
    assert version(fleet) == NEW
    assert fleet.proxy_version(PROJECT, "inst1", "p1").body["can_upgrade"] is False


def test_speed_scales_workflow_time() -> None:
    fleet, clock = make_fleet([{"id": "p1"}], speed=10)
    wid = upgrade(fleet).body["update_result"][0]["workflow_id"]
    clock.now = T0 + 0.6
    assert fleet.job(PROJECT, wid).body["job"]["status"] == "Pending"
    clock.now = T0 + 11.0
    assert fleet.job(PROJECT, wid).body["job"]["status"] == "Completed"


@pytest.mark.parametrize(
    ("instance", "proxy", "body", "status", "code"),
    [
        ("nope", "p1", BODY, 404, "DBS.200002"),
        ("inst1", "nope", BODY, 400, "DBS.270024"),
        ("inst1", "nope", None, 400, "DBS.270024"),  # unknown proxy wins over a bad body
        ("inst1", "p1", None, 400, "DBS.200001"),
        ("inst1", "p1", {"source_version": OLD}, 400, "DBS.200001"),
        ("inst1", "p1", {"source_version": OLD, "target_version": 2.24}, 400, "DBS.200001"),
        ("inst1", "p1", {"source_version": OLD, "target_version": "2.24"[:2]}, 400, "DBS.200001"),
        ("inst1", "p1", {"source_version": NEW, "target_version": OLD}, 400, "DBS.200001"),
        ("inst1", "p1", {"source_version": OLD, "target_version": OLD}, 400, "DBS.05000008"),
        ("inst1", "p1", {"source_version": "2.23.06.000", "target_version": NEW}, 400, "DBS.05000001"),
        ("inst1", "p1", {"source_version": OLD, "target_version": "2.25.01.000"}, 400, "DBS.200001"),
    ],
)
def test_validation_order(instance: str, proxy: str, body: Any, status: int, code: str) -> None:
    fleet, _ = make_fleet([{"id": "p1"}])
    reply = upgrade(fleet, proxy, body, instance)
    assert (reply.status, reply.body["error_code"]) == (status, code)
    assert fleet.workflows == {}


def test_busy_instance_answers_409_before_version_checks_until_the_workflow_ends() -> None:
    fleet, clock = make_fleet([{"id": "p1"}, {"id": "p2", "current_version": NEW}])
    assert upgrade(fleet, "p1").status == 200
    for proxy in ("p1", "p2"):  # even the proxy already at target: busy is checked first
        reply = upgrade(fleet, proxy)
        assert (reply.status, reply.body["error_code"]) == (409, "DBS.200019")
    clock.now = T0 + 110
    assert upgrade(fleet, "p1").body["error_code"] == "DBS.05000008"
    assert upgrade(fleet, "p2").body["error_code"] == "DBS.05000008"


def test_mixed_multi_node_answer_creates_workflows_only_for_accepted_nodes() -> None:
    fleet, clock = make_fleet(
        [
            {
                "id": "p1",
                "nodes": 3,
                "reject": "Upgrade failed due to insufficient subnet ip",
                "reject_nodes": [1],
            }
        ]
    )
    answer = fleet.upgrade(PROJECT, "inst1", "p1", BODY)
    items = answer.reply.body["update_result"] if answer.reply else []
    assert [i["state"] for i in items] == ["ACCEPT", "REJECT", "ACCEPT"]
    assert items[1]["error_message"] == "Upgrade failed due to insufficient subnet ip"
    assert all(i["workflow_id"] for i in items) and len({i["workflow_id"] for i in items}) == 3
    assert answer.effect == "applied"
    assert answer.workflows == (items[0]["workflow_id"], items[2]["workflow_id"])
    assert set(fleet.workflows) == set(answer.workflows)
    clock.now = T0 + 200
    assert fleet.job(PROJECT, items[1]["workflow_id"]).body["error_code"] == "DBS.200543"
    assert fleet.job(PROJECT, items[0]["workflow_id"]).body["job"]["status"] == "Completed"
    assert version(fleet) == OLD  # a partial upgrade does not move the proxy's version


def test_all_nodes_reject_creates_nothing_and_keeps_the_instance_free() -> None:
    fleet, _ = make_fleet([{"id": "p1", "nodes": 2, "reject": "no ip"}, {"id": "p2"}])
    answer = fleet.upgrade(PROJECT, "inst1", "p1", BODY)
    assert answer.effect == "none" and answer.workflows == ()
    assert [i["state"] for i in answer.items] == ["REJECT", "REJECT"]
    assert upgrade(fleet, "p2").status == 200
    assert fleet.proxies["p1"].upgrade_calls == 1 and fleet.proxies["p1"].accepted_calls == 0


def test_script_rejects_twice_then_accepts_and_refused_calls_do_not_consume_verdict_steps() -> None:
    steps: list[dict[str, Any]] = [
        {"reject": "Upgrade failed due to insufficient subnet ip"},
        {"reject": "again"},
        {"accept": True},
    ]
    fleet, _ = make_fleet([{"id": "p1", "script": steps}])
    assert upgrade(fleet).body["update_result"][0]["error_message"] == steps[0]["reject"]
    assert upgrade(fleet, body={"source_version": "2.23.06.000", "target_version": NEW}).status == 400
    assert upgrade(fleet).body["update_result"][0]["error_message"] == "again"
    assert upgrade(fleet).body["update_result"][0]["state"] == "ACCEPT"
    assert upgrade(fleet).body["error_code"] == "DBS.200019"  # script done: normal (busy) behaviour


def test_script_http_and_fault_steps() -> None:
    steps = [
        {"http": 409, "error_code": "DBS.201014"},
        {"http": 500},
        {"fault": "reset_before"},
        {"fault": "reset_after"},
    ]
    fleet, _ = make_fleet([{"id": "p1", "script": steps}])
    first = upgrade(fleet)
    assert (first.status, first.body["error_code"]) == (409, "DBS.201014")
    assert (upgrade(fleet).status, fleet.workflows) == (500, {})
    before = fleet.upgrade(PROJECT, "inst1", "p1", BODY)
    assert (before.reply, before.fault, before.effect) == (None, "reset_before", "none")
    after = fleet.upgrade(PROJECT, "inst1", "p1", BODY)
    assert after.fault == "reset_after" and after.effect == "applied" and after.script_step == 3
    assert len(fleet.workflows) == 1


def test_omit_instance_id() -> None:
    fleet, _ = make_fleet([{"id": "p1", "omit_instance_id": True}])
    item = upgrade(fleet).body["update_result"][0]
    assert "instance_id" not in item and item["state"] == "ACCEPT"


@pytest.mark.parametrize(
    ("outcome", "status", "final_version", "busy_after"),
    [
        ("fail", "Failed", OLD, False),
        ("no_version_change", "Completed", OLD, False),
        ("hang", "Running", OLD, True),
    ],
)
def test_workflow_outcomes(outcome: str, status: str, final_version: str, busy_after: bool) -> None:
    fleet, clock = make_fleet([{"id": "p1", "workflow": outcome, "fail_reason": "node restart timed out"}])
    wid = upgrade(fleet).body["update_result"][0]["workflow_id"]
    clock.now = T0 + 10_000
    job = fleet.job(PROJECT, wid).body["job"]
    assert job["status"] == status
    assert job["fail_reason"] == ("node restart timed out" if outcome == "fail" else None)
    assert version(fleet) == final_version
    assert (upgrade(fleet).status == 409) is busy_after


def test_patch_ends_a_hung_workflow_and_fixes_a_subnet() -> None:
    fleet, clock = make_fleet([{"id": "p1", "workflow": "hang"}, {"id": "p2", "reject": "no ip"}])
    wid = upgrade(fleet).body["update_result"][0]["workflow_id"]
    clock.now = T0 + 1000
    fleet.patch({"workflows": {wid: {"outcome": "complete"}}, "proxies": {"p2": {"reject": None}}})
    assert fleet.job(PROJECT, wid).body["job"]["status"] == "Completed"
    assert version(fleet, "p1") == NEW
    assert upgrade(fleet, "p2").body["update_result"][0]["state"] == "ACCEPT"


def test_patch_refuses_bad_input() -> None:
    fleet, _ = make_fleet([{"id": "p1"}])
    bad: dict[str, Any]
    for bad in (
        {"proxies": {"zz": {}}},
        {"proxies": {"p1": {"nodes": 0}}},
        {"workflows": {"x": {}}},
        {"workflow": {"fail_rate": 2}},
    ):
        with pytest.raises(BadRequest):
            fleet.patch(bad)


def test_workflow_rates_and_ids_are_reproducible_for_a_seed() -> None:
    def run() -> list[tuple[str, str]]:
        proxies = [{"id": f"p{i}"} for i in range(40)]
        data = {
            "seed": 3,
            "project_id": PROJECT,
            "workflow": {"fail_rate": 0.3, "hang_rate": 0.2},
            "fleet": {"instances": [{"id": f"i{i}", "proxies": [p]} for i, p in enumerate(proxies)]},
        }
        fleet = Fleet(Scenario.from_dict(data), clock=FakeClock())
        for i in range(40):
            fleet.upgrade(PROJECT, f"i{i}", f"p{i}", BODY)
        return [(w.id, w.outcome) for w in fleet.workflows.values()]

    first = run()
    assert first == run()
    outcomes = [o for _, o in first]
    assert {"fail", "hang", "complete"} <= set(outcomes)


def test_immediate_jobs_finds_workflows_newest_first_with_filters() -> None:
    fleet, clock = make_fleet(
        [{"id": "p1"}],
        fleet={
            "instances": [{"id": f"i{i}", "name": f"n{i}", "proxies": [{"id": f"p{i}"}]} for i in range(3)]
        },
    )
    wids = []
    for i in range(3):
        clock.now = T0 + 10 * i
        wids.append(fleet.upgrade(PROJECT, f"i{i}", f"p{i}", BODY).workflows[0])
    clock.now = T0 + 22  # the newest job is not visible yet (visible after 5 s)
    body = fleet.immediate_jobs(PROJECT, {"limit": "10"}).body
    assert [j["job_id"] for j in body["jobs"]] == [wids[1], wids[0]]
    assert body["total_count"] == 2
    row = body["jobs"][0]
    assert row["instance_id"] == "i1" and row["job_name"] == "Upgrade proxy version"
    assert json.loads(row["extend_fields"])["proxy_id"] == "p1"
    clock.now = T0 + 30
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + 10))
    found = fleet.immediate_jobs(PROJECT, {"limit": "20", "start_time": start}).body["jobs"]
    assert [j["job_id"] for j in found] == [wids[2], wids[1]]
    by_id = fleet.immediate_jobs(PROJECT, {"job_id": wids[0], "status": "running"}).body["jobs"]
    assert [j["job_id"] for j in by_id] == [wids[0]]
    assert fleet.immediate_jobs(PROJECT, {"limit": "10", "offset": "2"}).body["jobs"][0]["job_id"] == wids[0]
    assert fleet.immediate_jobs(PROJECT, {"job_name": "Reboot instance"}).body["total_count"] == 0
    assert fleet.immediate_jobs(PROJECT, {"status": "Completed"}).body["total_count"] == 0
    assert fleet.immediate_jobs("f" * 32, {}).body["total_count"] == 0


@pytest.mark.parametrize(
    "query", [{"limit": "15"}, {"limit": "100"}, {"start_time": "2024-01-01 00:00"}, {"offset": "-1"}]
)
def test_immediate_jobs_parameter_errors(query: dict[str, str]) -> None:
    fleet, _ = make_fleet([{"id": "p1"}])
    reply = fleet.immediate_jobs(PROJECT, query)
    assert (reply.status, reply.body["error_code"]) == (400, "DBS.200001")


def test_listing_pages_and_limits() -> None:
    proxies = [{"id": f"p{i}", "nodes": 1 + i % 2} for i in range(5)]
    fleet, _ = make_fleet(proxies)
    page = fleet.list_proxies(PROJECT, "inst1", {"offset": "3", "limit": "2"}).body["proxy_list"]
    assert [p["proxy"]["pool_id"] for p in page] == ["p3", "p4"]
    assert [p["proxy"]["node_num"] for p in page] == [2, 1] and len(page[0]["proxy"]["nodes"]) == 2
    for bad in ("0", "101", "x"):
        assert fleet.list_proxies(PROJECT, "inst1", {"limit": bad}).body["error_code"] == "DBS.200001"
    assert fleet.list_proxies(PROJECT, "zz", {"limit": "10"}).status == 404
    listed = fleet.list_instances(PROJECT, {"name": "on"}).body
    assert listed["total_count"] == 1 and listed["instances"][0]["id"] == "inst1"
    assert fleet.list_instances("f" * 32, {}).body["total_count"] == 0
