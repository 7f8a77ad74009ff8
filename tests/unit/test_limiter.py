"""The limiter's promises, checked on a virtual clock so minutes of traffic run in milliseconds.

Most tests run on ``VirtualTimeLoop`` (tests/virtual.py): an asyncio loop whose time jumps straight to the
next timer instead of waiting, so ``loop.time`` / ``asyncio.sleep`` are a consistent fake clock for the
limiter and for the simulated workers alike.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import pytest

from orchestrator.limiter import (
    DEFAULT_MARGIN_S,
    Limiter,
    LimiterStats,
    Rate,
    SlidingWindowLimiter,
    ThrottleAdapter,
    parse_rate,
)
from tests.virtual import VirtualTimeLoop, run_virtual


def max_in_window(starts: Sequence[float], period: float) -> int:
    """Most starts in any half-open window [x, x + period); the worst window begins at a start."""
    ordered = sorted(starts)
    best = 0
    j = 0
    for i, first in enumerate(ordered):
        j = max(j, i)
        while j < len(ordered) and ordered[j] < first + period:
            j += 1
        best = max(best, j - i)
    return best


def _virtual_limiter(rate: Rate, **kwargs: Any) -> SlidingWindowLimiter:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualTimeLoop)
    return SlidingWindowLimiter(rate, clock=loop.time, sleep=asyncio.sleep, **kwargs)


# --- parse_rate ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("10/s", 10, 1.0),
        ("300/min", 300, 60.0),
        ("5/sec", 5, 1.0),
        ("1000/h", 1000, 3600.0),
        ("1000/hour", 1000, 3600.0),
        ("2/m", 2, 60.0),
        (" 7 / Minute ", 7, 60.0),
        ("50/10s", 50, 10.0),
        ("5/2s", 5, 2.0),
        ("3/1.5s", 3, 1.5),
        ("1/500ms", 1, 0.5),
        ("10/SECONDS", 10, 1.0),
    ],
)
def test_parse_rate_accepts(text: str, count: int, period: float) -> None:
    assert parse_rate(text) == Rate(count, period)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected COUNT/PERIOD"),
        ("10", "expected COUNT/PERIOD"),
        ("10/", "expected COUNT/PERIOD"),
        ("/s", "expected COUNT/PERIOD"),
        ("10//s", "expected COUNT/PERIOD"),
        ("10/s/s", "expected COUNT/PERIOD"),
        ("0/s", "at least 1"),
        ("-1/s", "whole number"),
        ("+5/s", "whole number"),
        ("2.5/s", "'5/2s'"),
        ("1e3/s", "whole number"),
        ("1_000/s", "whole number"),
        ("\u0661\u0660/s", "whole number"),  # Arabic-Indic digits
        ("abc/s", "whole number"),
        ("10/x", "unknown period unit 'x'"),
        ("10/fortnight", "unknown period unit"),
        ("10/0s", "longer than zero"),
        ("10/0.0min", "longer than zero"),
        ("10/2d", "unknown period unit"),
        ("10/25h", "at most one day"),
        ("1000001/s", "at most 1000000"),
    ],
)
def test_parse_rate_rejects_with_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="invalid rate") as info:
        parse_rate(text)
    assert message in str(info.value)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(("count", "period"), [(0, 1.0), (-3, 1.0), (True, 1.0), (1, 0.0), (1, -1.0)])
def test_rate_rejects_nonsense(count: Any, period: Any) -> None:
    with pytest.raises(ValueError, match="rate"):
        Rate(count, period)


def test_rate_rejects_non_finite_period() -> None:
    for period in (math.inf, math.nan):
        with pytest.raises(ValueError, match="period"):
            Rate(1, period)


def test_rate_text_and_per_second() -> None:
    assert str(parse_rate("300/min")) == "300/60s"
    assert parse_rate("300/min").per_second == pytest.approx(5.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"margin": -0.01},
        {"margin": 1.0},
        {"margin": math.nan},
        {"min_fraction": 0.0},
        {"min_fraction": 1.5},
        {"recover_fraction": 0.0},
        {"recover_fraction": 2.0},
    ],
)
def test_limiter_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SlidingWindowLimiter(Rate(10, 1.0), **kwargs)


# --- the window property ---------------------------------------------------------------------------------


async def _random_traffic(
    rng: random.Random, limiter: SlidingWindowLimiter, workers: int, duration: float, throttle_p: float
) -> list[float]:
    """Bounded workers with random think and call times; some calls come back throttled."""
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    mean_gap = limiter.rate.period / limiter.rate.count

    async def worker() -> None:
        await asyncio.sleep(rng.expovariate(1 / mean_gap))
        while loop.time() < duration:
            await limiter.acquire()
            starts.append(loop.time())
            await asyncio.sleep(rng.choice([0.0, rng.uniform(0, mean_gap * 3)]))
            if rng.random() < throttle_p:
                limiter.throttled(rng.choice([None, rng.uniform(0, limiter.rate.period)]))
            if rng.random() < 0.3:
                await asyncio.sleep(rng.expovariate(1 / (mean_gap * workers)))

    await asyncio.gather(*(worker() for _ in range(workers)))
    return starts


async def _window_scenario(
    rng: random.Random, rate: Rate, margin: float, workers: int, throttle_p: float
) -> tuple[list[float], LimiterStats]:
    limiter = _virtual_limiter(rate, margin=margin)
    starts = await _random_traffic(rng, limiter, workers, rate.period * 6, throttle_p)
    return starts, limiter.stats


@pytest.mark.parametrize("margin", [0.0, DEFAULT_MARGIN_S])
def test_never_more_than_count_in_any_sliding_window(margin: float) -> None:
    for seed in range(150):
        rng = random.Random(seed)
        rate = Rate(rng.randint(1, 25), rng.choice([0.5, 1.0, 60.0]))
        workers = rng.choice([1, 3, 8, 40])
        throttle_p = rng.choice([0.0, 0.0, 0.01, 0.05])
        starts, stats = run_virtual(partial(_window_scenario, rng, rate, margin, workers, throttle_p))
        assert stats.starts == len(starts)
        assert len(starts) >= rate.count, f"seed {seed}: the limiter let too little through"
        assert max_in_window(starts, rate.period) <= rate.count, f"seed {seed}"
        if margin:
            # The server's view: arrivals shifted by up to ``margin`` still respect the window.
            shifted = [t + rng.uniform(0, margin) for t in starts]
            assert max_in_window(shifted, rate.period) <= rate.count, f"seed {seed}"


def test_saturated_workers_reach_the_configured_rate_not_more() -> None:
    """Under constant pressure every window is filled to the limit: the limiter is exact, not timid."""

    async def scenario() -> list[float]:
        limiter = _virtual_limiter(Rate(10, 1.0), margin=0.0)
        return await _random_traffic(random.Random(7), limiter, 30, 20.0, 0.0)

    starts = run_virtual(scenario)
    assert max_in_window(starts, 1.0) == 10
    assert max_in_window(starts, 1.0 + 1e-6) >= 11  # the next start comes the moment the window allows
    assert len(starts) >= 10 * 20


def test_head_sleeps_exactly_until_the_next_permit() -> None:
    """One sleep per permit that must wait, for exactly the gap the window needs: no polling."""
    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)
        now[0] += delay

    async def scenario() -> list[float]:
        limiter = SlidingWindowLimiter(Rate(3, 1.0), clock=lambda: now[0], sleep=fake_sleep, margin=0.02)
        granted = []
        for _ in range(7):
            await limiter.acquire()
            granted.append(now[0])
        return granted

    granted = asyncio.run(scenario())
    assert granted == pytest.approx([0, 0, 0, 1.02, 1.02, 1.02, 2.04])
    assert slept == pytest.approx([1.02, 1.02])


# --- FIFO ------------------------------------------------------------------------------------------------


def test_waiters_are_served_in_arrival_order() -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        loop = asyncio.get_running_loop()
        limiter = _virtual_limiter(Rate(2, 1.0))
        rng = random.Random(3)
        arrivals = sorted(((rng.uniform(0, 3), n) for n in range(30)), reverse=True)
        arrived: list[int] = []
        granted: list[int] = []

        async def one(at: float, n: int) -> None:
            await asyncio.sleep(at - loop.time())
            arrived.append(n)
            await limiter.acquire()
            granted.append(n)

        # Tasks are created in the reverse of their arrival order so creation order cannot explain FIFO.
        await asyncio.gather(*(one(at, n) for at, n in arrivals))
        return arrived, granted

    arrived, granted = run_virtual(scenario)
    assert granted == arrived
    assert arrived != sorted(arrived)  # the arrival order is not just the task numbering


def test_looping_workers_take_turns() -> None:
    async def scenario() -> list[int]:
        limiter = _virtual_limiter(Rate(1, 1.0))
        order: list[int] = []

        async def worker(n: int) -> None:
            for _ in range(4):
                await limiter.acquire()
                order.append(n)
                await asyncio.sleep(0.001)  # the call: everyone else is queued by the time it returns

        await asyncio.gather(*(worker(n) for n in range(5)))
        return order

    assert run_virtual(scenario) == [0, 1, 2, 3, 4] * 4


def test_cancelled_waiter_takes_no_permit_and_blocks_nobody() -> None:
    async def scenario() -> tuple[list[tuple[str, float]], int]:
        loop = asyncio.get_running_loop()
        limiter = _virtual_limiter(Rate(1, 1.0), margin=0.0)
        log: list[tuple[str, float]] = []

        async def one(name: str) -> None:
            await limiter.acquire()
            log.append((name, loop.time()))

        await one("first")
        head = asyncio.create_task(one("cancelled-head"))
        second = asyncio.create_task(one("queued"))
        await asyncio.sleep(0.5)
        head.cancel()
        await asyncio.gather(head, second, return_exceptions=True)
        return log, limiter.stats.starts

    log, starts = run_virtual(scenario)
    assert log == [("first", 0.0), ("queued", 1.0)]
    assert starts == 2


# --- throttling ------------------------------------------------------------------------------------------


class _ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _never_sleep(delay: float) -> None:
    raise AssertionError(f"unexpected sleep({delay})")


def test_throttle_halves_once_per_period_floors_and_recovers_to_the_configured_rate() -> None:
    clock = _ManualClock()
    limiter = SlidingWindowLimiter(Rate(10, 1.0), clock=clock, sleep=_never_sleep)
    assert limiter.stats.current_limit == 10
    assert limiter.stats.current_rate == pytest.approx(10.0)

    limiter.throttled()
    assert limiter.stats.current_limit == 5
    clock.now = 0.5
    limiter.throttled()  # in-flight calls of the same burst: counted, but no second halving
    assert (limiter.stats.current_limit, limiter.stats.throttle_events) == (5, 2)
    clock.now = 1.2
    limiter.throttled()
    assert limiter.stats.current_limit == 2  # floor(2.5)
    for t in (2.4, 3.6, 4.8):
        clock.now = t
        limiter.throttled()
    assert limiter.stats.current_limit == 1  # floor: max(1, 10 * min_fraction)
    assert limiter.stats.current_rate == pytest.approx(1.0)

    # Quiet from t=4.8: +1 (10% of 10) per full period, capped at the configured 10.
    seen = []
    for k in range(12):
        clock.now = 4.8 + k + 0.5
        seen.append(limiter.stats.current_limit)
    assert seen == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 10]
    clock.now = 1e6
    assert limiter.stats.current_limit == 10


def test_recovery_restarts_after_each_signal_and_floor_follows_min_fraction() -> None:
    clock = _ManualClock()
    limiter = SlidingWindowLimiter(
        Rate(100, 60.0), clock=clock, sleep=_never_sleep, min_fraction=0.3, recover_fraction=0.25
    )
    limiter.throttled()  # 50
    clock.now = 60.0
    limiter.throttled()  # 50 + 25 recovered = 75, halved to 37.5
    assert limiter.stats.current_limit == 37
    clock.now = 120.0
    limiter.throttled()  # 37.5 + 25 = 62.5, halved to 31.25
    assert limiter.stats.current_limit == 31
    clock.now = 179.0
    assert limiter.stats.current_limit == 31  # not a full quiet period yet
    clock.now = 180.0
    assert limiter.stats.current_limit == 56
    clock.now = 120.0 + 60 * 10
    assert limiter.stats.current_limit == 100
    assert SlidingWindowLimiter(Rate(100, 60.0), min_fraction=0.3).stats.current_limit == 100


def test_throttled_pause_holds_every_start_until_retry_after() -> None:
    async def scenario() -> tuple[list[float], int]:
        loop = asyncio.get_running_loop()
        limiter = _virtual_limiter(Rate(100, 1.0), margin=0.0)
        starts: list[float] = []

        async def call() -> None:
            await limiter.acquire()
            starts.append(loop.time())

        await call()
        limiter.throttled(2.5)
        limiter.throttled(1.0)  # a shorter pause does not cut the longer one
        await asyncio.gather(*(call() for _ in range(3)))
        await asyncio.sleep(10)
        limiter.throttled(0.0)
        await call()
        return starts, limiter.stats.throttle_events

    starts, events = run_virtual(scenario)
    assert starts == pytest.approx([0.0, 2.5, 2.5, 2.5, 12.5])
    assert events == 3


def test_reduced_limit_is_enforced_then_recovers_in_steps() -> None:
    async def scenario() -> tuple[list[float], float]:
        limiter = _virtual_limiter(Rate(20, 1.0), margin=0.0, recover_fraction=0.25)
        loop = asyncio.get_running_loop()
        starts: list[float] = []

        async def worker() -> None:
            while loop.time() < 8.0:
                await limiter.acquire()
                starts.append(loop.time())

        async def throttle_once() -> float:
            await asyncio.sleep(2.3)
            limiter.throttled()  # 20 -> 10; then 15 at 3.3, 20 at 4.3
            return loop.time()

        at = asyncio.create_task(throttle_once())
        await asyncio.gather(*(worker() for _ in range(40)))
        return starts, await at

    starts, at = run_virtual(scenario)

    def count(lo: float, hi: float) -> int:
        return sum(lo <= t < hi for t in starts)

    assert at == pytest.approx(2.3)
    assert max_in_window(starts, 1.0) == 20
    assert count(at - 1.0, at) == 20  # saturated before the signal
    assert count(at, at + 1.0) == 10  # halved
    assert count(at + 1.0, at + 2.0) == 15  # +25% of 20 after one quiet period
    assert count(at + 3.0, at + 4.0) == 20  # back to the configured rate, never above it
    assert max_in_window([t for t in starts if t >= at], 1.0) == 20


def test_waiting_head_wakes_at_a_recovery_step_instead_of_oversleeping() -> None:
    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        limiter = _virtual_limiter(Rate(2, 1.0), margin=0.0, min_fraction=0.5, recover_fraction=0.5)
        granted = []
        await limiter.acquire()  # t=0
        granted.append(loop.time())
        await asyncio.sleep(0.5)
        limiter.throttled()  # limit 1 until t=1.5, then 2
        for _ in range(2):
            await limiter.acquire()
            granted.append(loop.time())
        return granted

    # With limit 1 the third start would wait until 2.0; the step at 1.5 makes it legal then.
    assert run_virtual(scenario) == pytest.approx([0.0, 1.0, 1.5])


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_throttled_rejects_bad_retry_after(bad: float) -> None:
    limiter = SlidingWindowLimiter(Rate(5, 1.0))
    with pytest.raises(ValueError, match="retry_after"):
        limiter.throttled(bad)
    assert limiter.stats.throttle_events == 0
    with pytest.raises(ValueError, match="retry_after"):
        ThrottleAdapter(Rate(5, 1.0)).throttled(bad)


# --- stats -----------------------------------------------------------------------------------------------


def test_stats_count_waits_and_wait_time() -> None:
    async def scenario() -> Any:
        limiter = _virtual_limiter(Rate(2, 1.0), margin=0.0)
        await asyncio.gather(*(limiter.acquire() for _ in range(5)))
        return limiter.stats

    stats = run_virtual(scenario)
    # Starts at 0, 0, 1, 1, 2: the first two find a free permit; the third sleeps; the rest queue.
    assert stats.starts == 5
    assert stats.waits == 3
    assert stats.total_wait_s == pytest.approx(0 + 0 + 1 + 1 + 2)
    assert stats.throttle_events == 0


# --- real clock ------------------------------------------------------------------------------------------


async def test_real_clock_sanity_counts_only() -> None:
    limiter: Limiter = SlidingWindowLimiter(Rate(5, 0.1))
    starts: list[float] = []
    stop = time.monotonic() + 0.35

    async def worker() -> None:
        while time.monotonic() < stop:
            await limiter.acquire()
            starts.append(time.monotonic())

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(12))), timeout=10)
    assert max_in_window(starts, 0.1) <= 5
    assert len(starts) >= 10  # at least the first two windows' worth


async def test_throttle_adapter_counts_and_pause() -> None:
    slept: list[float] = []
    clock = _ManualClock()

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)
        clock.now += delay

    adapter: Limiter = ThrottleAdapter(Rate(3, 0.05), clock=clock, sleep=fake_sleep)
    starts: list[float] = []
    for _ in range(7):
        await adapter.acquire()
        starts.append(time.monotonic())
    assert max_in_window(starts, 0.049) <= 3  # 1 ms for the gap between its log and our record
    assert len(starts) == 7
    adapter.throttled(2.0)
    await adapter.acquire()
    assert slept == [2.0]


def _typed(limiter: Limiter) -> Callable[[], Awaitable[None]]:
    return limiter.acquire


def test_both_implementations_satisfy_the_protocol() -> None:
    assert callable(_typed(SlidingWindowLimiter(Rate(1, 1.0))))
    assert callable(_typed(ThrottleAdapter(Rate(1, 1.0))))


async def test_window_is_kept_on_send_times_not_grant_times() -> None:
    """A start whose request left late pushes the next permit out by as much (fake clock)."""
    now = [0.0]
    slept: list[float] = []

    async def sleep(d: float) -> None:
        slept.append(d)
        now[0] += d

    lim = SlidingWindowLimiter(Rate(2, 1.0), clock=lambda: now[0], sleep=sleep, margin=0.0)
    first = await lim.acquire()
    await lim.acquire()
    now[0] = 0.4
    first.sent()  # the first request only left at 0.4
    await lim.acquire()
    # without the send time the third start would be allowed at 1.0; with it, not before 1.0 (second
    # start, granted at 0.0) ... and the fourth not before 1.4 (the first one's real send time)
    assert now[0] == pytest.approx(1.0)
    await lim.acquire()
    assert now[0] == pytest.approx(1.4)
