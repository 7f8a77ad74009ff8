"""Run-wide limit on how often cloud calls may start.

The gateway counts calls per user in a window ("limit:N, time:1 second|minute") and answers the excess
with APIGW.0308, so the orchestrator must keep its own starts under the limit in *every* sliding window,
not just on average. ``SlidingWindowLimiter`` does that exactly: a start is allowed once the start that
came ``limit`` starts earlier is at least ``period + margin`` old. Waiters queue in FIFO order behind one
head, and only the head sleeps, for exactly as long as the next permit needs, so waiting costs one timer
per permit however many workers wait. When the gateway throttles anyway, ``throttled()`` pauses every
start and halves the effective limit; the limit then creeps back by a fixed step per quiet period.

Why not a library: asyncio-throttle polls every 10 ms with no queue, and aiolimiter is a leaky bucket
that lets twice the limit through in the first window. The measurements are in ``docs/limiter.md``.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

DEFAULT_MARGIN_S = 0.05
"""Extra seconds between the N-th previous start and the next one.

Requests reach the gateway after a variable network delay; if that delay differs by up to ``d`` between
two calls, the server sees their distance shrink by up to ``d``. A margin of ``d`` keeps the server's
view inside the limit too. 50 ms covers ordinary jitter on a healthy path (and tens of ms seen at the
simulator on a loaded machine) while costing 5% of a 1-second window (0.08% of a minute)."""

DECREASE_FACTOR = 0.5
"""Multiplicative decrease applied to the effective limit on a throttle signal (at most once a period)."""

MAX_COUNT = 1_000_000
"""Largest count ``parse_rate`` accepts: the limiter keeps one timestamp per permit of the window."""

MAX_PERIOD_S = 86_400.0
"""Longest period ``parse_rate`` accepts (one day)."""

_MIN_SLEEP_S = 1e-6
"""Floor on one sleep, so a timer that fires a hair early (or a coarse clock) cannot spin the head."""

_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hrs": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
}

_RATE_RE = re.compile(
    r"""^\s*(?P<count>[^/\s]+)\s*/\s*(?P<mult>[0-9]+(?:\.[0-9]+)?)?\s*(?P<unit>[A-Za-z]+)\s*$"""
)
_WHOLE_RE = re.compile(r"^[0-9]+$")
_DECIMAL_RE = re.compile(r"^[0-9]*\.[0-9]+$|^[0-9]+\.[0-9]*$")

_RATE_HELP = "expected COUNT/PERIOD such as '10/s', '300/min', '1000/h' or '50/10s'"


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``count`` call starts in any window of ``period`` seconds."""

    count: int
    period: float

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"rate count must be a positive whole number, got {self.count!r}")
        if not (isinstance(self.period, int | float) and math.isfinite(self.period) and self.period > 0):
            raise ValueError(f"rate period must be a positive number of seconds, got {self.period!r}")

    @property
    def per_second(self) -> float:
        """The average starts per second the rate allows (``count / period``)."""
        return self.count / self.period

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}s"


def parse_rate(text: str) -> Rate:
    """Parse ``COUNT/[N]UNIT`` (``10/s``, ``300/min``, ``1000/h``, ``50/10s``, ``1/500ms``).

    COUNT must be a whole number: a fractional count has no meaning for a window of discrete starts, and
    any fractional rate can be written with a longer period (2.5/s is ``5/2s``). Units are case-insensitive.
    Raises ``ValueError`` naming the problem (a bad shape, a count outside 1..``MAX_COUNT``, an unknown
    unit, a period that is zero or longer than ``MAX_PERIOD_S``).
    """
    match = _RATE_RE.match(text)
    if match is None:
        raise ValueError(f"invalid rate {text!r}: {_RATE_HELP}")
    count_text, mult_text, unit_text = match.group("count", "mult", "unit")
    if not _WHOLE_RE.match(count_text):
        hint = ""
        if _DECIMAL_RE.match(count_text):
            hint = " (use a longer period for a fractional rate, e.g. '5/2s' for 2.5 per second)"
        raise ValueError(f"invalid rate {text!r}: COUNT must be a positive whole number{hint}")
    count = int(count_text)
    if count < 1:
        raise ValueError(f"invalid rate {text!r}: COUNT must be at least 1")
    if count > MAX_COUNT:
        raise ValueError(f"invalid rate {text!r}: COUNT must be at most {MAX_COUNT}")
    unit = _UNITS.get(unit_text.lower())
    if unit is None:
        units = ", ".join(sorted(set(_UNITS), key=lambda u: (_UNITS[u], u)))
        raise ValueError(f"invalid rate {text!r}: unknown period unit {unit_text!r} (one of: {units})")
    period = (float(mult_text) if mult_text is not None else 1.0) * unit
    if period <= 0:
        raise ValueError(f"invalid rate {text!r}: the period must be longer than zero")
    if period > MAX_PERIOD_S:
        raise ValueError(f"invalid rate {text!r}: the period must be at most one day")
    return Rate(count=count, period=period)


