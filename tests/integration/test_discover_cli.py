"""Issue 15 part 5 through the real CLI against the real simulator: ``discover`` lists instances (paging),
their proxies and each proxy's versions, writes an inventory that ``validate`` accepts and ``run``
completes, names every proxy it left out and why, and keeps to the rate limit it was given.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from orchestrator.simulator.scenario import Scenario
from tests.conftest import cli
from tests.simlog import gateway_worst, upgrades_per_proxy

PROJECT = "9fc9249d724fa691ef2994edca8e5365"
TARGET = "2.24.03.000"
ORDERS = "517ea793ab91438cbfcd9c4b1c958b1ein07"
BILLING = "617ea793ab91438cbfcd9c4b1c958b1ein07"
UPGRADE = "0f46fc46396e4fb19a0cb52f578e9511po01"
AT_TARGET = "0f46fc46396e4fb19a0cb52f578e9511po02"
NO_UPGRADE = "1f46fc46396e4fb19a0cb52f578e9511po01"
ABNORMAL = "1f46fc46396e4fb19a0cb52f578e9511po02"
FAST = ["--poll-initial", "0.2", "--poll-interval", "0.2", "--reconcile-grace", "1"]


def scenario() -> dict[str, Any]:
    return {
        "seed": 9,
        "speed": 100,
        "latency_s": 0.003,
        "project_id": PROJECT,
        "workflow": {"pending_s": 10, "running_s": 20, "job_visible_after_s": 1, "fail_rate": 0},
        "fleet": {
            "instances": [
                {
                    "id": ORDERS,
                    "name": "orders-db",
                    "proxies": [
                        {"id": UPGRADE, "name": "orders-proxy"},
                        {"id": AT_TARGET, "name": "orders-proxy-2", "current_version": TARGET},
                    ],
                },
                {
                    "id": BILLING,
                    "name": "billing-db",
                    "proxies": [
                        {"id": NO_UPGRADE, "name": "billing-proxy", "can_upgrade": False},
                        {"id": ABNORMAL, "name": "billing-proxy-2", "status": "ABNORMAL"},
                    ],
                },
            ],
            # 120 more instances, one proxy each: the instance list takes two pages of 100
            "generate": {
                "proxies": 120,
                "proxies_per_instance": 1,
                "at_target_rate": 0.1,
                "not_active_rate": 0.05,
                "no_upgrade_rate": 0.05,
            },
        },
    }


def test_discover_validate_run(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory(scenario())
    fleet = {p["proxy_id"]: p for p in sim.fleet()}
    out = tmp_path / "discovered.yaml"
    r = cli("discover", "--project-id", PROJECT, "--endpoint", sim.url, "--rate", "100/s", "-o", str(out))
    assert r.code == 0, str(r)
    log = sim.log()
    routes = Counter(rec["route"] for rec in log)
    assert routes["instances"] >= 2, routes  # paged: 122 instances, 100 a page
    assert routes["proxies"] == 122 and routes["upgrade"] == 0, routes
    assert gateway_worst([rec["received_at"] for rec in log], 1.0) <= 100  # the rate it was given

    text = out.read_text(encoding="utf-8")
    inv = yaml.safe_load(text)
    listed = {p["proxy_id"] for p in inv["proxies"]}
    assert inv["defaults"]["project_id"] == PROJECT and inv["defaults"]["target_version"] == TARGET
    skipped_lines = [ln for ln in text.splitlines() if re.match(r"#\s+instance ", ln)]
    skipped: dict[str, str] = {}
    for ln in skipped_lines:  # "#   instance NAME (ID) proxy NAME (ID): why"
        m = re.search(r" proxy .*?\(?([0-9a-f]{32}po\d\d)\)?: ", ln)
        assert m, ln
        skipped[m.group(1)] = ln
    assert listed | set(skipped) == set(fleet) and not listed & set(skipped)
    assert UPGRADE in listed
    assert "already at target 2.24.03.000" in skipped[AT_TARGET]
    assert "no upgrade available" in skipped[NO_UPGRADE]
    assert "not ACTIVE (status ABNORMAL)" in skipped[ABNORMAL]
    assert "orders-db (517ea793ab91438cbfcd9c4b1c958b1ein07)" in skipped[AT_TARGET]  # instance named too
    specs = {p.id: p for i in Scenario.load(sim.scenario_file).all_instances() for p in i.proxies}
    assert set(specs) == set(fleet)
    for proxy_id, spec in specs.items():  # every choice matches the scenario (the cloud's truth)
        if spec.status != "ACTIVE":
            assert "not ACTIVE" in skipped[proxy_id]
        elif fleet[proxy_id]["current_version"] == TARGET:
            assert "already at target" in skipped[proxy_id]
        elif spec.can_upgrade is False:
            assert "no upgrade available" in skipped[proxy_id]
        else:
            assert proxy_id in listed, spec
    reasons = Counter(ln.rsplit(": ", 1)[1].split(" (")[0] for ln in skipped.values())
    assert {"already at target 2.24.03.000", "no upgrade available", "not ACTIVE"} == set(reasons), reasons
    header = text.splitlines()[1]
    assert f"{len(listed)} to upgrade, {len(skipped)} skipped" in header
    assert f"wrote {out}: {len(listed)} proxies to upgrade, {len(skipped)} skipped" in r.out

    # only the instances whose name matches; stdout without -o
    g = cli("discover", "--project-id", PROJECT, "--endpoint", sim.url, "--name-glob", "orders-*")
    assert g.code == 0, str(g)
    assert [p["proxy_id"] for p in yaml.safe_load(g.out)["proxies"]] == [UPGRADE]
    assert "orders-proxy-2" in g.out and "billing" not in g.out

    v = cli("validate", str(out))
    assert v.code == 0, str(v)
    assert re.search(rf"proxies:\s+{len(listed)} on", v.out), v.out

    before = len(log)
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    run = cli("run", str(out), "--db", db, "--rate", "100/s", "--concurrency", "16", *FAST)
    assert run.code == 0, str(run)  # every proxy discovery chose was upgraded, nothing flagged
    upgrades = upgrades_per_proxy(sim.log()[before:])
    assert set(upgrades) == listed and max(upgrades.values()) == 1
    after = {p["proxy_id"]: p for p in sim.fleet()}
    assert all(after[p]["current_version"] == TARGET for p in listed)
    assert f"succeeded │ {len(listed):>7}" in run.out.replace("┃", "│"), run.out
