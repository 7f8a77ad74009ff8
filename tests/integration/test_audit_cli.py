"""Issue 15 parts 1, 7 and 8 through the real CLI against the real simulator, on SQLite and PostgreSQL:
``history`` across two runs, ``runs``/``status`` filters, the event log behind ``retry`` and every state
change, and ``flagged``/``retry --rule`` by group.

The story (one scenario, one inventory):

- run 1 "first-window": three proxies of instance ORDERS are REJECTed once for subnet IPs (flagged, one
  group), a fourth on another instance runs an older version than the inventory says (flagged by the
  preflight, another group), the rest succeed;
- ``retry 1 --rule default:reject-subnet-ip`` re-queues that group only; ``resume 1`` upgrades it (the
  scripted rejection was for the first call only);
- run 2 (a long name) on the same inventory: everything upgraded is skipped at the target, the old one is
  flagged again.
"""

from __future__ import annotations

import getpass
import itertools
import json
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.conftest import Result, cli, db_rows, make_inventory

SUBNET = "Upgrade failed due to insufficient subnet ip"
ORDERS = "517ea793ab91438cbfcd9c4b1c958b1ein07"
BILLING = "617ea793ab91438cbfcd9c4b1c958b1ein07"
P1 = "0f46fc46396e4fb19a0cb52f578e9511po01"  # rejected once, then upgraded: the proxy whose history we read
P2 = "0f46fc46396e4fb19a0cb52f578e9511po02"
P3 = "0f46fc46396e4fb19a0cb52f578e9511po03"
OK = "1f46fc46396e4fb19a0cb52f578e9511po01"
OLD = "1f46fc46396e4fb19a0cb52f578e9511po02"  # on 2.23.06.000 while the inventory says 2.23.12.000
SOURCE, TARGET = "2.23.12.000", "2.24.03.000"
REJECT_RULE = "default:reject-subnet-ip"
FAST = ["--poll-initial", "0.2", "--poll-interval", "0.2", "--reconcile-grace", "1", "--rate", "50/s"]
LONG_NAME = "second-window-2026-12-01-orders-and-billing-fleet-after-the-subnet-fix"


def scenario() -> dict[str, Any]:
    rejected_once = {"script": [{"reject": SUBNET}]}
    return {
        "seed": 3,
        "speed": 100,
        "latency_s": 0.005,
        "workflow": {"pending_s": 20, "running_s": 50, "job_visible_after_s": 1, "fail_rate": 0},
        "fleet": {
            "instances": [
                {
                    "id": ORDERS,
                    "name": "orders-db",
                    "proxies": [
                        {"id": P1, "name": "orders-proxy-1", **rejected_once},
                        {"id": P2, "name": "orders-proxy-2", **rejected_once},
                        {"id": P3, "name": "orders-proxy-3", **rejected_once},
                    ],
                },
                {
                    "id": BILLING,
                    "name": "billing-db",
                    "proxies": [
                        {"id": OK, "name": "billing-proxy-1"},
                        {"id": OLD, "name": "billing-proxy-2", "current_version": "2.23.06.000"},
                    ],
                },
            ],
        },
    }


def ok(r: Result, code: int = 0) -> Result:
    assert r.code == code, str(r)
    return r


def as_json(r: Result) -> Any:
    ok(r)
    return json.loads(r.out)


