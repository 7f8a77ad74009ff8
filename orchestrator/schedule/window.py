"""Maintenance windows: a one-off ISO 8601 interval or a weekly schedule in an IANA time zone.

Two spellings, told apart by their first character (a digit or ``P`` starts an ISO interval, a day name a
weekly window):

- ISO 8601 interval: ``2026-12-05T01:00:00+08:00/PT4H``, ``START/END`` or ``PT4H/END``. The first date-time
  must carry a UTC offset or ``Z`` (a bare local time is ambiguous on a server in another zone); an END
  without one takes START's offset, as ISO 8601 reads an abbreviated end. Repeating intervals (``R/…``)
  are refused: the weekly form says the same more plainly.
- Weekly: ``"Sat 01:00-05:00 Asia/Shanghai"``; several slots separated by ``;``. Each slot names its own
  zone (no default: a window in the wrong zone upgrades during business hours). Days are ``Mon``..``Sun``
  (or full names, any case), lists ``Sat,Sun``, ranges ``Mon-Fri`` (inclusive; ``Fri-Mon`` wraps through
  the weekend) or ``daily``. An end at or before the start crosses midnight (``Fri 22:00-02:00`` ends on
  Saturday); ``24:00`` is the end of the day. A start equal to the end, and a schedule that covers the
  whole week (use no window instead), are refused.

Daylight saving time: a weekly slot's ends are wall-clock readings. An occurrence opens at the first
instant the zone's clock reads its start time and closes at the first instant it reads its end time. So
``01:00-05:00`` on a spring-forward night is 3 real hours and on a fall-back night 5; a start inside the
skipped hour opens when the clock jumps past it; an end inside the repeated hour closes at its first
reading (the earlier, shorter choice). Occurrences that overlap or touch (``Sat 22:00-24:00; Sun
00:00-04:00``) are one interval, so a cutoff is measured from the real end.

Everything here is pure: the current time is an argument. Aware datetimes only; intervals are returned in
UTC with the zone to show them in.
"""

from __future__ import annotations

import difflib
import functools
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import isodate  # type: ignore[import-untyped]  # isodate ships no type information

from orchestrator.schedule.durations import format_duration, parse_duration

DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_FULL_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_MINUTES_PER_DAY = 1440
_MINUTES_PER_WEEK = 7 * _MINUTES_PER_DAY
# Days of local dates scanned around `now` for weekly occurrences. A merged run of touching occurrences is
# shorter than a week (a schedule covering the whole week is refused), so 8 days back and 16 ahead hold
# the occurrence containing `now` and the next one whole.
_LOOK_BACK_DAYS = 8
_LOOK_AHEAD_DAYS = 16

_SLOT = re.compile(
    r"^(?P<days>[A-Za-z][A-Za-z,\-]*)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})(?:\s+(?P<zone>\S+))?$",
    re.ASCII,
)
# An END that begins like a date (2026-12-05 or 20261205) is a date-time, anything else a duration.
_DATE_START = re.compile(r"^\d{4}-?\d{2}", re.ASCII)
_WEEKLY_EXAMPLE = "e.g. 'Sat 01:00-05:00 Asia/Shanghai' or 'Mon-Fri 22:00-02:00 Europe/Berlin'"
_ISO_EXAMPLE = "e.g. 2026-12-05T01:00:00+08:00/PT4H"


