"""Maintenance windows: ISO 8601 intervals, weekly schedules, IANA zones and DST, on explicit instants."""

from __future__ import annotations

import zoneinfo
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from orchestrator.schedule.window import (
    Interval,
    OneOffWindow,
    WeeklyWindow,
    check_cutoff,
    first_instant,
    format_instant,
    parse_window,
    zone_name,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


# --- ISO 8601 intervals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "2026-12-05T01:00:00+08:00/PT4H",
        "2026-12-05T01:00:00+08:00/2026-12-05T05:00:00+08:00",
        "2026-12-05T01:00:00+08:00/2026-12-05T05:00:00",  # END takes START's offset
        "2026-12-04T17:00:00Z/2026-12-04T21:00:00Z",
        "2026-12-05T01:00+08:00/4h",
        "PT4H/2026-12-05T05:00:00+08:00",
        " 2026-12-05T01:00:00+08:00 / PT4H ",
    ],
)
def test_iso_interval_forms_give_the_same_four_hours(spec: str) -> None:
    window = parse_window(spec)
    assert isinstance(window, OneOffWindow)
    assert not window.recurring
    assert window.interval == Interval(utc(2026, 12, 4, 17), utc(2026, 12, 4, 21))
    assert window.shortest() == timedelta(hours=4)


def test_iso_interval_describe_is_normalised_and_round_trips() -> None:
    by_length = parse_window("2026-12-05T01:00+08:00/4h")
    assert by_length.describe() == "2026-12-05T01:00:00+08:00/PT4H"
    by_end = parse_window("2026-12-04T17:00Z/2026-12-04T21:00Z")
    assert by_end.describe() == "2026-12-04T17:00:00+00:00/2026-12-04T21:00:00+00:00"
    for window in (by_length, by_end):
        assert parse_window(window.describe()) == window
        assert str(window) == window.describe()


def test_one_off_current_or_next_then_none_once_over() -> None:
    window = parse_window("2026-12-05T01:00:00+08:00/PT4H")
    interval = window.current_or_next(utc(2026, 12, 1))
    assert interval is not None and interval.start == utc(2026, 12, 4, 17)
    assert window.current_or_next(utc(2026, 12, 4, 20, 59)) == interval
    assert window.current_or_next(utc(2026, 12, 4, 21)) is None  # the end is exclusive
    assert window.current_or_next(utc(2027, 1, 1)) is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("2026-12-05T01:00:00/PT4H", r"has no UTC offset; add one, e.g\. 2026-12-05T01:00:00\+08:00"),
        ("PT4H/2026-12-05T05:00:00", "has no UTC offset"),
        ("2026-12-05T05:00Z/2026-12-05T01:00Z", "is not after its start"),
        ("2026-12-05T01:00Z/PT0S", "must be positive"),
        ("2026-12-05T01:00Z/P1M", "years or months"),
        ("2026-12-05T01:00Z", "is not START/END"),
        ("2026-12-05T01:00Z/PT1H/PT2H", "is not START/END"),
        ("2026-13-05T01:00Z/PT1H", "not an ISO 8601 date-time"),
        ("R5/2026-12-05T01:00Z/PT1H", "repeating intervals are not supported"),
        ("", "empty window"),
    ],
)
def test_iso_interval_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_window(spec)


# --- weekly windows ------------------------------------------------------------------------------------


def test_weekly_window_next_and_current_occurrence() -> None:
    window = parse_window("Sat 01:00-05:00 Asia/Shanghai")
    assert isinstance(window, WeeklyWindow) and window.recurring
    friday_noon = datetime(2026, 12, 4, 12, tzinfo=SHANGHAI)
    interval = window.current_or_next(friday_noon)
    assert interval is not None
    assert interval.local_start == datetime(2026, 12, 5, 1, tzinfo=SHANGHAI)
    assert interval.local_end == datetime(2026, 12, 5, 5, tzinfo=SHANGHAI)
    assert interval.zone is SHANGHAI
    inside = datetime(2026, 12, 5, 4, 59, tzinfo=SHANGHAI)
    assert window.current_or_next(inside) == interval
    assert inside in interval
    after = window.current_or_next(datetime(2026, 12, 5, 5, tzinfo=SHANGHAI))
    assert after is not None and after.local_start == datetime(2026, 12, 12, 1, tzinfo=SHANGHAI)