class Limiter(Protocol):
    """What the engine needs: wait for a start permit; report that the gateway throttled us."""

    async def acquire(self) -> Start | None:
        """Wait until a call may start. Returns the permit, whose ``sent()`` the caller calls when the
        request leaves, or None from a limiter that keeps no send times."""
        ...

    def throttled(self, retry_after: float | None = None) -> None:
        """The gateway throttled a call (APIGW.0308 / HTTP 429): pause starts for ``retry_after`` seconds
        when given (the parsed ``Retry-After``) and slow down where the limiter can. Raises ``ValueError``
        for a negative or non-finite ``retry_after``."""
        ...


@dataclass(frozen=True, slots=True)
class LimiterStats:
    """A snapshot for progress lines and the run report."""

    current_rate: float  # effective starts per second right now (configured rate unless throttled)
    current_limit: int  # effective starts per window right now
    starts: int  # permits granted so far
    waits: int  # acquisitions that did not get a permit at once (queued or slept)
    total_wait_s: float  # seconds spent in acquire(), summed over all acquisitions
    throttle_events: int  # throttled() calls so far


def _check_retry_after(retry_after: float | None) -> None:
    if retry_after is not None and not (math.isfinite(retry_after) and retry_after >= 0):
        raise ValueError(f"retry_after must be a finite number of seconds >= 0, got {retry_after!r}")


class Start:
    """One granted start. ``sent()`` moves it to when the request really left: the window is kept on
    send times, so a burst that left late (a busy event loop) cannot time the next burst too early."""

    __slots__ = ("_clock", "at")

    def __init__(self, at: float, clock: Clock) -> None:
        self.at = at
        self._clock = clock

    def sent(self) -> None:
        """Record that the request left now (on the limiter's clock); a start is never moved earlier."""
        self.at = max(self.at, self._clock())


