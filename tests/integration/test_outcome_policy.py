"""Issue acceptance: the outcome policy. Every answer is classified, what is transient is retried, what
needs an operator is flagged with a reason and a hint, and an answer that was lost is reconciled before
anything is resent.

The real CLI runs as a subprocess against the real simulator process on 127.0.0.1; the simulator's call
log and fleet are the truth the job table is checked against.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Sim, cli, cli_bg, db_rows, make_inventory

SUBNET = "Upgrade failed due to insufficient subnet ip"
TARGET = "2.24.03.000"
TERMINAL = {"succeeded", "skipped", "flagged", "failed"}
LOST = {"reset", "hang"}  # http_status of a call whose answer never arrived

# Fast hidden knobs: workflows are followed every 0.2 s, a lost answer is looked for after 1 s.
FAST = ["--poll-initial", "0.2", "--poll-interval", "0.2", "--reconcile-grace", "1", "--seed", "7"]
# Short backoff so a chaos run's tail of retries stays within seconds (the rules stay the defaults).
QUICK_POLICY = {"backoff": {"initial": 0.1, "max": 1.0, "multiplier": 2.0, "max_attempts": 12}}


# ------------------------------------------------------------------------------------------ helpers
def write_policy(tmp: Path) -> Path:
    path = tmp / "policy.yaml"
    path.write_text(yaml.safe_dump({"policy": QUICK_POLICY}), encoding="utf-8")
    return path


def upgrades(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((r for r in log if r["route"] == "upgrade"), key=lambda r: r["seq"])


def by_proxy(log: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in upgrades(log):
        out[rec["proxy_id"]].append(rec)
    return out


def resent_after_applied(log: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Proxies that got another upgrade call after one whose effect was applied: {proxy: [seq, ...]}."""
    bad: dict[str, list[int]] = {}
    for proxy, calls in by_proxy(log).items():
        first = next((i for i, c in enumerate(calls) if c["effect"] == "applied"), None)
        if first is not None and first + 1 < len(calls):
            bad[proxy] = [c["seq"] for c in calls]
    return bad


def created_workflows(log: list[dict[str, Any]]) -> set[str]:
    return {w for rec in upgrades(log) for w in rec.get("workflows") or []}


def jobs_of(db: str) -> dict[str, dict[str, Any]]:
    rows = db_rows(db, "SELECT proxy_id, status, reason, hint, rule, attempt_count FROM jobs")
    return {
        p: {"status": s, "reason": r, "hint": h, "rule": rule, "attempts": n} for p, s, r, h, rule, n in rows
    }


def workflows_of(db: str) -> dict[str, str]:
    """workflow_id -> source ('answer' | 'reconciled')."""
    return {w: s for w, s in db_rows(db, "SELECT workflow_id, source FROM workflows") if w}


def max_in_window(times: list[float], start: float = float("-inf"), end: float = float("inf"),
                  width: float = 1.0) -> int:
    """The most calls that arrived in any sliding window of ``width`` seconds inside [start, end)."""
    ts = sorted(t for t in times if start <= t < end)
    worst = j = 0
    for i, t in enumerate(ts):
        while ts[j] <= t - width:
            j += 1
        worst = max(worst, i - j + 1)
    return worst


def report_json(run: str, db: str) -> list[dict[str, Any]]:
    r = cli("report", run, "--db", db, "--format", "json")
    assert r.code == 0, str(r)
    return list(json.loads(r.out))


def wait_until(pred: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------- chaos
CHAOS_FAULTS: dict[str, Any] = {
    "routes": ["upgrade"],
    "http_500": 0.05,
    "http_503": 0.05,  # 10% 5xx
    "http_429": 0.05,
    "busy_409": 0.05,
    "timeout": 0.02,  # 3% timeouts: two thirds before the upgrade took effect ...
    "timeout_after": 0.01,  # ... one third after
    "reset_before": 0.01,  # 2% resets, half after the upgrade took effect
    "reset_after": 0.01,
    "malformed_before": 0.005,  # 1% garbled bodies, half after
    "malformed_after": 0.005,
    "hang_s": 1.5,  # a hung call outlives the orchestrator's --timeout 1
    "retry_after_s": None,
}


def chaos_scenario(n: int) -> dict[str, Any]:
    return {
        "seed": 2024,
        "speed": 200,
        "latency_s": 0.005,
        "workflow": {"pending_s": 2, "running_s": 6, "job_visible_after_s": 1},
        "faults": CHAOS_FAULTS,
        "fleet": {
            "generate": {
                "proxies": n,
                "proxies_per_instance": 2,
                "reject_rate": 0.04,
                "multi_node_rate": 0.15,
                "mixed_rate": 0.5,
                "at_target_rate": 0.02,
            }
        },
    }


def test_chaos_every_job_ends_classified_and_nothing_is_upgraded_twice(
    sim_factory: Any, tmp_path: Path, db_url: str
) -> None:
    n = 520
    sim: Sim = sim_factory(chaos_scenario(n))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    started = time.monotonic()
    r = cli("run", str(inv), "--db", db_url, "--endpoint", sim.url, "--rate", "200/s", "--concurrency", "24",
            "--timeout", "1", "--policy", str(write_policy(tmp_path)), *FAST, timeout=240)
    took = time.monotonic() - started
    assert r.code == 1, str(r)  # finished, with flagged jobs (the rejecting proxies)

    log = sim.log()
    fleet = {p["proxy_id"]: p for p in sim.fleet()}
    jobs = jobs_of(db_url)
    assert len(fleet) == len(jobs) == n
    stats = sim.stats()
    print(f"chaos run took {took:.1f}s; faults {stats['faults']}; calls {stats['calls']}")
    assert stats["faults"].keys() >= {k for k, v in CHAOS_FAULTS.items() if isinstance(v, float) and v > 0}

    # every job ends terminal (flagged included); nothing is left pending/unknown/in flight
    status = Counter(j["status"] for j in jobs.values())
    assert set(status) <= TERMINAL, status

    # no proxy receives a second upgrade once one took effect
    assert resent_after_applied(log) == {}

    # every workflow the cloud created is in the job table; lost answers' workflows were reconciled
    created = created_workflows(log)
    recorded = workflows_of(db_url)
    assert created and created <= set(recorded), sorted(created - set(recorded))[:5]
    lost = [rec for rec in upgrades(log) if rec["effect"] == "applied" and (
        rec["http_status"] in LOST or rec["fault"] == "malformed_after")]
    assert lost, "the seed should lose some applied answers"
    for rec in lost:
        for w in rec["workflows"]:
            assert recorded[w] == "reconciled", (rec, recorded[w])

    # the fleet agrees: each proxy that could be upgraded was upgraded, the rejecting ones were flagged
    for pid, p in fleet.items():
        job = jobs[pid]
        if p["reject"]:
            assert job["status"] == "flagged", (pid, job)
        elif p["accepted_calls"] or p["current_version"] == TARGET and job["status"] != "skipped":
            assert job["status"] == "succeeded", (pid, job, p)
            assert p["current_version"] == TARGET
        if job["status"] == "skipped":
            assert p["upgrade_calls"] == 0

    # the report explains every non-success: a reason for flagged/failed, a hint for flagged
    rows = report_json("1", db_url)
    assert len(rows) == n
    for row in rows:
        if row["status"] in ("flagged", "failed"):
            assert row["reason"], row
            assert row["rule"], row
        if row["status"] == "flagged":
            assert row["hint"], row