@pytest.mark.parametrize(
    ("spec", "normalised"),
    [
        ("sat 1:00-5:00 Asia/Shanghai", "Sat 01:00-05:00 Asia/Shanghai"),
        ("Saturday,SUNDAY 01:00 - 05:00 UTC", "Sat,Sun 01:00-05:00 UTC"),
        ("Mon-Fri 22:00-02:00 Europe/Berlin", "Mon-Fri 22:00-02:00 Europe/Berlin"),
        ("Mon,Tue,Wed,Fri 09:00-10:00 UTC", "Mon-Wed,Fri 09:00-10:00 UTC"),
        ("Fri-Mon 01:00-03:00 UTC", "Mon,Fri-Sun 01:00-03:00 UTC"),
        ("daily 00:00-01:00 UTC", "daily 00:00-01:00 UTC"),
        ("Mon-Sun 00:00-01:00 UTC", "daily 00:00-01:00 UTC"),
        ("Sat 22:00-24:00 UTC;", "Sat 22:00-24:00 UTC"),
        ("Sat 01:00-05:00 Asia/Shanghai; Sun 02:00-03:00 Europe/Berlin", None),
    ],
)
def test_weekly_describe_normalises_and_round_trips(spec: str, normalised: str | None) -> None:
    window = parse_window(spec)
    if normalised is not None:
        assert window.describe() == normalised
    assert parse_window(window.describe()) == window


def test_end_before_start_crosses_midnight() -> None:
    window = parse_window("Fri 22:00-02:00 UTC")
    interval = window.current_or_next(utc(2026, 12, 4, 12))  # a Friday
    assert interval == Interval(utc(2026, 12, 4, 22), utc(2026, 12, 5, 2))
    assert window.shortest() == timedelta(hours=4)


def test_sunday_night_into_monday_is_found_from_monday_morning() -> None:
    window = parse_window("Sun 23:00-03:00 UTC")
    interval = window.current_or_next(utc(2026, 12, 7, 1))  # Monday 01:00, inside Sunday's occurrence
    assert interval == Interval(utc(2026, 12, 6, 23), utc(2026, 12, 7, 3))


def test_touching_and_overlapping_occurrences_merge() -> None:
    touching = parse_window("Sat 22:00-24:00 UTC; Sun 00:00-02:00 UTC")
    assert touching.current_or_next(utc(2026, 12, 5, 23)) == Interval(
        utc(2026, 12, 5, 22), utc(2026, 12, 6, 2)
    )
    overlapping = parse_window("Sat 01:00-05:00 UTC; Sat 04:00-06:00 UTC")
    assert overlapping.current_or_next(utc(2026, 12, 5, 2)) == Interval(
        utc(2026, 12, 5, 1), utc(2026, 12, 5, 6)
    )
    # Shanghai 09:00-10:00 is 01:00-02:00 UTC: two zones, one continuous window
    zones = parse_window("Sat 09:00-10:00 Asia/Shanghai; Sat 02:00-03:00 UTC")
    assert zones.current_or_next(utc(2026, 12, 5)) == Interval(utc(2026, 12, 5, 1), utc(2026, 12, 5, 3))