@dataclass(frozen=True)
class Interval:
    """One occurrence of a window: ``start <= t < end``.

    ``start`` and ``end`` are aware datetimes, stored in UTC whatever zone they were given in (Python
    compares and subtracts two datetimes of the same ``tzinfo`` by wall clock, which is wrong across a DST
    change; UTC makes ``end - start`` the real length). ``zone`` is the zone to show them in: the weekly
    slot's IANA zone, or the ISO interval's offset. Raises ``ValueError`` for naive datetimes or an end not
    after the start.
    """

    start: datetime
    end: datetime
    zone: tzinfo = field(default=UTC, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _utc(self.start, "interval start"))
        object.__setattr__(self, "end", _utc(self.end, "interval end"))
        if self.end <= self.start:
            raise ValueError(
                f"interval end {self.end.isoformat()} is not after its start {self.start.isoformat()}"
            )

    def __contains__(self, when: object) -> bool:
        return isinstance(when, datetime) and self.start <= _utc(when, "time") < self.end

    @property
    def length(self) -> timedelta:
        """Real elapsed time from start to end."""
        return self.end - self.start

    @property
    def local_start(self) -> datetime:
        """``start`` in ``zone`` (for display)."""
        return self.start.astimezone(self.zone)

    @property
    def local_end(self) -> datetime:
        """``end`` in ``zone`` (for display)."""
        return self.end.astimezone(self.zone)

    def describe(self) -> str:
        """``"Sat 2026-12-05 01:00 - Sat 2026-12-05 05:00 Asia/Shanghai"``: both ends in ``zone``."""
        return f"{_clock(self.local_start)} - {_clock(self.local_end)} {zone_name(self.zone)}"


class Window(ABC):
    """A maintenance window: the occurrences in which new upgrades may start (minus the cutoff)."""

    @abstractmethod
    def current_or_next(self, now: datetime) -> Interval | None:
        """The occurrence containing ``now`` (aware), else the next one to start; ``None`` when the window
        has no occurrence ending after ``now`` (a one-off window that is over). Raises ``ValueError`` for
        a naive ``now``."""

    @abstractmethod
    def describe(self) -> str:
        """The spec, normalised so that ``parse_window(w.describe()) == w`` (what is stored in the run)."""

    @property
    @abstractmethod
    def recurring(self) -> bool:
        """True for weekly windows (there is always a next occurrence)."""

    @abstractmethod
    def shortest(self) -> timedelta:
        """The nominal (wall-clock) length of the shortest occurrence: a cutoff at least this long leaves
        no time to start anything (see ``check_cutoff``)."""

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True)
class OneOffWindow(Window):
    """A single interval, from ``--window START/PT4H`` or ``START/END``."""

    interval: Interval
    # How the length was written (an ISO duration such as "PT4H"), to keep it in describe(); None: START/END.
    length_text: str | None = field(default=None, compare=False)

    def current_or_next(self, now: datetime) -> Interval | None:
        """The interval while it has not ended at ``now`` (aware), else None. Raises ``ValueError`` for a
        naive ``now``."""
        return self.interval if _utc(now, "now") < self.interval.end else None

    def describe(self) -> str:
        """``START/DURATION`` as written, or ``START/END``, both in the interval's offset."""
        start = self.interval.local_start.isoformat()
        if self.length_text is not None:
            return f"{start}/{self.length_text}"
        return f"{start}/{self.interval.local_end.isoformat()}"

    @property
    def recurring(self) -> bool:
        """False: a one-off window has no next occurrence once it is over."""
        return False

    def shortest(self) -> timedelta:
        """The interval's real length."""
        return self.interval.length


@dataclass(frozen=True)
class WeeklySlot:
    """One weekly slot: on each day of ``days`` (0 = Monday), from ``start_minute`` to ``end_minute``
    (minutes after local midnight; ``end_minute <= start_minute`` crosses midnight, 1440 is 24:00), in
    ``zone``."""

    days: frozenset[int]
    start_minute: int
    end_minute: int
    zone: ZoneInfo

    @property
    def wall_length(self) -> timedelta:
        """The slot's length on the wall clock (a DST night makes the real one an hour longer or
        shorter)."""
        minutes = self.end_minute - self.start_minute
        return timedelta(minutes=minutes if minutes > 0 else minutes + _MINUTES_PER_DAY)

    def occurrence(self, day: date) -> Interval | None:
        """The occurrence opening on local date ``day`` (whatever its weekday), or None if DST leaves it
        no real time (a slot inside the skipped hour)."""
        ends = _occurrence(self, day)
        return Interval(ends[0], ends[1], self.zone) if ends is not None else None

    def describe(self) -> str:
        """The slot in the weekly form, e.g. ``Sat 01:00-05:00 Asia/Shanghai``."""
        return (
            f"{_describe_days(self.days)} {_hhmm(self.start_minute)}-{_hhmm(self.end_minute)} {self.zone.key}"
        )


