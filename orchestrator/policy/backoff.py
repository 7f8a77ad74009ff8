"""How long a job waits before its next attempt.

Full jitter (a uniform draw between 0 and the exponential ceiling) spreads thousands of jobs that failed
together, so a busy or throttling cloud is not hit again by the whole fleet at the same instant. The
random source is a parameter so tests (and replays) get exact delays.
"""

from __future__ import annotations

import math
import random

from pydantic import BaseModel, ConfigDict, Field

# Huawei advises retrying a throttled call (APIGW.0308) after 2-5 s; without a Retry-After the delay is
# drawn from this window, so throttled jobs neither retry too early nor all at the same moment.
THROTTLE_WINDOW: tuple[float, float] = (2.0, 5.0)


class Backoff(BaseModel):
    """Exponential backoff settings; ``initial: 0`` turns every delay into 0 (handy for tests and drills)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    initial: float = Field(default=2.0, ge=0.0)
    max: float = Field(default=120.0, ge=0.0)
    multiplier: float = Field(default=2.0, ge=1.0)
    max_attempts: int = Field(default=8, ge=1)


def backoff_delay(attempt: int, b: Backoff, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    uniform(0, min(max, initial * multiplier ** (attempt - 1))); huge attempt numbers saturate at ``max``
    instead of overflowing. Raises ValueError when ``attempt`` < 1.
    """
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    if b.initial == 0.0:
        return rng.uniform(0.0, 0.0)
    try:
        ceiling = min(b.max, b.initial * b.multiplier ** (attempt - 1))
    except OverflowError:
        ceiling = b.max
    return rng.uniform(0.0, ceiling)


def clean_retry_after(value: float | None) -> float | None:
    """A Retry-After the policy can use: negative or non-finite values are ignored, not trusted."""
    if value is None or not math.isfinite(value) or value < 0.0:
        return None
    return float(value)


def retry_delay(
    attempt: int, b: Backoff, rng: random.Random, *, retry_after: float | None, throttle: bool
) -> float:
    """The delay of a RETRY in seconds: the server's Retry-After wins when it is longer than our own
    backoff; a throttled answer without one waits at least THROTTLE_WINDOW (Huawei's advice for APIGW.0308).
    Raises ValueError when ``attempt`` < 1."""
    delay = backoff_delay(attempt, b, rng)
    if retry_after is not None:
        return max(delay, retry_after)
    if throttle:
        return max(delay, rng.uniform(*THROTTLE_WINDOW))
    return delay
