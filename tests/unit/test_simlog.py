"""The gateway rate check of the integration tests (tests/simlog.py): it tolerates the simulator's
stamping lag, and it still catches a limiter that lets a burst through."""

from __future__ import annotations

import random
from typing import Any

import pytest

from orchestrator.limiter import DEFAULT_MARGIN_S
from tests.simlog import (
    ARRIVAL_JITTER_S,
    busiest_window,
    gateway_worst,
    max_in_window,
    sent_after_applied,
)

RATE, PERIOD = 10, 1.0


def limited_sends(demand: list[float], rate: int = RATE, period: float = PERIOD) -> list[float]:
    """When a client whose limiter follows the limiter's rule sends calls wanted at ``demand``: a call
    leaves once the call ``rate`` sends earlier is ``period + margin`` old (and not before the one before
    it)."""
    sent: list[float] = []
    for want in sorted(demand):
        t = want
        if sent:
            t = max(t, sent[-1])
        if len(sent) >= rate:
            t = max(t, sent[-rate] + period + DEFAULT_MARGIN_S)
        sent.append(t)
    return sent


def stamped(sends: list[float], stalls: list[tuple[float, float]]) -> list[float]:
    """``received_at`` as the simulator writes it: a call that arrives while its loop is stalled (in one
    of the ``(start, end)`` intervals) is stamped when the stall ends, with the others queued meanwhile."""
    out = []
    for s in sends:
        out.append(next((end for start, end in stalls if start <= s < end), s))
    return out


# ------------------------------------------------------------------------------ the window counter
def test_window_is_open_at_its_start_and_closed_at_its_end() -> None:
    assert max_in_window([], 1.0) == 0
    assert max_in_window([0.0, 1.0], 1.0) == 1  # exactly a period apart: never in one window
    assert max_in_window([0.0, 0.999], 1.0) == 2
    assert max_in_window([3.0, 0.5, 0.2, 2.0, 0.4], 1.0) == 3  # unsorted input
    assert max_in_window([5.0] * 4, 1.0) == 4
    with pytest.raises(ValueError):
        max_in_window([0.0], 0.0)


def test_busiest_window_names_the_calls_of_the_fullest_window() -> None:
    log = [
        {"seq": n, "route": "job", "received_at": 100.0 + t} for n, t in enumerate([0.0, 2.0, 2.3, 2.9, 4.0])
    ]
    assert busiest_window(log, 1.0) == [(1, "job", 2.0), (2, "job", 2.3), (3, "job", 2.9)]
    assert busiest_window([], 1.0) == []


# ------------------------------------------------------------------------------ the gateway check
def test_a_burst_of_rate_plus_one_within_10_ms_is_caught() -> None:
    # a well-behaved run at the rate, then a limiter slip: rate + 1 calls within 10 ms
    steady = limited_sends([k * 0.01 for k in range(60)])
    burst_at = steady[-1] + 3.0
    burst = [burst_at + k * 0.001 for k in range(RATE + 1)]
    assert gateway_worst(steady, PERIOD) <= RATE
    assert gateway_worst(steady + burst, PERIOD) == RATE + 1
    # ... even when the simulator stamps some of the burst late (the stall ends inside the burst)
    late = stamped(burst, [(burst_at - 0.1, burst_at + 0.004)])
    assert gateway_worst(steady + late, PERIOD) == RATE + 1


def test_a_limiter_one_call_over_per_period_is_caught() -> None:
    # a limiter that keeps RATE + 1 per period (an off-by-one) and sends them together each period
    sends = [p * (PERIOD + DEFAULT_MARGIN_S) + k * 0.002 for p in range(5) for k in range(RATE + 1)]
    assert gateway_worst(sends, PERIOD) == RATE + 1


def test_a_limiter_a_quarter_too_fast_is_caught_even_evenly_spread() -> None:
    # what the shortened window gives up is only a steady excess of under about a sixth
    sends = [k * PERIOD / (RATE * 1.25) for k in range(60)]
    assert gateway_worst(sends, PERIOD) > RATE


def test_rate_calls_evenly_spread_with_100_ms_stamping_lag_are_not_flagged() -> None:
    # a client at the limit, evenly spread: one call per (period + margin) / rate = 105 ms
    spacing = (PERIOD + DEFAULT_MARGIN_S) / RATE
    sends = limited_sends([k * spacing for k in range(60)])
    assert max_in_window(sends, PERIOD) == RATE  # at send time the limit holds
    # the simulator's loop stalls for 100 ms now and then, stamping the calls queued meanwhile at once
    stalls = [(t, t + 0.1) for t in (0.0, 1.3, 2.71, 4.0, 5.25)]
    stamps = stamped(sends, stalls)
    assert stamps != sends and max(s - t for s, t in zip(stamps, sends, strict=True)) <= 0.1
    assert max_in_window(stamps, PERIOD) == RATE + 1  # a full-period window over the stamps: a false alarm
    assert gateway_worst(stamps, PERIOD) <= RATE  # the gateway check: no alarm


@pytest.mark.parametrize("seed", range(20))
def test_any_stamping_lag_up_to_the_jitter_is_tolerated_and_bursts_are_not(seed: int) -> None:
    rng = random.Random(seed)
    demand = sorted(rng.uniform(0, 8) for _ in range(200))  # far more than the limit: saturated
    sends = limited_sends(demand)
    stamps = [s + rng.uniform(0, ARRIVAL_JITTER_S) for s in sends]
    assert gateway_worst(stamps, PERIOD) <= RATE
    # the same run with one slip of the limiter: rate + 1 calls within 10 ms somewhere
    at = rng.uniform(10, 20)
    slip = [at + rng.uniform(0, 0.01) for _ in range(RATE + 1)]
    assert gateway_worst(stamps + slip, PERIOD) > RATE


# ------------------------------------------------------------------------------ upgrade calls
def test_sent_after_applied_finds_only_calls_after_an_applied_one() -> None:
    def up(seq: int, proxy: str, effect: str) -> dict[str, Any]:
        return {"seq": seq, "route": "upgrade", "proxy_id": proxy, "effect": effect}

    log = [
        up(1, "a", "none"),  # refused, then applied: fine
        up(4, "a", "applied"),
        up(2, "b", "applied"),  # applied, then sent again: wrong even though refused
        up(5, "b", "none"),
        up(3, "c", "none"),  # never applied
        {"seq": 6, "route": "job", "proxy_id": "a", "effect": None},
    ]
    assert sent_after_applied(log) == {"b": [log[2], log[3]]}