@dataclass(frozen=True)
class WeeklyWindow(Window):
    """One or more weekly slots; occurrences that overlap or touch are merged into one interval."""

    slots: tuple[WeeklySlot, ...]

    def current_or_next(self, now: datetime) -> Interval | None:
        """The merged occurrence containing ``now`` (aware), else the next one, in the zone of the slot
        that opens it (DST as the module docstring says). Raises ``ValueError`` for a naive ``now``."""
        now = _utc(now, "now")
        found: list[tuple[datetime, datetime, ZoneInfo]] = []
        for slot in self.slots:
            today = now.astimezone(slot.zone).date()
            for offset in range(-_LOOK_BACK_DAYS, _LOOK_AHEAD_DAYS):
                day = today + timedelta(days=offset)
                if day.weekday() in slot.days:
                    ends = _occurrence(slot, day)
                    if ends is not None:
                        found.append((ends[0], ends[1], slot.zone))
        found.sort(key=lambda occ: occ[0])
        merged: list[tuple[datetime, datetime, ZoneInfo]] = []
        for start, end, zone in found:
            if merged and start <= merged[-1][1]:
                if end > merged[-1][1]:
                    merged[-1] = (merged[-1][0], end, merged[-1][2])
            else:
                merged.append((start, end, zone))
        for start, end, zone in merged:
            if end > now:
                return Interval(start, end, zone)
        return None  # not reached for a valid weekly window: it has an occurrence every week

    def describe(self) -> str:
        """The slots in the weekly form, joined by ``; ``."""
        return "; ".join(slot.describe() for slot in self.slots)

    @property
    def recurring(self) -> bool:
        """True: there is an occurrence every week."""
        return True

    def shortest(self) -> timedelta:
        """The wall-clock length of the shortest slot (occurrences merged with a neighbour are longer)."""
        return min(slot.wall_length for slot in self.slots)


def parse_window(text: str) -> Window:
    """Parse ``--window`` (or the inventory's ``window:``): an ISO 8601 interval or a weekly schedule, as
    described at the top of this module.

    Returns a ``OneOffWindow`` or a ``WeeklyWindow``. Raises ``ValueError`` with a one-line message (the
    offending part, what was expected, an example) for anything else: a start without a UTC offset, an
    unknown time zone (with the closest IANA names), an unknown day, a time out of range, an end not after
    the start.
    """
    raw = text.strip()
    if not raw:
        raise ValueError(f"empty window; expected {_ISO_EXAMPLE} or {_WEEKLY_EXAMPLE}")
    if raw[0].isdigit() or raw[0] in "Pp" or raw[:1] in "Rr":
        return _parse_iso_interval(raw)
    return _parse_weekly(raw)


def check_cutoff(window: Window, cutoff: timedelta) -> None:
    """Raise ``ValueError`` when ``cutoff`` is negative or not shorter than the window's shortest
    occurrence (no upgrade could ever start)."""
    if cutoff < timedelta(0):
        raise ValueError("the cutoff cannot be negative")
    if cutoff >= window.shortest():
        raise ValueError(
            f"the cutoff ({format_duration(cutoff)}) is not shorter than the window "
            f"({format_duration(window.shortest())}): no upgrade could start"
        )


def first_instant(local: datetime, zone: ZoneInfo) -> datetime:
    """The first instant (UTC) at which ``zone``'s clock reads ``local`` (naive) or later.

    For a reading that occurs once this is simply that instant; for one the clock shows twice (fall back)
    it is the first; for one it skips (spring forward) it is the moment of the jump.
    """
    guess = local.replace(tzinfo=zone)  # fold=0: the earlier reading, or the pre-jump offset in a gap
    instant = guess.astimezone(UTC)
    if instant.astimezone(zone).replace(tzinfo=None) == local:
        return instant
    # In the skipped hour: fold=1 maps with the post-jump offset to an earlier instant before the jump,
    # fold=0 to a later one after it; bisect on whole seconds for the jump (transitions fall on seconds).
    low = local.replace(tzinfo=zone, fold=1).astimezone(UTC)
    high = instant
    while high - low > timedelta(seconds=1):
        mid = low + (high - low) / 2
        mid = mid.replace(microsecond=0)
        if mid.astimezone(zone).replace(tzinfo=None) >= local:
            high = mid
        else:
            low = mid
    return high


