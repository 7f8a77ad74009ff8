"""Issue 15 part 4 through the real CLI against the real simulator: ``--metrics-port`` serves Prometheus
metrics during a run whose call counts, by route, equal the simulator's call log; ``--metrics-textfile``
writes the same at the end of a cron-style run (node_exporter's textfile collector reads it).

The scrape is a plain HTTP GET of ``127.0.0.1:PORT/metrics`` (what ``curl`` does). ``--metrics-port 0``
binds any free port and the run says which on stderr (``metrics: http://127.0.0.1:PORT/metrics``).
"""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Sim, cli, cli_bg, db_rows, make_inventory

SUBNET = "Upgrade failed due to insufficient subnet ip"
FAST = ["--poll-initial", "0.2", "--poll-interval", "0.2", "--reconcile-grace", "1", "--rate", "50/s"]
METRICS_URL = re.compile(r"metrics: (http://127\.0\.0\.1:\d+/metrics)")


def scenario(n: int) -> dict[str, Any]:
    return {
        "seed": 21,
        "speed": 100,
        "latency_s": 0.005,
        "workflow": {"pending_s": 20, "running_s": 60, "job_visible_after_s": 1, "fail_rate": 0},
        "fleet": {
            "instances": [
                {
                    "id": "517ea793ab91438cbfcd9c4b1c958b1ein07",
                    "proxies": [{"id": "0f46fc46396e4fb19a0cb52f578e9511po01", "reject": SUBNET}],
                }
            ],
            "generate": {"proxies": n - 1, "proxies_per_instance": 2, "multi_node_rate": 0.3},
        },
    }


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Samples by name, then by their sorted labels."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def calls_by_route(samples: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> Counter[str]:
    by: Counter[str] = Counter()
    for labels, value in samples.get("orchestrator_calls_total", {}).items():
        by[dict(labels)["route"]] += int(value)
    return by


def sim_by_route(sim: Sim) -> Counter[str]:
    return Counter(rec["route"] for rec in sim.log() if rec["route"] != "token")


def jobs_gauge(samples: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> dict[str, int]:
    return {dict(k)["status"]: int(v) for k, v in samples["orchestrator_jobs"].items() if v}


def table_counts(db: str) -> dict[str, int]:
    return {s: int(n) for s, n in db_rows(db, "SELECT status, count(*) FROM jobs GROUP BY status")}


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return str(r.read().decode())


def check_families(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], calls: Counter[str]) -> None:
    """Latency observed once per call, by route; one limiter wait per call; no throttling here."""
    latency = {
        dict(k)["route"]: int(v) for k, v in samples["orchestrator_call_latency_seconds_count"].items()
    }
    assert latency == dict(calls)
    assert samples["orchestrator_limiter_wait_seconds_count"][()] == sum(calls.values())
    assert samples["orchestrator_throttles_total"][()] == 0


def test_metrics_during_a_run_equal_the_simulator_log(sim_factory: Any, tmp_path: Path, db_url: str) -> None:
    sim = sim_factory(scenario(8))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    db = db_url
    prom = tmp_path / "run.prom"
    log = tmp_path / "run.log"
    # two waves an hour apart: after wave 1 the run waits, alive and idle, with its metrics up
    waves = ["--waves", "3,100%", "--pause-between", "1h"]
    metrics = ["--metrics-port", "0", "--metrics-textfile", str(prom)]
    proc = cli_bg("run", str(inv), "--db", db, "--endpoint", sim.url, *FAST, *waves, *metrics, stdout=log)
    try:
        deadline = time.monotonic() + 60
        url = None
        while url is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            m = METRICS_URL.search(log.read_text())
            url = m.group(1) if m else None
            time.sleep(0.1)
        seen: list[Counter[str]] = []
        while True:
            samples = parse(scrape(url))
            seen.append(calls_by_route(samples))
            done = sum(n for s, n in jobs_gauge(samples).items() if s in ("succeeded", "flagged"))
            if done == 3 and seen[-1] == sim_by_route(sim):
                break
            assert proc.poll() is None and time.monotonic() < deadline, (seen[-1], sim_by_route(sim))
            time.sleep(0.2)
        assert len(seen) >= 2 and sum(seen[0].values()) <= sum(seen[-1].values())
        assert set(seen[-1]) == {"proxy_version", "upgrade", "job"}
        check_families(samples, seen[-1])
        assert jobs_gauge(samples) == table_counts(db) == {"succeeded": 2, "flagged": 1, "pending": 5}
        assert proc.poll() is None  # still running: the scrape was of a live run
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 3, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    final = parse(prom.read_text())
    assert calls_by_route(final) == sim_by_route(sim) == seen[-1]
    assert jobs_gauge(final) == table_counts(db)


def test_textfile_of_a_cron_run_equals_the_simulator_log(
    sim_factory: Any, tmp_path: Path, db_url: str
) -> None:
    sim = sim_factory(scenario(10))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    db = db_url
    prom = tmp_path / "textfile" / "orchestrator.prom"
    prom.parent.mkdir()
    r = cli("run", str(inv), "--db", db, "--endpoint", sim.url, *FAST, "--metrics-textfile", str(prom))
    assert r.code == 1, str(r)  # the rejected proxy is flagged
    samples = parse(prom.read_text())
    calls = calls_by_route(samples)
    assert calls == sim_by_route(sim) and set(calls) == {"proxy_version", "upgrade", "job"}
    check_families(samples, calls)
    upgrades = {dict(k)["outcome"]: int(v) for k, v in samples["orchestrator_calls_total"].items()
                if dict(k)["route"] == "upgrade"}  # fmt: skip
    assert upgrades == {"accepted": 9, "rejected": 1}
    assert jobs_gauge(samples) == table_counts(db) == {"succeeded": 9, "flagged": 1}
    assert [p.name for p in prom.parent.iterdir()] == [
        "orchestrator.prom"
    ]  # written atomically, no leftovers


def test_metrics_textfile_must_be_prom(tmp_path: Path) -> None:
    """node_exporter reads only *.prom: refused before the run starts (nothing written)."""
    inv = Path(__file__).parent.parent.parent / "inventories" / "example.yaml"
    r = cli("run", str(inv), "--db", str(tmp_path / "x.db"), "--metrics-textfile", str(tmp_path / "m.txt"))
    assert r.code == 2, str(r)
    assert ".prom" in r.err
    assert not (tmp_path / "x.db").exists()
