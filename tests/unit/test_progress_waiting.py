"""The progress display's countdown while a run waits (a window to open, a wave's pause).

The engine emits ``run.waiting`` (``until``, ``reason``) once a minute; between those lines a terminal
shows the reason and a countdown that ticks with the wall clock, gone once a call is made or the time
has passed. Rendered into a recording console: what an operator would read."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from rich.console import Console

from orchestrator.observe import RunEvents

T0 = datetime(2026, 12, 5, 21, 0, tzinfo=UTC)


class Wall:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def _screen(events: RunEvents) -> str:
    console = Console(file=io.StringIO(), width=200, record=True, color_system=None)
    console.print(events._render())
    return console.export_text()


def test_countdown_ticks_with_the_wall_clock_and_ends_at_the_first_call() -> None:
    wall = Wall()
    events = RunEvents(total=10, progress=False, wall=wall)
    events.update({"pending": 10})
    assert events.waiting_line() is None
    opens = T0 + timedelta(hours=1, minutes=2, seconds=3)
    events.emit("run.waiting", until=opens.isoformat(), reason="waiting for the maintenance window")
    assert events.waiting_line() == "waiting for the maintenance window: in 01:02:03"
    assert "waiting for the maintenance window: in 01:02:03" in _screen(events)
    wall.now = T0 + timedelta(hours=1, minutes=1, seconds=3)
    assert events.waiting_line() == "waiting for the maintenance window: in 00:01:00"
    wall.now = opens + timedelta(seconds=1)  # the time passed: no stale "in 00:00:00" left on screen
    assert events.waiting_line() is None
    wall.now = T0
    assert events.waiting_line() is not None
    events.emit("call", route="upgrade", outcome="accept", latency_s=0.01)
    assert events.waiting_line() is None
    screen = _screen(events)
    assert "upgrading" in screen and "waiting for" not in screen


def test_a_new_wait_replaces_the_old_one_and_a_bad_until_is_ignored() -> None:
    wall = Wall()
    events = RunEvents(total=1, progress=False, wall=wall)
    events.emit("run.waiting", until=(T0 + timedelta(minutes=5)).isoformat(), reason="wave 2 pause")
    events.emit("run.waiting", until=(T0 + timedelta(days=2)).isoformat(), reason="next window")
    assert events.waiting_line() == "next window: in 48:00:00"
    events.emit("run.waiting", until="not a time", reason="garbled")  # never raises; the last good wait stays
    assert events.waiting_line() == "next window: in 48:00:00"