def test_separate_slots_are_separate_occurrences() -> None:
    window = parse_window("Sat 01:00-02:00 UTC; Sat 03:00-04:00 UTC")
    assert window.current_or_next(utc(2026, 12, 5, 2)) == Interval(utc(2026, 12, 5, 3), utc(2026, 12, 5, 4))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("Sat 01:00-05:00", "names no time zone; add an IANA name, e.g. 'Sat 01:00-05:00 Asia/Shanghai'"),
        (
            "Sat 01:00-05:00 Asia/Shangai",
            "unknown time zone 'Asia/Shangai'; expected an IANA name such as Asia/Shanghai",
        ),
        ("Sat 01:00-05:00 CEST+2", "unknown time zone"),
        ("Sat 01:00-05:00 ../../etc/passwd", "unknown time zone"),
        ("Sut 01:00-05:00 UTC", "unknown day 'Sut'"),
        ("Mon-Wed-Fri 01:00-05:00 UTC", "cannot read days"),
        ("Sat 25:00-26:00 UTC", "out of range"),
        ("Sat 01:60-05:00 UTC", "out of range"),
        ("Sat 24:00-05:00 UTC", "out of range"),
        ("Sat 05:00-05:00 UTC", "starts and ends at the same time"),
        ("Sat 0100-0500 UTC", "cannot read window"),
        ("daily 00:00-24:00 UTC", "open all week; run without --window"),
        ("daily 06:00-18:00 UTC; daily 18:00-06:00 UTC", "open all week"),
        (";", "empty window"),
    ],
)
def test_weekly_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_window(spec)


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        parse_window("Sat 01:00-05:00 UTC").current_or_next(datetime(2026, 12, 5, 2))
    with pytest.raises(ValueError, match="naive"):
        parse_window("2026-12-05T01:00Z/PT1H").current_or_next(datetime(2026, 12, 5, 2))


# --- daylight saving time ------------------------------------------------------------------------------
# Europe/Berlin: 2026-03-29 02:00 CET -> 03:00 CEST; 2026-10-25 03:00 CEST -> 02:00 CET.
# America/New_York: 2026-03-08 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST.


@pytest.mark.parametrize(
    ("zone", "night", "real_hours"),
    [
        (BERLIN, datetime(2026, 3, 22), 4),  # an ordinary Sunday
        (BERLIN, datetime(2026, 3, 29), 3),  # spring forward
        (BERLIN, datetime(2026, 10, 25), 5),  # fall back
        (NEW_YORK, datetime(2026, 3, 8), 3),
        (NEW_YORK, datetime(2026, 11, 1), 5),
        (NEW_YORK, datetime(2026, 11, 8), 4),
    ],
)
def test_weekly_window_keeps_its_wall_clock_ends_across_dst(
    zone: ZoneInfo, night: datetime, real_hours: int
) -> None:
    window = parse_window(f"Sun 01:00-05:00 {zone.key}")
    interval = window.current_or_next(night.replace(tzinfo=zone) - timedelta(hours=12))
    assert interval is not None
    assert interval.local_start.replace(tzinfo=None) == night.replace(hour=1)
    assert interval.local_end.replace(tzinfo=None) == night.replace(hour=5)
    assert interval.length == timedelta(hours=real_hours)
    assert interval.end - interval.start == timedelta(hours=real_hours)  # UTC arithmetic, not wall clock


def test_window_across_midnight_on_a_dst_night() -> None:
    window = parse_window("Sat 23:00-04:00 America/New_York")
    interval = window.current_or_next(datetime(2026, 3, 7, 12, tzinfo=NEW_YORK))
    assert interval is not None
    assert interval.length == timedelta(hours=4)  # 5 wall-clock hours, one of them skipped
    assert interval.local_end == datetime(2026, 3, 8, 4, tzinfo=NEW_YORK)


def test_start_in_the_skipped_hour_opens_at_the_jump() -> None:
    window = parse_window("Sun 02:30-05:00 Europe/Berlin")
    interval = window.current_or_next(utc(2026, 3, 28))
    assert interval is not None
    assert interval.start == utc(2026, 3, 29, 1)  # 03:00 CEST, the instant the clock jumps past 02:30
    assert interval.local_start.strftime("%H:%M %Z") == "03:00 CEST"


def test_slot_inside_the_skipped_hour_has_no_occurrence_that_week() -> None:
    window = parse_window("Sun 02:10-02:50 Europe/Berlin")
    interval = window.current_or_next(utc(2026, 3, 28))
    assert interval is not None
    assert interval.local_start == datetime(2026, 4, 5, 2, 10, tzinfo=BERLIN)


