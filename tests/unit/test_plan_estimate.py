"""How long ``orchestrator plan`` says the upgrades take (``orchestrator.app.plan``): the free-text
``upgrade_duration`` read, the pure makespan ``estimate`` and the plan's summary. No network.

Since the new core the estimate schedules the upgrades as the engine claims them: starts spaced by the
rate, at most ``concurrency`` under way, at most ``per_instance`` proxies of an instance at once, each
taking its ``upgrade_duration`` (``DEFAULT_UPGRADE_S`` when the cloud gave none). The old estimate was
"number of upgrades / rate + the busiest instance's durations end to end", with unknown durations as 0.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from orchestrator.app.plan import DEFAULT_UPGRADE_S, PlanResult, PlanRow, estimate, parse_duration
from orchestrator.inventory import ProxyEntry
from orchestrator.options import RunOptions

SOURCE = "2.23.12.000"
TARGET = "2.24.03.000"


# -------------------------------------------------------------------------------------- parse_duration
class TestParseDuration:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("about 5 minutes", 300),
            ("5 min", 300),
            ("5min", 300),
            ("5 MINUTES", 300),
            ("300", 300),
            ("300 s", 300),
            ("45 seconds", 45),
            ("about 30s", 30),
            ("2 hours", 7200),
            ("1.5 h", 5400),
            ("0.5 hour", 1800),
            (300, 300),
            (2.5, 2.5),
        ],
    )
    def test_known_shapes(self, text: object, seconds: float) -> None:
        assert parse_duration(text) == pytest.approx(seconds)

    @pytest.mark.parametrize("text", [None, "", "soon", "unknown", {"minutes": 5}, ["5"]])
    def test_unknown_is_none(self, text: object) -> None:
        assert parse_duration(text) is None

    def test_a_range_is_read_in_its_unit(self) -> None:
        # "2-5 minutes" is minutes, not 2 seconds: a plan must not underestimate the window 60-fold
        d = parse_duration("2-5 minutes")
        assert d is not None and 120 <= d <= 300


# -------------------------------------------------------------------------------------------- estimate
Case = tuple[list[tuple[str, float]], float, int, int, float]

# (upgrades as (instance, seconds) in inventory order, rate per second, concurrency, per instance, makespan)
CASES: dict[str, Case] = {
    "nothing": ([], 1.0, 8, 1, 0.0),
    "one": ([("a", 300)], 1.0, 8, 1, 300.0),
    # starts spaced by the rate: the last of three starts 2 s after the first
    "rate-spaces-starts": ([("a", 300), ("b", 300), ("c", 300)], 1.0, 8, 1, 302.0),
    "slow-rate": ([("a", 300), ("b", 300), ("c", 300)], 0.5, 8, 1, 304.0),
    # sending dominates: 100 short upgrades at 1/s
    "sending-bound": ([(f"i{k}", 10.0) for k in range(100)], 1.0, 1000, 1, 109.0),
    # concurrency 2: the third and fourth start when the first two end
    "concurrency": ([("a", 100), ("b", 100), ("c", 100), ("d", 100)], 100.0, 2, 1, 200.01),
    "concurrency-one": ([("a", 100), ("b", 50), ("c", 25)], 1000.0, 1, 1, 175.0),
    # one instance's proxies one after another (per-instance guard 1) ...
    "instance-serial": ([("a", 300), ("a", 300), ("a", 300)], 1.0, 8, 1, 900.0),
    # ... or two at a time
    "instance-two": ([("a", 100), ("a", 100), ("a", 100)], 100.0, 8, 2, 200.0),
    # the busiest instance, while the others run beside it (the claim skips a busy instance's siblings)
    "busiest-instance": ([("a", 300), ("a", 300), ("b", 500)], 1.0, 8, 1, 600.0),
    # an instance listed first with three proxies does not hold back the instance listed after it:
    # b starts at 1 s, beside a's first proxy, not after a's third
    "no-head-of-line-blocking": ([("a", 300), ("a", 300), ("a", 300), ("b", 3000)], 1.0, 8, 1, 3001.0),
    # per-instance and concurrency together: 2 slots, a's second proxy waits for a, c takes b's slot
    "guard-and-cap": ([("a", 100), ("a", 100), ("b", 10), ("c", 10)], 1000.0, 2, 1, 200.0),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_estimate(case: Case) -> None:
    upgrades, rate, concurrency, per_instance, makespan = case
    got = estimate(upgrades, rate_per_s=rate, concurrency=concurrency, per_instance=per_instance)
    assert got == pytest.approx(makespan)


def test_estimate_is_never_shorter_than_any_of_its_bounds() -> None:
    """Whatever the mix: at least the sending time, the longest upgrade, each instance's own work spread
    over its slots, and the total work spread over the concurrency."""
    import random

    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 40)
        ups = [(f"i{rng.randint(0, 6)}", float(rng.choice([10, 60, 300, 900]))) for _ in range(n)]
        rate, conc, per = rng.choice([0.5, 1.0, 10.0]), rng.randint(1, 10), rng.randint(1, 3)
        got = estimate(ups, rate_per_s=rate, concurrency=conc, per_instance=per)
        per_inst: dict[str, float] = {}
        for inst, d in ups:
            per_inst[inst] = per_inst.get(inst, 0.0) + d
        assert got >= (n - 1) / rate + min(d for _, d in ups) - 1e-9
        assert got >= max(d for _, d in ups) - 1e-9
        assert got >= max(per_inst.values()) / per - 1e-9
        assert got >= sum(d for _, d in ups) / conc - 1e-9


def test_estimate_of_a_large_fleet_is_quick() -> None:
    import time

    # 100,000 proxies, a fifth of them on one big instance (each start once looked at all its siblings)
    ups = [("big", 60.0)] * 20_000 + [(f"i{k // 3}", 300.0) for k in range(80_000)]
    t0 = time.perf_counter()
    got = estimate(ups, rate_per_s=10.0, concurrency=50, per_instance=1)
    assert time.perf_counter() - t0 < 5.0
    assert got >= 20_000 * 60.0


# ---------------------------------------------------------------------------------------- the plan
def entry(instance: str, proxy: str) -> ProxyEntry:
    return ProxyEntry(
        project_id="054e292c9880d4992f02c0196d3ea468",
        instance_id=instance,
        proxy_id=proxy,
        region="cn-north-4",
        endpoint=None,
        source_version=SOURCE,
        target_version=TARGET,
        x_language="en-us",
        name=None,
        line=1,
    )


def row(instance: str, proxy: str, verdict: str, duration: float | None) -> PlanRow:
    return PlanRow(entry(instance, proxy), verdict, "r", SOURCE, duration)


def plan(rows: list[PlanRow], **options: object) -> PlanResult:
    return PlanResult(rows=rows, options=RunOptions(**options))  # type: ignore[arg-type]


class TestPlanEstimate:
    def test_only_upgrades_count(self) -> None:
        rows = [
            row("a", "a1", "upgrade", 300),
            row("a", "a2", "upgrade", 300),  # one operation per instance at a time: a takes 600 s
            row("b", "b1", "upgrade", 500),
            row("c", "c1", "skip", 9999),  # not sent: does not count
            row("d", "d1", "flag", 9999),
            row("e", "e1", "unreachable", None),
        ]
        assert plan(rows, rate="1/s").estimate_s() == pytest.approx(600)
        # changed: the old estimate added the whole sending time to the busiest instance (603, 606)
        assert plan(rows, rate="1/2s").estimate_s() == pytest.approx(600)
        # a start every 200 s: b at 200 (a is busy), a2 at 400: both end at 700
        assert plan(rows, rate="1/200s").estimate_s() == pytest.approx(700)

    def test_uses_the_runs_concurrency_and_per_instance_guard(self) -> None:
        rows = [row("a", f"a{k}", "upgrade", 100) for k in range(4)]
        assert plan(rows, rate="100/s").estimate_s() == pytest.approx(400)
        assert plan(rows, rate="100/s", per_instance=2).estimate_s() == pytest.approx(200.01)
        assert plan(rows, rate="100/s", per_instance=4, concurrency=1).estimate_s() == pytest.approx(400)

    def test_unknown_duration_counts_as_a_typical_upgrade(self) -> None:
        # changed: an unknown duration was 0 (only the sending counted: 1 s here); a proxy upgrade takes
        # minutes, so an unknown one counts as DEFAULT_UPGRADE_S
        rows = [row("a", "a1", "upgrade", None), row("b", "b1", "upgrade", None)]
        assert DEFAULT_UPGRADE_S == 300.0
        assert plan(rows, rate="2/s").estimate_s() == pytest.approx(0.5 + DEFAULT_UPGRADE_S)

    def test_nothing_to_upgrade(self) -> None:
        assert plan([row("a", "a1", "skip", 300)], rate="10/s").estimate_s() == 0
        assert plan([], rate="10/s").estimate_s() == 0

    def test_summary_counts_and_estimate(self) -> None:
        rows = [row("a", "a1", "upgrade", 300), row("b", "b1", "skip", None), row("c", "c1", "flag", None)]
        d = plan(rows, rate="10/s").as_dict()
        # changed: 300 (was 300.1: one upgrade's sending time added after it), and the window's note
        assert d["summary"] == {
            "upgrade": 1,
            "skip": 1,
            "flag": 1,
            "unreachable": 0,
            "estimated_duration_s": 300.0,
            "window": None,
        }
        assert [p["verdict"] for p in d["proxies"]] == ["upgrade", "skip", "flag"]
        assert d["proxies"][0]["proxy_id"] == "a1" and d["proxies"][0]["current_version"] == SOURCE
        assert [p["upgrade_duration_s"] for p in d["proxies"]] == [300, None, None]


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%MZ")


class TestWindowNote:
    def future(self, hours: int) -> str:
        start = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(days=2)
        return f"{_iso(start)}/PT{hours}H"

    def test_no_window_no_note(self) -> None:
        assert plan([row("a", "a1", "upgrade", 300)]).window_note() is None

    def test_fits(self) -> None:
        p = plan([row("a", "a1", "upgrade", 600)], window=self.future(1), cutoff="10m")
        assert p.window_note() == "fits the window (10 min of 50 min usable before the cutoff)"

    def test_does_not_fit_says_how_many_windows(self) -> None:
        rows = [row("a", f"a{k}", "upgrade", 1800) for k in range(5)]  # one instance: 2.5 h end to end
        p = plan(rows, window=self.future(1))
        assert p.window_note() == (
            "does NOT fit one window: 2.5 h needed, 60 min usable before the cutoff; about 3 windows"
        )

    def test_a_window_that_is_over(self) -> None:
        start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(days=2)
        p = plan([row("a", "a1", "upgrade", 60)], window=f"{_iso(start)}/PT1H")
        assert p.window_note() == "the window is over: no later occurrence"
