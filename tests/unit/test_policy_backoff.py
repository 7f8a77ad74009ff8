"""Full-jitter exponential backoff."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from orchestrator.policy import Backoff, backoff_delay


class TopRng(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def test_ceiling_grows_exponentially_up_to_max() -> None:
    b = Backoff()
    assert [backoff_delay(n, b, TopRng()) for n in range(1, 10)] == [2, 4, 8, 16, 32, 64, 120, 120, 120]


def test_draws_stay_within_zero_and_the_ceiling_and_spread() -> None:
    b = Backoff(initial=1.5, max=50.0, multiplier=3.0)
    rng = random.Random(2024)
    for attempt in range(1, 8):
        ceiling = min(50.0, 1.5 * 3.0 ** (attempt - 1))
        draws = [backoff_delay(attempt, b, rng) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) > 0.8 * ceiling and min(draws) < 0.2 * ceiling  # full jitter, not a fixed delay


def test_huge_attempt_numbers_saturate_instead_of_overflowing() -> None:
    assert backoff_delay(100_000, Backoff(), TopRng()) == 120.0
    assert backoff_delay(100_000, Backoff(initial=0.0), TopRng()) == 0.0


def test_zero_initial_is_a_zero_delay_switch() -> None:
    b = Backoff(initial=0.0)
    assert {backoff_delay(n, b, random.Random(n)) for n in range(1, 20)} == {0.0}


def test_same_seed_same_delays() -> None:
    a = [backoff_delay(n, Backoff(), random.Random(5)) for n in range(1, 9)]
    b = [backoff_delay(n, Backoff(), random.Random(5)) for n in range(1, 9)]
    assert a == b


def test_attempts_start_at_one() -> None:
    with pytest.raises(ValueError):
        backoff_delay(0, Backoff(), random.Random())


def test_defaults() -> None:
    assert Backoff().model_dump() == {"initial": 2.0, "max": 120.0, "multiplier": 2.0, "max_attempts": 8}


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": -1.0}, {"max": -1.0}, {"multiplier": 0.5}, {"max_attempts": 0}, {"initial": float("inf")}],
)
def test_invalid_backoff(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        Backoff.model_validate(kwargs)
