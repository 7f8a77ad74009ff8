"""The failure breaker trips when failures EXCEED the limit (Ansible's and SSM's semantics)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from orchestrator.schedule.breaker import Breaker, parse_max_failures


@pytest.mark.parametrize(
    ("spec", "failures", "finished", "exceeded"),
    [
        ("2", 0, 0, False),
        ("2", 2, 2, False),  # at the limit: not exceeded
        ("2", 3, 3, True),  # the third failure trips it
        ("2", 3, 100, True),
        ("0", 0, 10, False),
        ("0", 1, 1, True),  # zero tolerance: the first failure trips
        ("10%", 0, 0, False),
        ("10%", 1, 1, True),  # 1 > 10% of 1
        ("10%", 1, 10, False),  # 1 is exactly 10% of 10: not more
        ("10%", 2, 10, True),
        ("10%", 2, 25, False),  # 10% of 25 is 2.5
        ("10%", 3, 25, True),
        ("10%", 3, 30, False),  # exactly 3, computed without floating point
        ("10%", 4, 30, True),
        ("12.5%", 1, 8, False),
        ("12.5%", 2, 8, True),
        ("100%", 10, 10, False),  # can never exceed
        ("0%", 1, 100, True),
    ],
)
def test_exceeds(spec: str, failures: int, finished: int, exceeded: bool) -> None:
    assert parse_max_failures(spec).exceeded(failures, finished) is exceeded


def test_allowed_is_the_largest_count_within() -> None:
    assert parse_max_failures("2").allowed(1000) == 2
    assert parse_max_failures("10%").allowed(25) == 2
    assert parse_max_failures("10%").allowed(0) == 0


@pytest.mark.parametrize(
    ("spec", "failures", "finished", "text"),
    [
        ("2", 3, 5, "3 failures exceed the limit of 2"),
        ("2", 1, 5, "1 failure is within the limit of 2"),
        ("2", 2, 5, "2 failures are within the limit of 2"),
        ("0", 1, 1, "1 failure exceeds the limit of 0"),
        ("10%", 3, 20, "3 failures exceed 10% of 20 finished jobs (2)"),
        ("10%", 1, 1, "1 failure exceeds 10% of 1 finished job (0)"),
        ("2.5%", 0, 40, "0 failures are within 2.5% of 40 finished jobs (1)"),
    ],
)
def test_describe_names_count_and_threshold(spec: str, failures: int, finished: int, text: str) -> None:
    assert parse_max_failures(spec).describe(failures, finished) == text


def test_parse_and_spec_round_trip() -> None:
    assert parse_max_failures("2") == Breaker(count=2)
    assert parse_max_failures(2) == Breaker(count=2)
    assert parse_max_failures(" 10 % ") == Breaker(percent=Fraction(10))
    for spec in ("0", "2", "10%", "2.5%", "100%"):
        assert parse_max_failures(spec).spec() == spec
        assert parse_max_failures(parse_max_failures(spec).spec()) == parse_max_failures(spec)


@pytest.mark.parametrize("spec", ["", "-1", "two", "1.5", "101%", "-5%", "x%", "²"])
def test_parse_errors(spec: str) -> None:
    with pytest.raises(ValueError, match="failure limit"):
        parse_max_failures(spec)


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="either"):
        Breaker()
    with pytest.raises(ValueError, match="either"):
        Breaker(count=1, percent=Fraction(1))
    with pytest.raises(ValueError, match="negative"):
        Breaker(count=-1)
    with pytest.raises(ValueError, match="cannot read"):
        parse_max_failures(True)