def test_history_runs_events_and_flagged_groups(sim_factory: Any, tmp_path: Path, db_url: str) -> None:
    sim = sim_factory(scenario())
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    db = ["--db", db_url]
    t0 = datetime.now(UTC)

    # ------------------------------------------------------------------ run 1, flagged in two groups
    ok(cli("run", str(inv), *db, "--endpoint", sim.url, "--name", "first-window", *FAST), 1)
    groups = as_json(cli("flagged", "1", *db, "--format", "json"))
    by_rule = {g["rule"]: g for g in groups}
    assert len(by_rule) == 2, groups
    subnet = by_rule[REJECT_RULE]
    assert subnet["count"] == 3 and subnet["status"] == "flagged"
    assert sorted(p["proxy_id"] for p in subnet["proxies"]) == [P1, P2, P3]
    assert all(SUBNET.lower() in p["reason"].lower() for p in subnet["proxies"])
    (preflight_rule,) = set(by_rule) - {REJECT_RULE}
    assert [p["proxy_id"] for p in by_rule[preflight_rule]["proxies"]] == [OLD]
    table = ok(cli("flagged", "1", *db)).out
    assert table.count("hint:") == 2, table  # one hint per group, not one per proxy
    assert f"3 flagged by rule {REJECT_RULE}" in table
    assert f"orchestrator retry 1 --rule {REJECT_RULE}" in table
    only = as_json(cli("flagged", "1", *db, "--rule", REJECT_RULE, "--format", "json"))
    assert [g["rule"] for g in only] == [REJECT_RULE]

    # ------------------------------------------------------------------ retry one group, resume
    r = ok(cli("retry", "1", *db, "--rule", REJECT_RULE))
    assert "re-queued 3 jobs" in r.out, str(r)
    statuses = dict(db_rows(db_url, "SELECT proxy_id, status FROM jobs WHERE run_id = 1"))
    assert statuses == {P1: "pending", P2: "pending", P3: "pending", OK: "succeeded", OLD: "flagged"}
    t_retry = datetime.now(UTC)
    ok(cli("resume", "1", *db, "--endpoint", sim.url, *FAST), 1)  # OLD is still flagged
    statuses = dict(db_rows(db_url, "SELECT proxy_id, status FROM jobs WHERE run_id = 1"))
    assert statuses == {P1: "succeeded", P2: "succeeded", P3: "succeeded", OK: "succeeded", OLD: "flagged"}

    # ------------------------------------------------------------------ run 2
    between = datetime.now(UTC)
    ok(cli("run", str(inv), *db, "--endpoint", sim.url, "--name", LONG_NAME, *FAST), 1)
    t_end = datetime.now(UTC)

    # ------------------------------------------------------------------ the event log
    user, host = getpass.getuser(), socket.gethostname()
    rows = db_rows(
        db_url,
        "SELECT e.run_id, j.proxy_id, e.kind, e.from_status, e.to_status, e.os_user, e.host, e.at, j.status"
        " FROM events e JOIN jobs j ON j.id = e.job_id ORDER BY e.id",
    )
    assert rows
    for *_, os_user, ev_host, at, _status in rows:
        assert (os_user, ev_host) == (user, host)
        at = at if isinstance(at, datetime) else datetime.fromisoformat(str(at))
        assert t0 <= (at if at.tzinfo else at.replace(tzinfo=UTC)) <= t_end
    chains: dict[tuple[int, str], list[tuple[str, str | None, str]]] = {}
    final: dict[tuple[int, str], str] = {}
    for run_id, proxy, kind, frm, to, *_, status in rows:
        chains.setdefault((run_id, proxy), []).append((kind, frm, to))
        final[(run_id, proxy)] = status
    assert set(chains) == set(final) and len(chains) == 10  # every job of both runs moved at least once
    for key, chain in chains.items():
        # every state change is there: each move starts where the previous one ended, the last one is
        # where the job is now
        assert chain[0][1] == "pending", (key, chain)
        for (_, _, to), (_, frm, _) in itertools.pairwise(chain):
            assert frm == to, (key, chain)
        assert chain[-1][2] == final[key], (key, chain)
    assert chains[(1, P1)] == [
        ("move", "pending", "in_flight"),
        ("move", "in_flight", "flagged"),
        ("retry", "flagged", "pending"),
        ("move", "pending", "in_flight"),
        ("move", "in_flight", "accepted"),
        ("move", "accepted", "succeeded"),
    ]
    retries = [(run, p) for (run, p), chain in chains.items() for k, *_ in chain if k == "retry"]
    assert sorted(retries) == [(1, P1), (1, P2), (1, P3)]
    run_events = db_rows(
        db_url,
        "SELECT from_status, to_status, os_user, host FROM events WHERE run_id = 1 AND job_id IS NULL"
        " AND kind = 'run' ORDER BY id",
    )
    assert all(u == user and h == host for *_, u, h in run_events)
    for (_, to, *_), (frm, *_) in itertools.pairwise(run_events):
        assert frm == to, run_events  # the run's own moves chain too (retry re-opens a finished run)

    # ------------------------------------------------------------------ history of one proxy
    hist = as_json(cli("history", *db, "--proxy", P1, "--format", "json", "--tz", "Asia/Shanghai"))
    assert [e["at"] for e in hist] == sorted(e["at"] for e in hist)  # oldest first
    assert all(e["at"].endswith("+08:00") for e in hist)
    assert {e["run_name"] for e in hist} == {"first-window", LONG_NAME}
    mine = [e for e in hist if e["proxy_id"] == P1]
    assert all(e["version_before"] == SOURCE and e["version_after"] == TARGET for e in mine)
    moves = [(e["run_id"], e["state"]) for e in mine if e["kind"] == "event" and e["ref"] == "move"]
    assert moves == [
        (1, "in_flight"),
        (1, "flagged"),
        (1, "in_flight"),
        (1, "accepted"),
        (1, "succeeded"),
        (2, "skipped"),
    ]
    flag = next(e for e in mine if e["state"] == "flagged")
    assert SUBNET.lower() in flag["reason"].lower() and flag["rule"] == REJECT_RULE
    retry = next(e for e in mine if e["ref"] == "retry")
    assert retry["who"].startswith(f"{user}@{host} (pid ") and retry["detail"] == "flagged -> pending"
    assert t0 <= datetime.fromisoformat(retry["at"]) <= t_retry
    calls = [(e["run_id"], e["ref"], e["state"]) for e in mine if e["kind"] == "call"]
    assert calls == [(1, "#1", "flag"), (1, "#2", "accepted")]
    workflows = [(e["state"], e["detail"]) for e in mine if e["kind"] == "workflow"]
    assert [w[0] for w in workflows] == ["REJECT", "ACCEPT"] and workflows[1][1] == "Completed"
    issued = {
        i["workflow_id"]
        for rec in sim.log()
        if rec["route"] == "upgrade" and rec.get("proxy_id") == P1
        for i in rec.get("items") or []
    }
    assert {e["ref"] for e in mine if e["kind"] == "workflow"} == issued

    text = ok(cli("history", *db, "--proxy", P1, env={"TZ": "Asia/Shanghai"})).out  # TZ as --tz
    assert "at (Asia/Shanghai)" in text and "first-window" in text
    assert text.index("in_flight -> flagged") < text.index("accepted -> succeeded") < text.index("skipped")
    csv_lines = ok(cli("history", *db, "--proxy", P1, "--format", "csv")).out.strip().splitlines()
    assert csv_lines[0].startswith("at,kind,run_id,run_name") and len(csv_lines) == len(hist) + 1
    assert all(P1 in line for line in csv_lines[1:] if ",move," in line or ",call," in line)

    instance = as_json(cli("history", *db, "--instance", ORDERS, "--format", "json"))
    assert {e["proxy_id"] for e in instance if e["proxy_id"]} == {P1, P2, P3}
    since = as_json(cli("history", *db, "--proxy", P1, "--since", between.isoformat(), "--format", "json"))
    assert since and {e["run_id"] for e in since} == {2}
    assert "no history" in ok(cli("history", *db, "--proxy", "0" * 32 + "po01")).out

    # ------------------------------------------------------------------ runs and status filters
    runs = as_json(cli("runs", *db, "--format", "json"))
    assert [(r["id"], r["name"], r["status"]) for r in runs] == [
        (2, LONG_NAME, "finished"),
        (1, "first-window", "finished"),
    ]
    later = as_json(
        cli("runs", *db, "--since", between.isoformat(), "--format", "json", env={"TZ": "Asia/Shanghai"})
    )
    assert [r["id"] for r in later] == [2] and later[0]["created_at"].endswith("+08:00")
    assert as_json(cli("runs", *db, "--status", "stopped", "--format", "json")) == []
    assert "no runs matching" in ok(cli("runs", *db, "--status", "halted")).out
    narrow = {"COLUMNS": "80"}
    listed = ok(cli("status", *db, "--since", between.isoformat(), env=narrow)).out
    assert LONG_NAME in listed and "first-window" not in listed, listed  # whole, on an 80-column console
    assert "finished" in listed and "(times in UTC)" in listed
    all_runs = ok(cli("status", *db, "--status", "finished", env=narrow)).out
    assert LONG_NAME in all_runs and "first-window" in all_runs, all_runs
    one = ok(cli("status", LONG_NAME, *db, env=narrow)).out  # the name shown is a valid RUN argument
    assert f"run 2 ({LONG_NAME})" in one.replace("\n", ""), one