def test_end_in_the_repeated_hour_closes_at_its_first_reading() -> None:
    window = parse_window("Sun 00:00-02:30 Europe/Berlin")
    interval = window.current_or_next(utc(2026, 10, 24))
    assert interval is not None
    assert interval.end == utc(2026, 10, 25, 0, 30)  # 02:30 CEST, not 02:30 CET an hour later
    assert interval.length == timedelta(hours=2, minutes=30)


def test_first_instant_table() -> None:
    assert first_instant(datetime(2026, 6, 1, 12), BERLIN) == utc(2026, 6, 1, 10)
    assert first_instant(datetime(2026, 3, 29, 2, 0), BERLIN) == utc(2026, 3, 29, 1)
    assert first_instant(datetime(2026, 3, 29, 2, 59, 59), BERLIN) == utc(2026, 3, 29, 1)
    assert first_instant(datetime(2026, 10, 25, 2, 0), BERLIN) == utc(2026, 10, 25, 0)
    assert first_instant(datetime(2026, 3, 8, 2, 15), NEW_YORK) == utc(2026, 3, 8, 7)


# --- helpers -------------------------------------------------------------------------------------------


def test_interval_is_stored_in_utc_and_checks_its_ends() -> None:
    start = datetime(2026, 3, 29, 1, tzinfo=BERLIN)
    end = datetime(2026, 3, 29, 5, tzinfo=BERLIN)
    assert end - start == timedelta(hours=4)  # Python's same-zone subtraction: wall clock
    interval = Interval(start, end, BERLIN)
    assert interval.start.tzinfo is UTC and interval.length == timedelta(hours=3)
    assert interval.describe() == "Sun 2026-03-29 01:00 - Sun 2026-03-29 05:00 Europe/Berlin"
    assert "2026-03-29" not in interval
    with pytest.raises(ValueError, match="not after"):
        Interval(end, start)
    with pytest.raises(ValueError, match="naive"):
        Interval(datetime(2026, 1, 1), datetime(2026, 1, 2))


def test_check_cutoff() -> None:
    window = parse_window("Sat 01:00-05:00 UTC; Sun 01:00-02:00 UTC")
    check_cutoff(window, timedelta(minutes=30))
    with pytest.raises(ValueError, match=r"the cutoff \(1h\) is not shorter than the window \(1h\)"):
        check_cutoff(window, timedelta(hours=1))
    with pytest.raises(ValueError, match="negative"):
        check_cutoff(window, timedelta(seconds=-1))


def test_zone_names_and_instants_for_people() -> None:
    assert zone_name(SHANGHAI) == "Asia/Shanghai"
    assert zone_name(UTC) == "UTC"
    assert zone_name(timezone(timedelta(hours=8))) == "+08:00"
    assert zone_name(timezone(-timedelta(hours=3, minutes=30))) == "-03:30"
    assert format_instant(utc(2026, 12, 4, 17), SHANGHAI) == "Sat 2026-12-05 01:00 Asia/Shanghai"


@pytest.fixture
def no_system_tzdata() -> Iterator[None]:
    zoneinfo.reset_tzpath(to=[])
    zoneinfo.ZoneInfo.clear_cache()
    try:
        yield
    finally:
        zoneinfo.reset_tzpath()
        zoneinfo.ZoneInfo.clear_cache()


@pytest.mark.usefixtures("no_system_tzdata")
def test_zones_load_without_system_tzdata() -> None:
    assert zoneinfo.TZPATH == ()
    window = parse_window("Sun 01:00-05:00 Europe/Berlin")  # found in the tzdata package
    interval = window.current_or_next(utc(2026, 3, 28))
    assert interval is not None and interval.length == timedelta(hours=3)


def test_many_queries_are_cheap() -> None:
    window = parse_window("daily 01:00-05:00 Asia/Shanghai; Sat,Sun 10:00-12:00 UTC")
    now = utc(2026, 3, 28)
    for minute in range(0, 7 * 24 * 60, 10):  # one week in 10-minute steps: 1,008 queries
        interval = window.current_or_next(now + timedelta(minutes=minute))
        assert interval is not None and interval.end > now + timedelta(minutes=minute)
