"""Issue 2 acceptance: the real CLI against the real simulator on 127.0.0.1, on a real job table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Sim, cli, db_rows, make_inventory, start_sim
from tests.simlog import gateway_worst, max_in_window, upgrades_per_proxy

SUBNET = "Upgrade failed due to insufficient subnet ip"
MIXED = "0f46fc46396e4fb19a0cb52f578e9511po01"
REJECTING = "1f46fc46396e4fb19a0cb52f578e9511po01"

FAST = ["--poll-initial", "0.2", "--poll-interval", "0.2", "--reconcile-grace", "1", "--seed", "1"]


def scenario(n: int, **extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "seed": 11,
        "speed": 100,
        "latency_s": 0.01,
        "workflow": {"pending_s": 2, "running_s": 5, "job_visible_after_s": 1},
        "fleet": {
            "instances": [
                {
                    "id": "517ea793ab91438cbfcd9c4b1c958b1ein07",
                    "proxies": [
                        {"id": MIXED, "nodes": 2, "reject": SUBNET, "reject_nodes": [1]},
                    ],
                },
                {
                    "id": "617ea793ab91438cbfcd9c4b1c958b1ein07",
                    "proxies": [{"id": REJECTING, "reject": SUBNET}],
                },
            ],
            "generate": {"proxies": n, "proxies_per_instance": 2, "reject_rate": 0.1, "multi_node_rate": 0.2},
        },
    }
    base.update(extra)
    return base


def test_every_proxy_once_every_workflow_recorded(sim_factory, tmp_path: Path, db_url: str) -> None:
    sim = sim_factory(scenario(60))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    r = cli(
        "run", str(inv), "--db", db_url, "--endpoint", sim.url, "--rate", "100/s", "--concurrency", "8", *FAST
    )
    assert r.code == 1, str(r)  # finished, with flagged jobs
    assert "flagged" in r.out

    log = sim.log()
    upgrades = upgrades_per_proxy(log)
    fleet = sim.fleet()
    assert len(fleet) == 62
    assert set(upgrades) == {p["proxy_id"] for p in fleet}
    assert max(upgrades.values()) == 1, upgrades.most_common(3)

    issued = {i["workflow_id"] for rec in log if rec["route"] == "upgrade" for i in rec.get("items") or []}
    recorded = {w for (w,) in db_rows(db_url, "SELECT workflow_id FROM workflows")}
    assert issued and issued <= recorded

    jobs = {p: (s, reason) for p, s, reason in db_rows(db_url, "SELECT proxy_id, status, reason FROM jobs")}
    rejecting = {p["proxy_id"] for p in fleet if p.get("reject")}
    assert REJECTING in rejecting and MIXED in rejecting
    for proxy in rejecting:
        status, reason = jobs[proxy]
        assert status == "flagged"
        assert "insufficient subnet ip" in reason.lower()
    for p in fleet:
        if not p.get("reject"):
            assert jobs[p["proxy_id"]][0] == "succeeded", (p, jobs[p["proxy_id"]])
            assert p["current_version"] == "2.24.03.000"

    states = sorted(
        s
        for (s,) in db_rows(
            db_url,
            f"SELECT w.state FROM workflows w JOIN jobs j ON j.id = w.job_id WHERE j.proxy_id = '{MIXED}'",
        )
    )
    assert states == ["ACCEPT", "REJECT"]
    attempts = db_rows(db_url, "SELECT count(*) FROM attempts")[0][0]
    assert attempts == sum(upgrades.values())

    # status/report/flagged read the same table
    st = cli("status", "1", "--db", db_url)
    assert st.code == 0 and "succeeded" in st.out, str(st)
    rep = cli("report", "1", "--db", db_url, "--format", "csv")
    assert rep.code == 0
    assert len(rep.out.strip().splitlines()) == 63  # header + one line per proxy
    fl = cli("flagged", "1", "--db", db_url)
    assert fl.code == 0 and REJECTING in fl.out and "hint:" in fl.out


def test_rate_and_concurrency_never_exceeded_at_the_simulator(sim_factory, tmp_path: Path) -> None:
    sim = sim_factory(scenario(80, latency_s=0.15))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    r = cli("run", str(inv), "--db", db, "--endpoint", sim.url, "--rate", "25/s", "--concurrency", "5", *FAST)
    assert r.code == 1, str(r)
    api = [rec["received_at"] for rec in sim.log() if rec["route"] != "token"]
    assert len(api) > 150
    # the limit is 25 starts in any sliding one-second window, as the simulator saw them arrive (less its
    # own stamping lag, see tests/simlog.py)
    worst = gateway_worst(api, 1.0)
    assert worst <= 25, worst
    busiest = max_in_window(api, 1.0)
    assert busiest >= 20, busiest  # the limiter is not starving the run either
    assert sim.stats()["max_concurrent"] <= 5


# unknown_region.yaml is only bad without an endpoint override (a region names no host then)
BAD = sorted(
    p
    for p in (Path(__file__).parent.parent / "unit" / "bad_inventories").iterdir()
    if p.name != "unknown_region.yaml"
)


@pytest.fixture(scope="module")
def idle_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    sim = start_sim(tmp_path_factory.mktemp("idle"), scenario(2))
    yield sim
    sim.stop()


@pytest.mark.parametrize("bad", BAD, ids=[p.name for p in BAD])
def test_malformed_inventory_one_line_exit_2_nothing_written(
    bad: Path, tmp_path: Path, idle_sim: Sim
) -> None:
    sim = idle_sim
    db = tmp_path / "jobs.db"
    r = cli("run", str(bad), "--db", str(db), "--endpoint", sim.url)
    assert r.code == 2, str(r)
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert lines, str(r)
    assert lines[0].startswith(f"error: {bad}"), lines[0]
    # file:line: where a line exists (undecodable or empty files name the file)
    assert all(ln.startswith("error: ") for ln in lines)
    assert sim.log() == []
    assert not db.exists() or db_rows(f"sqlite:///{db}", "SELECT count(*) FROM runs")[0][0] == 0


def test_bad_flags_are_one_line_usage_errors(tmp_path: Path) -> None:
    inv = Path(__file__).parent.parent.parent / "inventories" / "example.yaml"
    for args in (["--rate", "ten"], ["--concurrency", "0"], ["--rate", "10/fortnight"]):
        r = cli("run", str(inv), "--db", str(tmp_path / "x.db"), *args)
        assert r.code == 2, str(r)
        assert len(r.err.strip().splitlines()) == 1, r.err
        assert not (tmp_path / "x.db").exists()