def zone_name(zone: tzinfo) -> str:
    """The IANA key of a ZoneInfo (``Asia/Shanghai``), ``UTC``, or the offset (``+08:00``)."""
    if isinstance(zone, ZoneInfo):
        return zone.key
    offset = zone.utcoffset(None)
    if not offset:
        return "UTC"
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def format_instant(when: datetime, zone: tzinfo) -> str:
    """``"Sat 2026-12-12 01:00 Asia/Shanghai"``: for reasons and status lines."""
    return f"{_clock(_utc(when, 'time').astimezone(zone))} {zone_name(zone)}"


# --- ISO 8601 intervals -----------------------------------------------------------------------------


def _parse_iso_interval(raw: str) -> OneOffWindow:
    if raw[:1] in "Rr":
        raise ValueError(
            f"repeating intervals are not supported ({raw!r}); use the weekly form, {_WEEKLY_EXAMPLE}"
        )
    parts = raw.split("/")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(f"window {raw!r} is not START/END or START/DURATION; expected {_ISO_EXAMPLE}")
    first, second = (p.strip() for p in parts)
    if first[0] in "Pp":
        length = _window_length(first)
        end = _parse_instant(second, "end", None)
        return OneOffWindow(Interval(end - length, end, _zone_of(end)), _iso_length(length))
    start = _parse_instant(first, "start", None)
    if not _DATE_START.match(second):
        length = _window_length(second)
        return OneOffWindow(Interval(start, start + length, _zone_of(start)), _iso_length(length))
    end = _parse_instant(second, "end", _zone_of(start))
    if end <= start:
        raise ValueError(f"window end {second!r} is not after its start {first!r}")
    return OneOffWindow(Interval(start, end, _zone_of(start)))


def _parse_instant(text: str, which: str, default_zone: tzinfo | None) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(
            f"window {which} {text!r} is not an ISO 8601 date-time; expected {_ISO_EXAMPLE}"
        ) from exc
    if value.tzinfo is None:
        if default_zone is None:
            raise ValueError(
                f"window {which} {text!r} has no UTC offset; add one, e.g. {text}+08:00 or {text}Z"
            )
        value = value.replace(tzinfo=default_zone)
    return value


def _window_length(text: str) -> timedelta:
    length = parse_duration(text)
    if length <= timedelta(0):
        raise ValueError(f"window length {text!r} must be positive")
    return length


def _iso_length(length: timedelta) -> str:
    return str(isodate.duration_isoformat(length))


def _zone_of(value: datetime) -> tzinfo:
    zone = value.tzinfo
    assert zone is not None  # every caller passes an aware datetime
    return zone


# --- weekly windows ---------------------------------------------------------------------------------


def _parse_weekly(raw: str) -> WeeklyWindow:
    slots = tuple(_parse_slot(part.strip()) for part in raw.split(";") if part.strip())
    if not slots:
        raise ValueError(f"empty window; expected {_WEEKLY_EXAMPLE}")
    if _covers_whole_week(slots):
        raise ValueError(f"window {raw!r} is open all week; run without --window instead")
    return WeeklyWindow(slots)


def _parse_slot(text: str) -> WeeklySlot:
    match = _SLOT.match(text)
    if match is None:
        raise ValueError(f"cannot read window {text!r}; expected DAYS HH:MM-HH:MM ZONE, {_WEEKLY_EXAMPLE}")
    if match["zone"] is None:
        raise ValueError(
            f"window {text!r} names no time zone; "
            f"add an IANA name, e.g. '{text} Asia/Shanghai' or '{text} UTC'"
        )
    start = _minutes(match["start"], text, allow_24=False)
    end = _minutes(match["end"], text, allow_24=True)
    if start == end:
        raise ValueError(
            f"window {text!r} starts and ends at the same time; for a whole day write 00:00-24:00"
        )
    return WeeklySlot(_parse_days(match["days"], text), start, end, _zone(match["zone"]))


