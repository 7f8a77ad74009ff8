"""Shared pieces of the issue 10 acceptance tests (``tests/integration/test_issue10_*.py``): small
explicit fleets for the simulator, a hostile gateway process in front of it, and readers of the job
table and of the simulator's call log.

Every test runs the real CLI as a subprocess against the real simulator process on 127.0.0.1; where a
kind involves answers no honest cloud gives, ``python -m tests.hostile`` sits in front of the simulator
and rewrites them (the simulator still applies the upgrade: its log says ``effect: applied``).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import PY, ROOT, Result, Sim, clean_env, cli, db_rows, make_inventory, terminate

CURRENT = "2.23.12.000"
TARGET = "2.24.03.000"
SUBNET = "Upgrade failed due to insufficient subnet ip"
PROJECT = "054e292c9880d4992f02c0196d3ea468"
INSTANCE = "517ea793ab91438cbfcd9c4b1c958b1ein07"
PROXY = "0f46fc46396e4fb19a0cb52f578e9511po01"
TERMINAL = frozenset({"succeeded", "skipped", "flagged", "failed"})


def fast(lease: float = 3, heartbeat: float = 0.5) -> list[str]:
    """The hidden test flags: fast polls, a short reconcile grace, a short lease, and a 5 s call timeout
    (reconcile concludes "nothing started" only after the call's timeout: 30 s by default)."""
    return [
        "--poll-initial", "0.2", "--poll-interval", "0.2", "--reconcile-grace", "1", "--timeout", "5",
        "--lease", str(lease), "--heartbeat", str(heartbeat), "--drain-timeout", "10", "--seed", "1",
    ]  # fmt: skip


def proxy_id(n: int) -> str:
    """A contract-shaped proxy id (32 hex + po01), distinct per ``n``."""
    return f"{n:032x}po01"


def instance_id(n: int) -> str:
    return f"{n:032x}in07"


def scenario(
    proxies: Iterable[dict[str, Any]] | None = None,
    *,
    instance: str = INSTANCE,
    running_s: float = 2,
    speed: float = 20,
    **extra: Any,
) -> dict[str, Any]:
    """A fleet of explicit proxies on one instance (default: the one proxy ``PROXY``), source
    ``CURRENT``, latest ``TARGET``; workflows take ``running_s`` scenario seconds at ``speed``, and every
    one completes unless a proxy says otherwise."""
    specs = list(proxies) if proxies is not None else [{"id": PROXY}]
    base: dict[str, Any] = {
        "seed": 5,
        "speed": speed,
        "latency_s": 0.01,
        "project_id": PROJECT,
        "current_version": CURRENT,
        "latest_version": TARGET,
        "workflow": {"pending_s": 1, "running_s": running_s, "job_visible_after_s": 1, "fail_rate": 0},
        "fleet": {"instances": [{"id": instance, "proxies": [{"workflow": "complete", **p} for p in specs]}]},
    }
    base.update(extra)
    return base


def inventory(sim: Sim, path: Path, *, source_version: bool = True) -> Path:
    """The simulator's own inventory export; without ``source_version`` the defaults leave it out (allowed:
    preflight reads it)."""
    make_inventory(sim, path)
    if not source_version:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data["defaults"].pop("source_version", None)
        for p in data["proxies"]:
            p.pop("source_version", None)
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ the hostile gateway
@dataclass
class Hostile:
    """``python -m tests.hostile`` in front of a simulator (see tests/hostile.py)."""

    url: str
    proc: subprocess.Popen[bytes]

    def log(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.url + "/_hostile/log", timeout=30) as r:
            return list(json.loads(r.read()))

    def set_rules(self, rules: list[dict[str, Any]]) -> None:
        req = urllib.request.Request(
            self.url + "/_hostile/rules",
            data=json.dumps(rules).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()

    def stop(self) -> None:
        terminate(self.proc)


def start_hostile(tmp: Path, upstream: str, rules: list[dict[str, Any]], name: str = "hostile") -> Hostile:
    ready = tmp / f"{name}.ready"
    out = tmp / f"{name}.out"
    with open(out, "wb") as fh:
        proc = subprocess.Popen(
            [PY, "-m", "tests.hostile", "--upstream", upstream, "--rules", json.dumps(rules), "--ready-file",
             str(ready)],
            cwd=ROOT,
            env=clean_env(),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"hostile gateway did not start: {out.read_text()}")
        time.sleep(0.05)
    return Hostile(ready.read_text().strip(), proc)


# ------------------------------------------------------------------------------------- job table
def jobs(db: str, run_id: int = 1) -> dict[str, dict[str, Any]]:
    """proxy_id -> the job's columns a test judges."""
    rows = db_rows(
        db,
        "SELECT proxy_id, status, reason, hint, rule, attempt_count, source_version, current_version "
        f"FROM jobs WHERE run_id = {run_id}",
    )
    keys = ("status", "reason", "hint", "rule", "attempts", "source_version", "current_version")
    return {r[0]: dict(zip(keys, r[1:], strict=True)) for r in rows}


def workflows(db: str, proxy: str, run_id: int = 1) -> list[dict[str, Any]]:
    rows = db_rows(
        db,
        "SELECT w.workflow_id, w.state, w.source, w.job_status FROM workflows w "
        f"JOIN jobs j ON j.id = w.job_id WHERE j.proxy_id = '{proxy}' AND j.run_id = {run_id} ORDER BY w.id",
    )
    return [dict(zip(("workflow_id", "state", "source", "job_status"), r, strict=True)) for r in rows]


def attempts(db: str, proxy: str, run_id: int = 1) -> list[dict[str, Any]]:
    rows = db_rows(
        db,
        "SELECT a.number, a.outcome, a.rule, a.http_status, a.error_code FROM attempts a "
        f"JOIN jobs j ON j.id = a.job_id WHERE j.proxy_id = '{proxy}' AND j.run_id = {run_id} "
        "ORDER BY a.number",
    )
    return [
        dict(zip(("number", "outcome", "rule", "http_status", "error_code"), r, strict=True)) for r in rows
    ]


def created_by_proxy(sim: Sim) -> dict[str, set[str]]:
    """proxy_id -> the workflow ids the simulator created for it (accepted nodes only)."""
    out: dict[str, set[str]] = {}
    for r in sim.log():
        if r["route"] == "upgrade":
            out.setdefault(r["proxy_id"], set()).update(r.get("workflows") or [])
    return out


def run_cli(
    inv: Path, db: str, endpoint: str, *extra: str, env: dict[str, str] | None = None, timeout: float = 180
) -> Result:
    return cli("run", str(inv), "--db", db, "--endpoint", endpoint, "--rate", "50/s", *fast(), *extra,
               env=env, timeout=timeout)  # fmt: skip
