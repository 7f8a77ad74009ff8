"""The run-wide controls (window, waves, failure breaker) as one function of a read of the run, shared by
the processes that run jobs (``app/runtime.py``) and by ``status``, which says what holds the next upgrade
back without loading the cloud client."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from orchestrator.options import RunOptions
from orchestrator.schedule.dispatch import RunView, dispatch
from orchestrator.store import RunState


def make_decider(options: RunOptions, *, since: datetime, confirm: bool) -> Callable[[RunState, int], Any]:
    """The run-wide controls as a function of one read of the run (and failures recorded since)."""
    window = options.window_spec()
    cutoff = options.cutoff_delta()
    pause = options.pause_delta()
    breaker = options.breaker()

    def decide(state: RunState, extra_failures: int) -> Any:
        view = RunView(
            to_start=state.not_started,
            in_flight=state.in_flight,
            since=since,
            window=window,
            cutoff=cutoff,
            wait_for_window=options.wait_for_window,
            breaker=breaker,
            failures=state.failures + extra_failures,
            failures_acked=min(state.run.failures_acked, state.failures + extra_failures),
            finished=state.finished + extra_failures,
            wave_open=min(state.run.wave_open, state.waves),
            waves=state.waves,
            open_waves_done=state.open_unfinished == 0,
            open_waves_done_at=state.last_wave_finished_at,
            next_wave_size=state.next_wave_size,
            pause_between=pause,
            confirm=confirm,
        )
        return dispatch(state.db_now, view)

    return decide
