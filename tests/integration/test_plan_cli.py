"""Issue 15 part 8: ``plan``'s estimate uses the rate, concurrency and per-instance limit given and the
upgrade duration the cloud (here the simulator) reports, and says how the fleet fits a window."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Sim, cli, make_inventory, start_sim

INSTANCE = "517ea793ab91438cbfcd9c4b1c958b1ein07"
OTHER = "617ea793ab91438cbfcd9c4b1c958b1ein07"
WINDOW = "2030-01-05T01:00Z/PT5M"  # a future occurrence: 300 s usable (no cutoff)


def scenario() -> dict[str, Any]:
    # the simulator reports its workflows' length (pending + running, real seconds) as upgrade_duration:
    # 120 s here ("about 2 minutes"), not the 300 s plan assumes when the cloud says nothing
    return {
        "seed": 5,
        "speed": 1,
        "latency_s": 0.002,
        "workflow": {"pending_s": 20, "running_s": 100},
        "fleet": {
            "instances": [
                {
                    "id": INSTANCE,
                    "proxies": [{"id": f"0f46fc46396e4fb19a0cb52f578e9511po0{i}"} for i in range(1, 5)],
                },
                {
                    "id": OTHER,
                    "proxies": [
                        {"id": "1f46fc46396e4fb19a0cb52f578e9511po01", "current_version": "2.24.03.000"},
                        {"id": "1f46fc46396e4fb19a0cb52f578e9511po02", "current_version": "2.23.06.000"},
                    ],
                },
            ]
        },
    }


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sim, Path]]:
    tmp = tmp_path_factory.mktemp("plan")
    sim = start_sim(tmp, scenario())
    try:
        yield sim, make_inventory(sim, tmp / "fleet.yaml")
    finally:
        sim.stop()


@pytest.mark.parametrize(
    ("args", "seconds"),
    [
        (["--per-instance", "1"], 480),  # one at a time on the one instance: 4 x 120 s
        (["--per-instance", "2", "--rate", "1/s"], 241),  # two at a time, the second a second later
        (["--per-instance", "4", "--concurrency", "1"], 480),  # the concurrency cap serialises them
        (["--per-instance", "4", "--rate", "30/min"], 126),  # starts 2 s apart: the last at 6 s
    ],
    ids=["per-instance-1", "per-instance-2", "concurrency-1", "rate-30-per-min"],
)
def test_plan_estimate_follows_the_options_and_the_cloud(
    fleet: tuple[Sim, Path], args: list[str], seconds: int
) -> None:
    sim, inv = fleet
    calls_before = len(sim.log())
    base = ["plan", str(inv), "--endpoint", sim.url, *args]
    r = cli(*base, "--format", "json")
    assert r.code == 0, str(r)
    plan = json.loads(r.out)
    summary = plan["summary"]
    assert (summary["upgrade"], summary["skip"], summary["flag"], summary["unreachable"]) == (4, 1, 1, 0)
    assert {p["upgrade_duration_s"] for p in plan["proxies"] if p["verdict"] == "upgrade"} == {120.0}
    assert summary["estimated_duration_s"] == pytest.approx(seconds, abs=0.5)
    assert summary["window"] is None
    assert [rec["route"] for rec in sim.log()[calls_before:]] == ["proxy_version"] * 6  # one read a proxy

    w = cli(*base, "--window", WINDOW)
    assert w.code == 0, str(w)
    text = " ".join(w.out.split())
    assert f"estimated duration: {math.ceil(seconds / 60)} min" in text, text
    if seconds <= 300:
        assert f"window {WINDOW}: fits the window" in text, text
    else:
        assert f"window {WINDOW}: does NOT fit one window" in text and "about 2 windows" in text, text
