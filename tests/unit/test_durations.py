"""parse_duration / format_duration: what operators type for --cutoff, --pause-between and window lengths."""

from __future__ import annotations

from datetime import timedelta

import pytest

from orchestrator.schedule.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", timedelta(minutes=30)),
        ("10s", timedelta(seconds=10)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2h", timedelta(hours=2)),
        ("90s", timedelta(seconds=90)),
        ("1d", timedelta(days=1)),
        ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ("1h 30m", timedelta(hours=1, minutes=30)),
        (" 45M ", timedelta(minutes=45)),
        ("0s", timedelta(0)),
        ("PT30M", timedelta(minutes=30)),
        ("pt30m", timedelta(minutes=30)),
        ("PT4H", timedelta(hours=4)),
        ("P1DT2H", timedelta(days=1, hours=2)),
        ("PT1.5H", timedelta(hours=1, minutes=30)),
        ("P1W", timedelta(days=7)),
        ("PT0S", timedelta(0)),
    ],
)
def test_accepted_forms(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty duration"),
        ("   ", "empty duration"),
        ("30", "has no unit; write 30s or 30m"),
        ("-5m", "negative"),
        ("-PT5M", "negative"),
        ("1m1h", "cannot read duration"),
        ("5 minutes", "cannot read duration"),
        ("1.5h", "cannot read duration"),
        ("30ms", "cannot read duration"),
        ("٣m", "cannot read duration"),  # a non-ASCII digit that int() would accept
        ("P", "has no value"),
        ("PT", "has no value"),
        ("P1M", "years or months"),
        ("P1Y", "years or months"),
        ("PXT", "has no value"),
        ("PT5X", "cannot read ISO 8601 duration"),
    ],
)
def test_refused_forms_say_what_is_expected(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_duration(text)
    assert "\n" not in str(caught.value)  # one line: it becomes a CLI error


def test_format_is_the_compact_inverse() -> None:
    for text in ("30m", "10s", "1h30m", "2h", "1d", "1d2h3m4s", "0s"):
        assert format_duration(parse_duration(text)) == text
    assert format_duration(timedelta(seconds=90)) == "1m30s"
    assert format_duration(timedelta(seconds=10.7)) == "10s"
    with pytest.raises(ValueError, match="negative"):
        format_duration(timedelta(seconds=-1))
