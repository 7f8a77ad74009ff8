"""Canary waves: Ansible-style serial lists with percentages rounding up, and the three orders."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from fractions import Fraction

import pytest

from orchestrator.schedule.waves import (
    ALL_AT_ONCE,
    WaveOrder,
    WaveSpec,
    WaveStep,
    assign_waves,
    new_seed,
    order_keys,
    parse_waves,
    wave_numbers,
)


@pytest.mark.parametrize(
    ("spec", "total", "sizes"),
    [
        ("1,5,25%,100%", 100, [1, 5, 25, 69]),
        ("1,5,25%,100%", 10, [1, 5, 3, 1]),  # 25% of 10 is 2.5: rounds up to 3
        ("1,5,25%", 100, [1, 5, 25, 25, 25, 19]),  # the last entry repeats
        ("25%", 10, [3, 3, 3, 1]),
        ("10%", 30, [3] * 10),  # exact: 10% of 30 is 3, not 3.0000000000000004 rounded up to 4
        ("1%", 30, [1] * 30),  # 0.3 rounds up to 1: never an empty wave
        ("12.5%", 16, [2] * 8),
        ("33%", 10, [4, 4, 2]),  # Ansible's int() would give 3, 3, 3, 1
        ("2", 5, [2, 2, 1]),
        ("1,100%", 1, [1]),
        ("5,100%", 3, [3]),
        ("100%", 7, [7]),
        ("1,5,25%", 0, []),
    ],
)
def test_sizes(spec: str, total: int, sizes: list[int]) -> None:
    parsed = parse_waves(spec)
    assert parsed.sizes(total) == sizes
    assert sum(sizes) == total
    assert list(wave_numbers(total, parsed)) == [n for n, size in enumerate(sizes, 1) for _ in range(size)]


def test_parse_accepts_yaml_lists_and_normalises() -> None:
    assert parse_waves([1, 5, "25%"]) == parse_waves(" 1 , 5, 25 %")
    assert parse_waves("1,5,25%,100%").describe() == "1,5,25%,100%"
    assert parse_waves("12.50%,50%").describe() == "12.5%,50%"
    assert parse_waves("1,5,25%").steps[2] == WaveStep(percent=Fraction(25))
    assert ALL_AT_ONCE.sizes(42) == [42]
    for spec in ("1,5,25%,100%", "12.5%", "3"):
        assert parse_waves(parse_waves(spec).describe()) == parse_waves(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty wave list"),
        ("0", "at least 1 proxy"),
        ("0%", "above 0%"),
        ("101%", "at most 100%"),
        ("-1", "cannot read wave size"),
        ("1,,5", "cannot read wave size"),
        ("five", "cannot read wave size"),
        ("x%", "cannot read wave size"),
        ("1.5", "cannot read wave size"),
        ("²", "cannot read wave size"),
    ],
)
def test_parse_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_waves(spec)


def test_parse_refuses_booleans_from_yaml() -> None:
    with pytest.raises(ValueError, match="not a count"):
        parse_waves([True])


def test_negative_total_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        WaveSpec((WaveStep(count=1),)).sizes(-1)


ROWS = [
    (10, "inst-b", "px-1"),
    (11, "inst-a", "px-2"),
    (12, "inst-b", "px-3"),
    (13, "inst-c", "px-4"),
    (14, "inst-a", "px-5"),
]


def test_inventory_order_is_the_given_order() -> None:
    assert order_keys(ROWS, "inventory") == [10, 11, 12, 13, 14]


def test_instance_order_groups_by_instance_keeping_inventory_order_inside() -> None:
    assert order_keys(ROWS, WaveOrder.INSTANCE) == [11, 14, 10, 12, 13]


def test_shuffle_is_reproducible_and_independent_of_input_order() -> None:
    first = order_keys(ROWS, "shuffle", seed=7)
    assert sorted(first) == [10, 11, 12, 13, 14]
    assert order_keys(list(reversed(ROWS)), "shuffle", seed=7) == first
    many = [(i, f"inst-{i % 17}", f"px-{i}") for i in range(200)]
    orders = {tuple(order_keys(many, "shuffle", seed=s)) for s in range(5)}
    assert len(orders) == 5  # different seeds, different orders
    assert order_keys(many, "shuffle", seed=3) == order_keys(many, "shuffle", seed=3)
    assert order_keys(many, "shuffle", seed=3) != [row[0] for row in many]


def test_shuffle_does_not_depend_on_hash_randomisation() -> None:
    code = (
        "from orchestrator.schedule.waves import order_keys\n"
        "rows = [(i, f'inst-{i % 7}', f'px-{i}') for i in range(50)]\n"
        "print(order_keys(rows, 'shuffle', seed='run-42'))\n"
    )
    outputs = set()
    for hash_seed in ("1", "2", "random"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(done.stdout)
    assert len(outputs) == 1


def test_unknown_order_is_refused() -> None:
    with pytest.raises(ValueError, match="random"):
        order_keys(ROWS, "random")


def test_assign_waves_pairs_order_and_numbers() -> None:
    assert assign_waves(ROWS, parse_waves("1,2"), "instance") == [(11, 1), (14, 2), (10, 2), (12, 3), (13, 3)]


@pytest.mark.parametrize("order", list(WaveOrder))
def test_hundred_thousand_rows_order_quickly(order: WaveOrder) -> None:
    rows = [(i, f"instance-{i % 4000:05d}", f"proxy-{i:06d}") for i in range(100_000)]
    started = time.process_time()
    waves = assign_waves(rows, parse_waves("1,5,25%,100%"), order, seed=12345)
    elapsed = time.process_time() - started
    assert len(waves) == 100_000 and waves[-1][1] == 4
    assert elapsed < 1.0, f"{order}: {elapsed:.2f} s of CPU"


def test_new_seed_fits_an_integer_column() -> None:
    seeds = {new_seed() for _ in range(20)}
    assert all(0 <= s < 2**31 for s in seeds) and len(seeds) > 1
