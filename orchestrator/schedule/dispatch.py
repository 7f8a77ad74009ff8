"""The run-wide answer to "may a new upgrade start now, and which wave is eligible?".

``dispatch(now, view)`` is a pure function of the clock and of one read of the run's counts (``RunView``).
Whichever process claims upgrades (the ``run``/``resume`` feeder, or each ``worker`` on PostgreSQL) asks it
before claiming, so every process obeys the same window, breaker and waves. It only ever withholds *new*
upgrade calls: tracking, reconcile and postflight of work already sent go on (except past a window's end,
where the run stops and ``resume`` picks the rest up).

Answers, checked in this order (the first that applies wins):

1. Nothing to start and nothing in flight: ``Start`` (the claim finds nothing; the engine's end-of-run
   path applies).
2. Breaker tripped (failures minus those acknowledged exceed the limit) while jobs still wait to start:
   ``Stop(exit 4, halted)``; with work in flight first ``Stop(new_upgrades_only=True)`` until it ended (or
   the window ended).
3. Window, per ``window_phase``:
   - *open* (inside an occurrence, before end minus cutoff): go on to the waves;
   - *closing* (after the cutoff): with work in flight ``Stop(new_upgrades_only=True, until=window end)``,
     then ``Stop(exit 3, paused, "window closed: N proxies not started; resume in the next window")``;
   - *outside*: if this process had an open moment since ``view.since``, the window closed: the same final
     ``Stop``. Otherwise it started outside a window: ``WaitUntil(next start)`` with ``--wait-for-window``,
     else ``Stop(exit 3, paused)`` naming the next window's start.
4. Waves: wave 1 opens at once (starting the run is its confirmation). Wave k+1 opens only when every job
   of waves <= k has finished, after ``pause_between`` (``WaitUntil``), and with ``--confirm`` only once an
   operator said yes (``Confirm``). ``Start(open_wave=k, opens=True)`` asks the engine to persist
   ``runs.wave_open = k`` (conditional on the old value, so two workers cannot both open it).

Exit codes and run statuses are the project's (``orchestrator.errors``, ``orchestrator.states.RunStatus``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, tzinfo

from orchestrator.errors import EXIT_HALTED, EXIT_STOPPED
from orchestrator.schedule.breaker import Breaker
from orchestrator.schedule.durations import format_duration
from orchestrator.schedule.window import Interval, Window, format_instant
from orchestrator.states import RunStatus

_MAX_OCCURRENCES_SCANNED = 64


@dataclass(frozen=True)
class RunView:
    """What one read of the run gives ``dispatch``. Counts are of jobs; times are aware datetimes.

    - ``to_start``: jobs that still need an upgrade call (pending, or a retry scheduled).
    - ``in_flight``: jobs whose call was sent or may have been (intent recorded, accepted and tracked,
      awaiting reconcile or postflight).
    - ``since``: when this process started dispatching (its ``run``/``resume``/``worker`` start): tells a
      window that closed on this process from one the process started outside of.
    - ``window``, ``cutoff``, ``wait_for_window``: the run's window (None: no window), how long before its
      end no new upgrade starts, and whether a start outside a window waits instead of stopping.
    - ``breaker`` (None: no limit), ``failures`` (finished jobs whose outcome counts as a failure),
      ``failures_acked`` (the part an operator acknowledged with ``resume --ack``), ``finished`` (jobs
      succeeded, skipped, flagged or failed).
    - ``wave_open`` (0 before wave 1 opened), ``waves`` (number of waves, >= 1), ``open_waves_done``
      (every job of waves <= wave_open finished), ``open_waves_done_at`` (when the last of them finished),
      ``next_wave_size`` (jobs in wave_open + 1), ``pause_between``, ``confirm`` (ask before each wave
      after the first; False with ``--yes``).

    Raises ``ValueError`` for negative counts, a naive ``since``, or a wave number out of range.
    """

    to_start: int
    in_flight: int
    since: datetime
    window: Window | None = None
    cutoff: timedelta = timedelta(0)
    wait_for_window: bool = False
    breaker: Breaker | None = None
    failures: int = 0
    failures_acked: int = 0
    finished: int = 0
    wave_open: int = 0
    waves: int = 1
    open_waves_done: bool = False
    open_waves_done_at: datetime | None = None
    next_wave_size: int = 0
    pause_between: timedelta = timedelta(0)
    confirm: bool = False

    def __post_init__(self) -> None:
        counts = (self.to_start, self.in_flight, self.failures, self.failures_acked, self.finished)
        if min(counts) < 0 or self.next_wave_size < 0:
            raise ValueError("negative count in RunView")
        if self.since.tzinfo is None:
            raise ValueError("RunView.since must be an aware datetime")
        if self.waves < 1 or not 0 <= self.wave_open <= self.waves:
            raise ValueError(f"wave_open {self.wave_open} outside 0..{self.waves}")
        if self.cutoff < timedelta(0) or self.pause_between < timedelta(0):
            raise ValueError("negative cutoff or pause in RunView")


@dataclass(frozen=True)
class Start:
    """New upgrades may start for jobs with ``wave <= open_wave``. ``opens``: this answer opens wave
    ``open_wave``; persist ``runs.wave_open`` first (conditional on the value read). ``note``: why no
    later wave may start yet, for ``status`` (empty when nothing holds back). ``until`` (UTC; None: no
    window): the answer holds only before this instant, the window's end minus the cutoff, however
    long the caller keeps it before asking again (the send fence checks it; not part of equality)."""

    open_wave: int
    opens: bool = False
    note: str = ""
    until: datetime | None = field(default=None, compare=False)


@dataclass(frozen=True)
class WaitUntil:
    """No new upgrade before ``at`` (UTC); ask again then (or sooner, when the counts change). Work in
    flight is tracked meanwhile. ``reason`` is one line for logs and ``status``."""

    at: datetime
    reason: str


@dataclass(frozen=True)
class Stop:
    """No new upgrade starts.

    ``new_upgrades_only=False``: the run stops now with ``exit_code`` and ``run_status`` and ``reason``.
    ``new_upgrades_only=True``: keep tracking work in flight and ask again when it changes, at ``until``
    at the latest (the window's end, when there is one); the final ``Stop`` follows.
    """

    reason: str
    exit_code: int
    run_status: RunStatus
    new_upgrades_only: bool = False
    until: datetime | None = None


@dataclass(frozen=True)
class Confirm:
    """Wave ``wave`` (``size`` jobs) may open once an operator confirms. On a terminal ask ``prompt``; on
    yes persist ``runs.wave_open = wave``; on no, or off a terminal without ``--yes``, stop with
    ``declined()``."""

    wave: int
    size: int

    @property
    def prompt(self) -> str:
        """The question for the terminal: ``continue with wave 2 (5 proxies)? [y/N]``."""
        return f"continue with wave {self.wave} ({_count(self.size, 'proxy', 'proxies')})? [y/N]"

    def declined(self) -> Stop:
        """The stop when the operator said no or could not be asked: exit 3, run ``halted``, and a reason
        that says how to go on (docs/scheduling.md)."""
        return Stop(
            f"wave {self.wave} ({_count(self.size, 'proxy', 'proxies')}) awaits confirmation: "
            "resume on a terminal to answer, or resume --yes",
            EXIT_STOPPED,
            RunStatus.HALTED,
        )


Decision = Start | WaitUntil | Stop | Confirm


class Phase(enum.StrEnum):
    """Where an instant falls against the run's window (``window_phase``)."""

    NONE = "none"  # the run has no window
    OPEN = "open"  # inside an occurrence, before its end minus the cutoff
    CLOSING = "closing"  # inside an occurrence, after the cutoff: no new upgrade, tracking goes on
    OUTSIDE = "outside"  # between occurrences, or after a one-off window


@dataclass(frozen=True)
class WindowState:
    """Where ``now`` falls: ``interval`` is the occurrence containing ``now`` or the next one (None:
    no window, or a one-off window that is over); ``last_start`` is its end minus the cutoff."""

    phase: Phase
    interval: Interval | None = None
    last_start: datetime | None = None


def window_phase(now: datetime, window: Window | None, cutoff: timedelta) -> WindowState:
    """The window's phase at ``now`` (aware), for ``dispatch`` and for ``status`` lines."""
    if window is None:
        return WindowState(Phase.NONE)
    interval = window.current_or_next(now)
    if interval is None:
        return WindowState(Phase.OUTSIDE)
    last_start = interval.end - cutoff
    if now not in interval:
        return WindowState(Phase.OUTSIDE, interval, last_start)
    return WindowState(Phase.OPEN if now < last_start else Phase.CLOSING, interval, last_start)


def dispatch(now: datetime, view: RunView) -> Decision:
    """May a new upgrade start at ``now`` (aware), and for which waves? See the module docstring for the
    order of the checks. Pure; raises ``ValueError`` only for a naive ``now``."""
    if now.tzinfo is None:
        raise ValueError("dispatch needs an aware datetime")
    now = now.astimezone(UTC)
    if view.to_start == 0 and view.in_flight == 0:
        return Start(view.wave_open, note="nothing left to start")
    state = window_phase(now, view.window, view.cutoff)
    stop = _breaker_stop(now, view, state) or _window_stop(now, view, state)
    if stop is not None:
        return stop
    decision = _waves(now, view, state)
    if isinstance(decision, Start) and state.phase is Phase.OPEN:
        # read at most once a second, an answer must not outlive the cutoff it was given under
        decision = replace(decision, until=state.last_start)
    return decision


def _breaker_stop(now: datetime, view: RunView, state: WindowState) -> Stop | None:
    if view.breaker is None or view.to_start == 0:
        return None
    failures = max(0, view.failures - view.failures_acked)
    if not view.breaker.exceeded(failures, view.finished):
        return None
    text = view.breaker.describe(failures, view.finished)
    tracking = view.in_flight > 0 and state.phase is not Phase.OUTSIDE
    if tracking:
        return Stop(
            f"halted: {text}; no new upgrade starts, "
            f"{_count(view.in_flight, 'upgrade', 'upgrades')} in flight tracked to their end",
            EXIT_HALTED,
            RunStatus.HALTED,
            new_upgrades_only=True,
            until=state.interval.end
            if state.interval is not None and state.phase is not Phase.NONE
            else None,
        )
    return Stop(
        f"halted: {text}; a person must decide: "
        "resume --ack to count failures anew, or resume --max-failures M",
        EXIT_HALTED,
        RunStatus.HALTED,
    )


def _window_stop(now: datetime, view: RunView, state: WindowState) -> Stop | WaitUntil | None:
    if state.phase in (Phase.NONE, Phase.OPEN):
        return None
    window = view.window
    assert window is not None
    interval = state.interval
    had_open = _had_open(window, view.cutoff, view.since.astimezone(UTC), now)
    if state.phase is Phase.CLOSING:
        assert interval is not None and state.last_start is not None
        if view.in_flight > 0 and (had_open or not view.wait_for_window):
            return Stop(
                f"no new upgrade after {format_instant(state.last_start, interval.zone)} (cutoff "
                f"{format_duration(view.cutoff)} before the window ends); tracking "
                f"{_count(view.in_flight, 'upgrade', 'upgrades')} "
                f"until {format_instant(interval.end, interval.zone)}",
                EXIT_STOPPED,
                RunStatus.PAUSED,
                new_upgrades_only=True,
                until=interval.end,
            )
        upcoming = window.current_or_next(interval.end)
    else:
        upcoming = interval
    if had_open:
        return Stop(_closed_reason(view, upcoming), EXIT_STOPPED, RunStatus.PAUSED)
    if upcoming is None:
        if state.phase is Phase.CLOSING:
            assert interval is not None and state.last_start is not None
            text = (
                f"too late in the maintenance window {window.describe()}: no new upgrade after "
                f"{format_instant(state.last_start, interval.zone)}; give a new one with --window"
            )
        else:
            text = f"the maintenance window {window.describe()} is over; give a new one with --window"
        return Stop(text, EXIT_STOPPED, RunStatus.PAUSED)
    opens = format_instant(upcoming.start, upcoming.zone)
    if view.wait_for_window:
        return WaitUntil(upcoming.start, f"waiting for the maintenance window opening {opens}")
    where = (
        "too late in the maintenance window"
        if state.phase is Phase.CLOSING
        else "outside the maintenance window"
    )
    return Stop(
        f"{where}; the next one opens {opens} (run again then, or use --wait-for-window)",
        EXIT_STOPPED,
        RunStatus.PAUSED,
    )


def _closed_reason(view: RunView, upcoming: Interval | None) -> str:
    text = (
        f"window closed: {_count(view.to_start, 'proxy', 'proxies')} not started; resume in the next window"
    )
    if upcoming is not None:
        text += f" (opens {format_instant(upcoming.start, upcoming.zone)})"
    else:
        text += " (give it with resume --window)"
    if view.in_flight > 0:
        text += f"; {_count(view.in_flight, 'upgrade', 'upgrades')} still in flight, reconciled on resume"
    return text


def _had_open(window: Window, cutoff: timedelta, since: datetime, now: datetime) -> bool:
    """Whether some moment in [since, now) was inside an occurrence before its end minus the cutoff."""
    moment = since
    for _ in range(_MAX_OCCURRENCES_SCANNED):
        interval = window.current_or_next(moment)
        if interval is None or interval.start >= now:
            return False
        if max(moment, interval.start) < min(interval.end - cutoff, now):
            return True
        moment = interval.end
    return False


def _waves(now: datetime, view: RunView, state: WindowState) -> Decision:
    if view.wave_open == 0:
        return Start(1, opens=True)
    current = view.wave_open
    if current >= view.waves:
        return Start(current)
    upcoming = current + 1
    if not view.open_waves_done:
        return Start(current, note=f"wave {upcoming} of {view.waves} waits for wave {current} to finish")
    if view.pause_between > timedelta(0) and view.open_waves_done_at is not None:
        opens = view.open_waves_done_at.astimezone(UTC) + view.pause_between
        if now < opens:
            zone: tzinfo = state.interval.zone if state.interval is not None else UTC
            ask_at = min(opens, state.last_start) if state.last_start is not None else opens
            return WaitUntil(
                ask_at,
                f"wave {upcoming} opens {format_instant(opens, zone)} after the "
                f"{format_duration(view.pause_between)} pause",
            )
    if view.confirm:
        return Confirm(upcoming, view.next_wave_size)
    return Start(upcoming, opens=True)


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"
