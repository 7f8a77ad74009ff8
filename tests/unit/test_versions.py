"""orchestrator.versions: the one definition of a version and its order (and the simulator uses it)."""

from __future__ import annotations

import pytest

from orchestrator.simulator import scenario
from orchestrator.versions import VERSION_PATTERN, is_version, same_version, try_version_key, version_key


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("2.23.12.000", "2.24.03.000"),
        ("2.9", "2.10"),
        ("2.23.12.000", "2.23.12.001"),
        ("1.99.99.99.99", "2.0.0.0.1"),
        ("2.24", "2.24.0.1"),
        ("0.9", "1.0"),
    ],
)
def test_order_is_numeric_part_by_part(low: str, high: str) -> None:
    assert version_key(low) < version_key(high)
    assert version_key(high) > version_key(low)


@pytest.mark.parametrize(
    "spellings",
    [
        ("2.24", "2.24.0", "2.24.00.000", "2.24.0.0.0"),
        ("2.24.3", "2.24.03", "2.24.03.000", "02.024.003"),
        ("2.0", "2.00", "2.0.0.0.0"),
        ("0.0", "0.00.000"),
    ],
)
def test_trailing_zero_parts_do_not_count(spellings: tuple[str, ...]) -> None:
    keys = {version_key(v) for v in spellings}
    assert len(keys) == 1, keys
    assert all(same_version(a, b) for a in spellings for b in spellings)


def test_keys_are_the_numbers_without_trailing_zeros() -> None:
    assert version_key("2.24.03.000") == (2, 24, 3)
    assert version_key("2.0") == (2,)
    assert version_key("0.0") == (0,)
    assert version_key("999999999.1") == (999999999, 1)


BAD = [
    "2",  # one part
    "2.",
    ".2",
    "2..4",
    "2.x",
    "2.24.03.000.1.2",  # six parts
    "1234567890.1",  # ten digits in a part
    "２.24",  # a full-width digit: int() would read it
    "٢.24",  # an Arabic-Indic digit
    "2.24\n",  # a trailing newline: re's $ would let it through
    " 2.24",
    "",
    "1.-2",
    "+1.2",
    "v2.24",
    "2.24-rc1",
]


@pytest.mark.parametrize("bad", BAD)
def test_junk_is_refused(bad: str) -> None:
    assert not is_version(bad)
    with pytest.raises(ValueError, match="not a dotted version"):
        version_key(bad)
    assert try_version_key(bad) is None


def test_try_version_key_and_same_version_treat_unknown_as_unknown() -> None:
    assert try_version_key(None) is None
    assert try_version_key("2.24.03.000") == (2, 24, 3)
    assert same_version("weird", "weird")  # identical strings are the same, parsed or not
    assert not same_version("weird", "other")
    assert not same_version("weird", "2.24")
    assert not same_version("2.24", "2.25")


def test_the_message_echoes_the_value_cut_and_escaped() -> None:
    with pytest.raises(ValueError) as info:
        version_key("x" * 500 + "\n")
    text = str(info.value)
    assert "\n" not in text and len(text) < 120


def test_pattern_is_plain_ascii_regex_syntax() -> None:
    # the inventory hands this pattern to pydantic-core's Rust regex engine: no \d (Unicode in Python)
    assert "\\d" not in VERSION_PATTERN


def test_the_simulator_orders_versions_the_same_way() -> None:
    # the simulator once compared tuples of every part, so 2.24 and 2.24.0 were different versions
    assert scenario.version_key("2.24") == scenario.version_key("2.24.0") == version_key("2.24.00.000")
    assert scenario.version_key("2.10") > scenario.version_key("2.9")
    with pytest.raises(ValueError):
        scenario.version_key("2.x")