class SlidingWindowLimiter:
    """Exact sliding-window start limiter with FIFO waiters and AIMD slowdown on throttling.

    Rule: with effective limit ``k``, a start at ``t`` is allowed when fewer than ``k`` starts are
    recorded or ``t >= start[-k] + period + margin``, and ``t`` is past any throttle pause. Hence no
    half-open window ``[x, x + period)`` ever holds more than ``k`` starts.

    Slowdown: each ``throttled()`` call pauses starts until ``now + retry_after`` (when given) and, at most
    once per period, multiplies the effective limit by ``DECREASE_FACTOR`` (never below
    ``max(1, floor(count * min_fraction))``). Rapid 429s from calls already in flight thus count as one
    signal. Each full period after the last throttle signal adds ``count * recover_fraction`` back, up to
    the configured count and never above it.
    """

    def __init__(
        self,
        rate: Rate,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        margin: float = DEFAULT_MARGIN_S,
        min_fraction: float = 0.1,
        recover_fraction: float = 0.1,
    ) -> None:
        if not (math.isfinite(margin) and 0 <= margin < rate.period):
            raise ValueError(f"margin must be >= 0 and shorter than the period, got {margin!r}")
        if not (0 < min_fraction <= 1):
            raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction!r}")
        if not (0 < recover_fraction <= 1):
            raise ValueError(f"recover_fraction must be in (0, 1], got {recover_fraction!r}")
        self._rate = rate
        self._clock = clock
        self._sleep = sleep
        self._margin = margin
        self._floor = max(1, math.floor(rate.count * min_fraction))
        self._step = rate.count * recover_fraction
        self._starts: deque[Start] = deque()
        self._lock = asyncio.Lock()  # FIFO: a free lock is never taken past a queued waiter
        self._paused_until = -math.inf
        self._base_limit = float(rate.count)  # effective limit just after the last throttle signal
        self._throttled_at: float | None = None
        self._decreased_at: float | None = None
        self._granted = 0
        self._waits = 0
        self._total_wait = 0.0
        self._throttle_events = 0

    @property
    def rate(self) -> Rate:
        """The configured rate (the effective one after throttling is in ``stats``)."""
        return self._rate

    @property
    def margin(self) -> float:
        """Seconds added to ``period`` between a start and the start ``limit`` places later."""
        return self._margin

    async def acquire(self) -> Start:
        """Return once this caller may start a call; callers are served in arrival order. Call
        ``sent()`` on the result when the request leaves (optional: the grant time counts otherwise)."""
        requested = self._clock()
        waited = self._lock.locked()
        async with self._lock:
            while True:
                now = self._clock()
                permit_at = self._permit_at(now)
                if now >= permit_at:
                    break
                waited = True
                # A recovery step may raise the limit before ``permit_at``: wake then and look again.
                wake_at = min(permit_at, self._next_step_at(now))
                await self._sleep(max(wake_at - now, _MIN_SLEEP_S))
            start = Start(now, self._clock)
            self._starts.append(start)
            self._granted += 1
        if waited:
            self._waits += 1
        self._total_wait += max(0.0, now - requested)
        return start

    def throttled(self, retry_after: float | None = None) -> None:
        """The gateway said "too many": pause all starts and slow down (see the class docstring).

        ``retry_after`` is in seconds; raises ``ValueError`` when it is negative or not finite."""
        _check_retry_after(retry_after)
        now = self._clock()
        self._throttle_events += 1
        if retry_after is not None:
            self._paused_until = max(self._paused_until, now + retry_after)
        current = self._limit_float(now)
        if self._decreased_at is None or now - self._decreased_at >= self._rate.period:
            current = max(float(self._floor), current * DECREASE_FACTOR)
            self._decreased_at = now
        self._base_limit = current
        self._throttled_at = now

    @property
    def stats(self) -> LimiterStats:
        """A snapshot of the effective limit (as of the clock now) and of the counters."""
        limit = self._limit(self._clock())
        return LimiterStats(
            current_rate=limit / self._rate.period,
            current_limit=limit,
            starts=self._granted,
            waits=self._waits,
            total_wait_s=self._total_wait,
            throttle_events=self._throttle_events,
        )

    def _limit_float(self, now: float) -> float:
        if self._throttled_at is None:
            return float(self._rate.count)
        steps = max(0, math.floor((now - self._throttled_at) / self._rate.period))
        return min(float(self._rate.count), self._base_limit + steps * self._step)

    def _limit(self, now: float) -> int:
        # The epsilon keeps 0.1 * 30 steps from landing on 2.9999999 and losing a permit.
        return max(self._floor, min(self._rate.count, math.floor(self._limit_float(now) + 1e-9)))

    def _permit_at(self, now: float) -> float:
        """Earliest time the head may start under the limit in force at ``now``."""
        limit = self._limit(now)
        at = self._paused_until
        # starts older than a window can no longer hold anything back (they are mostly in order; one
        # left behind only costs a little memory until the next start passes it)
        horizon = now - self._rate.period - self._margin
        while self._starts and self._starts[0].at <= horizon:
            self._starts.popleft()
        if len(self._starts) >= limit:
            # the limit-th latest start (send times may have moved a start later than its grant)
            kth = heapq.nlargest(limit, (st.at for st in self._starts))[-1]
            at = max(at, kth + self._rate.period + self._margin)
        return at

    def _next_step_at(self, now: float) -> float:
        """When the next recovery step raises the limit (infinity when nothing is left to recover)."""
        if self._throttled_at is None or self._limit(now) >= self._rate.count:
            return math.inf
        steps = max(0, math.floor((now - self._throttled_at) / self._rate.period))
        return self._throttled_at + (steps + 1) * self._rate.period


class ThrottleAdapter:
    """asyncio-throttle's ``Throttler`` behind the ``Limiter`` protocol, kept for the comparison bench.

    It counts starts in a sliding window but polls every ``retry_interval`` with no queue, and reads
    ``time.monotonic`` itself, so only the throttle pause here uses the injected clock and sleep.
    ``throttled()`` pauses starts; it cannot lower the rate.
    """

    def __init__(
        self,
        rate: Rate,
        *,
        retry_interval: float = 0.01,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        from asyncio_throttle.throttler import Throttler  # imported here: the dependency stays optional

        self._throttler = Throttler(rate_limit=rate.count, period=rate.period, retry_interval=retry_interval)
        self._clock = clock
        self._sleep = sleep
        self._paused_until = -math.inf

    async def acquire(self) -> None:
        """Wait out any throttle pause, then for the wrapped throttler's permit (it keeps no send times,
        so this returns None)."""
        while (delay := self._paused_until - self._clock()) > 0:
            await self._sleep(delay)
        await self._throttler.acquire()  # type: ignore[no-untyped-call]  # the library is untyped

    def throttled(self, retry_after: float | None = None) -> None:
        """Pause starts for ``retry_after`` seconds when given; the rate stays as configured. Raises
        ``ValueError`` when ``retry_after`` is negative or not finite."""
        _check_retry_after(retry_after)
        if retry_after is not None:
            self._paused_until = max(self._paused_until, self._clock() + retry_after)
