"""dispatch(now, view): the run-wide controls as one pure function, table-tested on explicit instants."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from orchestrator.schedule.breaker import parse_max_failures
from orchestrator.schedule.dispatch import (
    EXIT_HALTED,
    Confirm,
    Decision,
    Phase,
    RunView,
    Start,
    Stop,
    WaitUntil,
    dispatch,
    window_phase,
)
from orchestrator.schedule.window import parse_window
from orchestrator.states import RunStatus


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


# Sat 2026-12-05 01:00-05:00 +08:00 is Fri 2026-12-04 17:00-21:00 UTC; the cutoff makes 20:30 the last start.
ONE_OFF = parse_window("2026-12-05T01:00:00+08:00/PT4H")
WEEKLY = parse_window("Sat 01:00-05:00 Asia/Shanghai")
OPENS = utc(2026, 12, 4, 17)
LAST_START = utc(2026, 12, 4, 20, 30)
CLOSES = utc(2026, 12, 4, 21)
CUTOFF = timedelta(minutes=30)


def view(**changes: Any) -> RunView:
    base = RunView(to_start=10, in_flight=0, since=OPENS, window=ONE_OFF, cutoff=CUTOFF, wave_open=1)
    return replace(base, **changes)


@dataclass(frozen=True)
class Case:
    now: datetime
    changes: dict[str, Any] = field(default_factory=dict)
    expected: Decision | None = None  # compared whole, reason included, when given
    kind: type | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


CASES = {
    # -- nothing to do
    "nothing left": Case(OPENS, {"to_start": 0}, Start(1, note="nothing left to start")),
    "nothing left, even after the window": Case(
        CLOSES, {"to_start": 0, "window": ONE_OFF}, Start(1, note="nothing left to start")
    ),
    # -- no window
    "no window, first wave opens": Case(OPENS, {"window": None, "wave_open": 0}, Start(1, opens=True)),
    "no window, single wave": Case(OPENS, {"window": None}, Start(1)),
    # -- inside the window
    "window open at its start": Case(OPENS, {}, Start(1)),
    "window open a minute before the cutoff": Case(LAST_START - timedelta(minutes=1), {}, Start(1)),
    # -- after the cutoff
    "cutoff reached, work in flight: track until the end": Case(
        LAST_START,
        {"in_flight": 3},
        Stop(
            "no new upgrade after Sat 2026-12-05 04:30 +08:00 (cutoff 30m before the window ends); "
            "tracking 3 upgrades until Sat 2026-12-05 05:00 +08:00",
            3,
            RunStatus.PAUSED,
            new_upgrades_only=True,
            until=CLOSES,
        ),
    ),
    "cutoff reached, nothing in flight: stop now": Case(
        LAST_START,
        {},
        Stop(
            "window closed: 10 proxies not started; resume in the next window (give it with resume --window)",
            3,
            RunStatus.PAUSED,
        ),
    ),
    "window end with work still in flight: stop": Case(
        CLOSES,
        {"in_flight": 2, "to_start": 1},
        Stop(
            "window closed: 1 proxy not started; resume in the next window (give it with resume --window); "
            "2 upgrades still in flight, reconciled on resume",
            3,
            RunStatus.PAUSED,
        ),
    ),
    "weekly window end names the next opening": Case(
        CLOSES,
        {"window": WEEKLY},
        kind=Stop,
        fields={"exit_code": 3, "run_status": RunStatus.PAUSED, "new_upgrades_only": False},
        reason="window closed: 10 proxies not started; resume in the next window "
        "(opens Sat 2026-12-12 01:00 Asia/Shanghai)",
    ),
    "window closed even when waiting was allowed": Case(
        CLOSES, {"window": WEEKLY, "wait_for_window": True}, kind=Stop, reason="window closed: 10 proxies"
    ),
    # -- started outside a window
    "started before the window: stop naming its start": Case(
        OPENS - timedelta(hours=3),
        {"since": OPENS - timedelta(hours=3)},
        Stop(
            "outside the maintenance window; the next one opens Sat 2026-12-05 01:00 +08:00 "
            "(run again then, or use --wait-for-window)",
            3,
            RunStatus.PAUSED,
        ),
    ),
    "started before the window, waiting allowed": Case(
        OPENS - timedelta(hours=3),
        {"since": OPENS - timedelta(hours=3), "wait_for_window": True},
        WaitUntil(OPENS, "waiting for the maintenance window opening Sat 2026-12-05 01:00 +08:00"),
    ),
    "started after a one-off window": Case(
        CLOSES + timedelta(minutes=1),
        {"since": CLOSES + timedelta(minutes=1), "wait_for_window": True},
        Stop(
            "the maintenance window 2026-12-05T01:00:00+08:00/PT4H is over; give a new one with --window",
            3,
            RunStatus.PAUSED,
        ),
    ),
    "started after the cutoff of a one-off window": Case(
        LAST_START + timedelta(minutes=5),
        {"since": LAST_START + timedelta(minutes=5)},
        Stop(
            "too late in the maintenance window 2026-12-05T01:00:00+08:00/PT4H: no new upgrade after "
            "Sat 2026-12-05 04:30 +08:00; give a new one with --window",
            3,
            RunStatus.PAUSED,
        ),
    ),
    "started after the cutoff of a weekly window": Case(
        LAST_START + timedelta(minutes=5),
        {"since": LAST_START + timedelta(minutes=5), "window": WEEKLY},
        Stop(
            "too late in the maintenance window; the next one opens Sat 2026-12-12 01:00 Asia/Shanghai "
            "(run again then, or use --wait-for-window)",
            3,
            RunStatus.PAUSED,
        ),
    ),
    "started after the cutoff, waiting allowed: the next week": Case(
        LAST_START + timedelta(minutes=5),
        {"since": LAST_START + timedelta(minutes=5), "window": WEEKLY, "wait_for_window": True},
        WaitUntil(
            OPENS + timedelta(days=7),
            "waiting for the maintenance window opening Sat 2026-12-12 01:00 Asia/Shanghai",
        ),
    ),
    "waited a week and worked: that window's end stops": Case(
        CLOSES + timedelta(days=7),
        {"since": LAST_START, "window": WEEKLY, "wait_for_window": True},
        kind=Stop,
        reason="window closed: 10 proxies not started; resume in the next window (opens Sat 2026-12-19",
    ),
    "resumed outside the window with work in flight": Case(
        OPENS - timedelta(hours=1),
        {"since": OPENS - timedelta(hours=1), "in_flight": 2},
        kind=Stop,
        fields={"new_upgrades_only": False, "exit_code": 3},
        reason="outside the maintenance window",
    ),
    # -- the breaker
    "breaker tripped, work in flight: track it, no new upgrade": Case(
        OPENS + timedelta(hours=1),
        {"breaker": parse_max_failures("2"), "failures": 3, "finished": 5, "in_flight": 2},
        Stop(
            "halted: 3 failures exceed the limit of 2; "
            "no new upgrade starts, 2 upgrades in flight tracked to their end",
            EXIT_HALTED,
            RunStatus.HALTED,
            new_upgrades_only=True,
            until=CLOSES,
        ),
    ),
    "breaker tripped, nothing in flight: halt": Case(
        OPENS + timedelta(hours=1),
        {"breaker": parse_max_failures("2"), "failures": 3, "finished": 5},
        Stop(
            "halted: 3 failures exceed the limit of 2; a person must decide: "
            "resume --ack to count failures anew, or resume --max-failures M",
            4,
            RunStatus.HALTED,
        ),
    ),
    "breaker at its limit: go on": Case(
        OPENS + timedelta(hours=1),
        {"breaker": parse_max_failures("2"), "failures": 2, "finished": 5},
        Start(1),
    ),
    "breaker acknowledged: counts anew": Case(
        OPENS + timedelta(hours=1),
        {"breaker": parse_max_failures("2"), "failures": 3, "failures_acked": 3, "finished": 5},
        Start(1),
    ),
    "breaker by percentage of finished": Case(
        OPENS + timedelta(hours=1),
        {"breaker": parse_max_failures("10%"), "failures": 3, "finished": 20},
        kind=Stop,
        fields={"exit_code": 4, "run_status": RunStatus.HALTED},
        reason="halted: 3 failures exceed 10% of 20 finished jobs (2)",
    ),
    "breaker tripped but nothing left to start: the run just finishes": Case(
        OPENS + timedelta(hours=1),
        {"breaker": parse_max_failures("2"), "failures": 3, "finished": 8, "to_start": 0, "in_flight": 2},
        Start(1),
    ),
    "breaker without a window: no deadline": Case(
        OPENS,
        {"window": None, "breaker": parse_max_failures("0"), "failures": 1, "finished": 1, "in_flight": 1},
        kind=Stop,
        fields={"new_upgrades_only": True, "until": None, "exit_code": 4},
    ),
    "breaker and window end together: halted wins": Case(
        CLOSES,
        {"breaker": parse_max_failures("2"), "failures": 3, "finished": 5, "in_flight": 2},
        kind=Stop,
        fields={"new_upgrades_only": False, "exit_code": 4, "run_status": RunStatus.HALTED},
    ),
    "breaker after the cutoff: halted, tracking until the end": Case(
        LAST_START,
        {"breaker": parse_max_failures("2"), "failures": 3, "finished": 5, "in_flight": 1},
        kind=Stop,
        fields={"new_upgrades_only": True, "exit_code": 4, "until": CLOSES},
    ),
    # -- waves
    "first wave opens at once, even with --confirm": Case(
        OPENS, {"wave_open": 0, "waves": 3, "confirm": True}, Start(1, opens=True)
    ),
    "next wave waits for the open one": Case(
        OPENS, {"waves": 3}, Start(1, note="wave 2 of 3 waits for wave 1 to finish")
    ),
    "open wave done: the next opens": Case(
        OPENS, {"waves": 3, "open_waves_done": True}, Start(2, opens=True)
    ),
    "last wave open": Case(OPENS, {"waves": 3, "wave_open": 3}, Start(3)),
    "pause between waves": Case(
        OPENS + timedelta(minutes=5),
        {
            "waves": 3,
            "open_waves_done": True,
            "open_waves_done_at": OPENS,
            "pause_between": timedelta(minutes=10),
        },
        WaitUntil(
            OPENS + timedelta(minutes=10), "wave 2 opens Sat 2026-12-05 01:10 +08:00 after the 10m pause"
        ),
    ),
    "pause over": Case(
        OPENS + timedelta(minutes=10),
        {
            "waves": 3,
            "open_waves_done": True,
            "open_waves_done_at": OPENS,
            "pause_between": timedelta(minutes=10),
        },
        Start(2, opens=True),
    ),
    "pause reaching past the cutoff: ask again at the cutoff": Case(
        LAST_START - timedelta(minutes=5),
        {
            "waves": 3,
            "open_waves_done": True,
            "open_waves_done_at": LAST_START - timedelta(minutes=5),
            "pause_between": timedelta(hours=1),
        },
        kind=WaitUntil,
        fields={"at": LAST_START},
    ),
    "pause without a window": Case(
        OPENS,
        {
            "window": None,
            "waves": 2,
            "open_waves_done": True,
            "open_waves_done_at": OPENS,
            "pause_between": timedelta(hours=1),
        },
        WaitUntil(OPENS + timedelta(hours=1), "wave 2 opens Fri 2026-12-04 18:00 UTC after the 1h pause"),
    ),
    "confirm before the next wave": Case(
        OPENS, {"waves": 3, "open_waves_done": True, "confirm": True, "next_wave_size": 5}, Confirm(2, 5)
    ),
    "breaker blocks the next wave": Case(
        OPENS,
        {
            "waves": 3,
            "open_waves_done": True,
            "breaker": parse_max_failures("0"),
            "failures": 1,
            "finished": 1,
        },
        kind=Stop,
        fields={"exit_code": 4},
    ),
    "cutoff blocks the next wave": Case(
        LAST_START, {"waves": 3, "open_waves_done": True}, kind=Stop, fields={"exit_code": 3}
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dispatch_table(name: str) -> None:
    case = CASES[name]
    decision = dispatch(case.now, view(**case.changes))
    if case.expected is not None:
        assert decision == case.expected
    if case.kind is not None:
        assert isinstance(decision, case.kind)
    for key, value in case.fields.items():
        assert getattr(decision, key) == value, key
    if case.reason:
        assert case.reason in getattr(decision, "reason", "")


def test_confirm_prompt_and_refusal() -> None:
    confirm = Confirm(2, 5)
    assert confirm.prompt == "continue with wave 2 (5 proxies)? [y/N]"
    assert Confirm(3, 1).prompt == "continue with wave 3 (1 proxy)? [y/N]"
    refused = confirm.declined()
    assert refused == Stop(
        "wave 2 (5 proxies) awaits confirmation: resume on a terminal to answer, or resume --yes",
        3,
        RunStatus.HALTED,
    )


def test_now_in_any_zone_gives_the_same_answer() -> None:
    local = LAST_START.astimezone(ZoneInfo("Asia/Shanghai"))
    assert dispatch(local, view(in_flight=1)) == dispatch(LAST_START, view(in_flight=1))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        dispatch(datetime(2026, 12, 4, 18), view())
    with pytest.raises(ValueError, match="negative"):
        view(to_start=-1)
    with pytest.raises(ValueError, match="aware"):
        view(since=datetime(2026, 12, 4))
    with pytest.raises(ValueError, match="wave_open"):
        view(wave_open=4, waves=3)
    with pytest.raises(ValueError, match="negative cutoff"):
        view(cutoff=timedelta(minutes=-1))


def test_window_phase_for_status() -> None:
    assert window_phase(OPENS, None, CUTOFF).phase is Phase.NONE
    assert window_phase(OPENS - timedelta(seconds=1), ONE_OFF, CUTOFF).phase is Phase.OUTSIDE
    opened = window_phase(OPENS, ONE_OFF, CUTOFF)
    assert opened.phase is Phase.OPEN and opened.last_start == LAST_START
    assert window_phase(LAST_START, ONE_OFF, CUTOFF).phase is Phase.CLOSING
    assert window_phase(CLOSES, ONE_OFF, CUTOFF) == window_phase(CLOSES, ONE_OFF, CUTOFF)
    assert window_phase(CLOSES, ONE_OFF, CUTOFF).interval is None


# --- acceptance: whole windows on an injected clock ----------------------------------------------------


@dataclass
class SimulatedRun:
    """A toy engine around dispatch: starts one upgrade per step while allowed; each upgrade's workflow
    takes `workflow` of simulated time. Only the clock is simulated; dispatch is the real one."""

    window: Any
    cutoff: timedelta
    workflow: timedelta
    jobs: int
    since: datetime
    wait_for_window: bool = True
    step: timedelta = timedelta(minutes=1)
    starts: list[datetime] = field(default_factory=list)

    def run(self) -> tuple[datetime, Stop]:
        now = self.since
        in_flight: list[datetime] = []
        to_start = self.jobs
        for _ in range(100_000):
            in_flight = [done for done in in_flight if done > now]
            decision = dispatch(
                now,
                RunView(
                    to_start=to_start,
                    in_flight=len(in_flight),
                    since=self.since,
                    window=self.window,
                    cutoff=self.cutoff,
                    wait_for_window=self.wait_for_window,
                    wave_open=1,
                ),
            )
            if isinstance(decision, WaitUntil):
                now = decision.at
                continue
            if isinstance(decision, Stop) and not decision.new_upgrades_only:
                return now, decision
            if isinstance(decision, Start) and to_start > 0:
                self.starts.append(now)
                in_flight.append(now + self.workflow)
                to_start -= 1
            now += self.step
        raise AssertionError("the simulated run never stopped")


def test_four_hour_window_with_a_thirty_minute_cutoff_passes_in_milliseconds() -> None:
    wall = time.perf_counter()
    sim = SimulatedRun(
        ONE_OFF, CUTOFF, workflow=timedelta(minutes=20), jobs=1000, since=OPENS - timedelta(minutes=45)
    )
    stopped_at, stop = sim.run()
    elapsed = time.perf_counter() - wall
    assert sim.starts[0] == OPENS  # waited for the window, started at its first instant
    assert max(sim.starts) == LAST_START - timedelta(minutes=1)  # nothing at or after end - cutoff
    assert len(sim.starts) == 210  # one a minute for 3.5 hours
    # the last workflow (started 20:29) ends 20:49: nothing left to track, so the run stops then
    assert stopped_at == utc(2026, 12, 4, 20, 49)
    assert (stop.exit_code, stop.run_status) == (3, RunStatus.PAUSED)
    assert stop.reason.startswith("window closed: 790 proxies not started; resume in the next window")
    assert elapsed < 0.5, f"{elapsed:.3f} s"


def test_tracking_stops_at_the_window_end() -> None:
    sim = SimulatedRun(ONE_OFF, CUTOFF, workflow=timedelta(hours=1), jobs=1000, since=OPENS)
    stopped_at, stop = sim.run()
    assert max(sim.starts) < LAST_START
    assert stopped_at == CLOSES
    assert "upgrades still in flight, reconciled on resume" in stop.reason


def test_weekly_window_on_the_spring_forward_night() -> None:
    # Sun 01:00-05:00 Europe/Berlin on 2026-03-29 is 00:00-03:00 UTC (3 real hours); cutoff 30m: last start
    # before 04:30 CEST = 02:30 UTC.
    window = parse_window("Sun 01:00-05:00 Europe/Berlin")
    sim = SimulatedRun(window, CUTOFF, workflow=timedelta(minutes=5), jobs=10_000, since=utc(2026, 3, 28, 20))
    stopped_at, stop = sim.run()
    assert sim.starts[0] == utc(2026, 3, 29, 0)
    assert max(sim.starts) == utc(2026, 3, 29, 2, 29)
    assert len(sim.starts) == 150  # 2.5 real hours of starts
    assert stop.reason.endswith("(opens Sun 2026-04-05 01:00 Europe/Berlin)")
    assert stopped_at == utc(2026, 3, 29, 2, 34)


def test_weekly_window_on_the_fall_back_night() -> None:
    window = parse_window("Sun 01:00-05:00 America/New_York")
    sim = SimulatedRun(
        window, CUTOFF, workflow=timedelta(minutes=5), jobs=10_000, since=utc(2026, 10, 31, 20)
    )
    _, _ = sim.run()
    assert sim.starts[0] == utc(2026, 11, 1, 5)  # 01:00 EDT
    assert max(sim.starts) == utc(2026, 11, 1, 9, 29)  # before 04:30 EST
    assert len(sim.starts) == 270  # 4.5 real hours
