"""The run-wide controls as one process holds them (``runtime.Controls`` over ``app.controls.make_decider``):
an answer read once a second must still stop new upgrades at the cutoff, and a failure recorded here must
stop the next send here, both without waiting for the next read. Virtual clocks only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from orchestrator.app.controls import make_decider
from orchestrator.options import RunOptions
from orchestrator.runtime import Controls
from orchestrator.schedule.dispatch import Start, Stop
from orchestrator.states import RunStatus
from orchestrator.store import RunState
from orchestrator.store.rows import RunRow

OPENS = datetime(2026, 12, 4, 17, tzinfo=UTC)  # Sat 2026-12-05 01:00 +08:00
LAST_START = OPENS + timedelta(hours=3, minutes=30)


class Clock:
    """A monotonic clock and the job table's clock, moved together by the test."""

    def __init__(self, at: datetime) -> None:
        self.at = at
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)
        self.mono += seconds

    def now(self) -> datetime:
        return self.at


def state(at: datetime, *, failures: int = 0, finished: int = 0, not_started: int = 10) -> RunState:
    run = RunRow(
        id=1,
        name="r",
        inventory_path="/i.yaml",
        inventory_sha256="x",
        status=RunStatus.RUNNING,
        created_at=OPENS,
        started_at=OPENS,
        finished_at=None,
        options={},
        stop_reason=None,
    )
    return RunState(
        run=run,
        total=20,
        finished=finished,
        failures=failures,
        not_started=not_started,
        in_flight=2,
        open_unfinished=not_started + 2,
        waves=1,
        last_wave_finished_at=None,
        db_now=at,
    )


def controls(options: RunOptions, clock: Clock) -> Controls:
    return Controls(make_decider(options, since=OPENS, confirm=False), mono=lambda: clock.mono, now=clock.now)


def test_an_answer_read_before_the_cutoff_does_not_outlive_it() -> None:
    clock = Clock(LAST_START - timedelta(seconds=0.4))
    ctl = controls(RunOptions(window="2026-12-05T01:00:00+08:00/PT4H", cutoff="30m"), clock)
    decision = ctl.update(state(clock.at))
    assert isinstance(decision, Start) and decision.until == LAST_START
    assert ctl.allow_new and not ctl.stale
    clock.advance(0.3)
    assert ctl.allow_new  # 0.1 s before the cutoff
    clock.advance(0.2)  # past the cutoff, before the next read is due
    assert not ctl.stale and not ctl.allow_new
    # the next read says the same in its own words
    decision = ctl.update(state(clock.at))
    assert isinstance(decision, Stop) and decision.new_upgrades_only and not ctl.allow_new


def test_without_a_window_an_answer_has_no_deadline() -> None:
    clock = Clock(OPENS)
    ctl = controls(RunOptions(), clock)
    decision = ctl.update(state(clock.at))
    assert isinstance(decision, Start) and decision.until is None
    clock.advance(86400)
    assert ctl.allow_new


def test_a_failure_recorded_here_trips_the_breaker_before_the_next_read() -> None:
    clock = Clock(OPENS)
    ctl = controls(RunOptions(max_failures="2"), clock)
    ctl.update(state(clock.at, failures=2, finished=5))
    assert ctl.allow_new  # 2 failures are within the limit of 2
    ctl.note_failure()
    assert not ctl.allow_new
    assert isinstance(ctl.decision, Stop) and ctl.decision.exit_code == 4
    assert "3 failures exceed the limit of 2" in ctl.decision.reason
    # a read that already counts it replaces the local count (not counted twice)
    ctl.update(state(clock.at, failures=3, finished=6))
    assert "3 failures exceed the limit of 2" in ctl.decision.reason


def test_failures_acknowledged_do_not_count() -> None:
    from dataclasses import replace

    clock = Clock(OPENS)
    ctl = controls(RunOptions(max_failures="2"), clock)
    st = state(clock.at, failures=5, finished=8)
    ctl.update(replace(st, run=replace(st.run, failures_acked=4)))
    assert ctl.allow_new