def _parse_days(spec: str, slot: str) -> frozenset[int]:
    if spec.lower() in ("daily", "everyday"):
        return frozenset(range(7))
    days: set[int] = set()
    for item in spec.split(","):
        ends = item.split("-")
        if len(ends) == 1:
            days.add(_day(ends[0], slot))
        elif len(ends) == 2:
            first, last = _day(ends[0], slot), _day(ends[1], slot)
            span = (last - first) % 7
            days.update((first + i) % 7 for i in range(span + 1))
        else:
            raise ValueError(
                f"cannot read days {item!r} in window {slot!r}; expected e.g. Mon-Fri or Sat,Sun"
            )
    return frozenset(days)


def _day(name: str, slot: str) -> int:
    low = name.strip().lower()
    for index, (short, full) in enumerate(zip(DAY_NAMES, _FULL_DAY_NAMES, strict=True)):
        if low in (short.lower(), full):
            return index
    raise ValueError(
        f"unknown day {name!r} in window {slot!r}; expected Mon, Tue, Wed, Thu, Fri, Sat, Sun or daily"
    )


def _minutes(text: str, slot: str, *, allow_24: bool) -> int:
    hours, minutes = (int(x) for x in text.split(":"))
    if allow_24 and (hours, minutes) == (24, 0):
        return _MINUTES_PER_DAY
    if hours > 23 or minutes > 59:
        raise ValueError(
            f"time {text!r} in window {slot!r} is out of range (00:00-23:59, or 24:00 as an end)"
        )
    return hours * 60 + minutes


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        pass
    known = available_timezones()
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    hint = ", ".join(by_lower[c] for c in close) or "Asia/Shanghai, Europe/Berlin, UTC"
    raise ValueError(f"unknown time zone {name!r}; expected an IANA name such as {hint}")


def _covers_whole_week(slots: tuple[WeeklySlot, ...]) -> bool:
    spans: list[tuple[int, int]] = []
    for slot in slots:
        length = int(slot.wall_length.total_seconds()) // 60
        for day in slot.days:
            start = day * _MINUTES_PER_DAY + slot.start_minute
            end = start + length
            if end > _MINUTES_PER_WEEK:  # Sunday night into Monday: split at the week's edge
                spans += [(start, _MINUTES_PER_WEEK), (0, end - _MINUTES_PER_WEEK)]
            else:
                spans.append((start, end))
    covered = 0
    reach = 0
    for start, end in sorted(spans):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered >= _MINUTES_PER_WEEK


@functools.lru_cache(maxsize=4096)
def _occurrence(slot: WeeklySlot, day: date) -> tuple[datetime, datetime] | None:
    # Cached: dispatch asks for the same few weeks of occurrences on every claim, and each costs two
    # zone conversions (more in a DST gap).
    opens = datetime.combine(day, datetime.min.time()) + timedelta(minutes=slot.start_minute)
    closes = opens + slot.wall_length
    start, end = first_instant(opens, slot.zone), first_instant(closes, slot.zone)
    return (start, end) if end > start else None


def _describe_days(days: frozenset[int]) -> str:
    if len(days) == 7:
        return "daily"
    ordered = sorted(days)
    runs: list[list[int]] = []
    for day in ordered:
        if runs and day == runs[-1][-1] + 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    parts = []
    for run in runs:
        if len(run) >= 3:
            parts.append(f"{DAY_NAMES[run[0]]}-{DAY_NAMES[run[-1]]}")
        else:
            parts.extend(DAY_NAMES[d] for d in run)
    return ",".join(parts)


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _clock(local: datetime) -> str:
    return f"{DAY_NAMES[local.weekday()]} {local:%Y-%m-%d %H:%M}"


def _utc(value: datetime, what: str) -> datetime:
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise ValueError(f"{what} {value.isoformat()} is naive; pass an aware datetime")
    return value.astimezone(UTC)
