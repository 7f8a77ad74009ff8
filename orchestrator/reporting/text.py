"""Small formatting rules shared by every renderer: times with their zone, durations, CSV cells a
spreadsheet will not execute, and ids shortened only at the end with an ellipsis."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

#: the characters that make a spreadsheet read a cell as a formula or a command (OWASP "CSV injection":
#: = + - @, and tab / carriage return, which some importers strip before looking at the next character)
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_FORMULA_FIRST = frozenset(FORMULA_START)
ELLIPSIS = "…"

Zone = str | tzinfo | None


def zone(tz: Zone = None) -> tzinfo:
    """The display zone: None or ``"UTC"`` -> UTC, otherwise an IANA name (``Asia/Shanghai``) or a tzinfo.
    Raises ValueError naming the zone when the name is unknown."""
    if tz is None:
        return UTC
    if isinstance(tz, tzinfo):
        return tz
    if tz.upper() in ("UTC", "Z", "ETC/UTC"):
        return UTC
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {tz!r} (use an IANA name such as Europe/Berlin)") from exc


def zone_label(tz: Zone = None) -> str:
    """How a zone is named in headers: ``UTC`` or the IANA key (``Asia/Shanghai``)."""
    z = zone(tz)
    if z is UTC:
        return "UTC"
    return str(getattr(z, "key", None) or z)


def _local(value: datetime, tz: Zone) -> datetime:
    if value.tzinfo is None:  # stored UTC, handed back naive by SQLite
        value = value.replace(tzinfo=UTC)
    return value.astimezone(zone(tz))


def iso_time(value: datetime | None, tz: Zone = None) -> str:
    """A time for csv/json: ISO 8601 with its UTC offset, milliseconds (``2026-03-01T08:00:05.250+08:00``);
    empty for None."""
    if value is None:
        return ""
    return _local(value, tz).isoformat(timespec="milliseconds")


def iso_formatter(tz: Zone = None) -> Callable[[datetime | None], str]:
    """A fast :func:`iso_time` for one zone, for formatting many times (a 100,000-job report formats about
    300,000): UTC input to UTC output skips the zone conversion, and ``isoformat`` is called with
    positional arguments (half the cost of ``timespec=`` as a keyword, measured)."""
    z = zone(tz)
    isoformat = datetime.isoformat
    if z is UTC:

        def to_utc(value: datetime | None) -> str:
            if value is None:
                return ""
            if value.tzinfo is None:  # stored UTC, handed back naive by SQLite
                return isoformat(value, "T", "milliseconds") + "+00:00"
            if value.tzinfo is not UTC:
                value = value.astimezone(UTC)
            return isoformat(value, "T", "milliseconds")

        return to_utc

    def to_zone(value: datetime | None) -> str:
        if value is None:
            return ""
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return isoformat(value.astimezone(z), "T", "milliseconds")

    return to_zone


def human_time(value: datetime | None, tz: Zone = None) -> str:
    """A time for tables: ``YYYY-MM-DD HH:MM:SS`` in the display zone (the zone is named in the header,
    see :func:`zone_label`); empty for None."""
    if value is None:
        return ""
    return _local(value, tz).strftime("%Y-%m-%d %H:%M:%S")


def human_time_zoned(value: datetime | None, tz: Zone = None) -> str:
    """A time standing alone in a sentence: ``2026-03-01 08:00:05 UTC`` or ``... +08:00``."""
    if value is None:
        return ""
    local = _local(value, tz)
    if zone(tz) is UTC:
        return local.strftime("%Y-%m-%d %H:%M:%S UTC")
    offset = local.strftime("%z")
    return local.strftime("%Y-%m-%d %H:%M:%S ") + f"{offset[:3]}:{offset[3:]}"


def duration(seconds: float | None) -> str:
    """``0.25s``, ``42s``, ``9m59s``, ``8h18m59s``; empty for None."""
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{seconds:.2f}s".replace(".00s", "s")
    total = round(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def csv_cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: a string starting with ``= + - @``, tab or CR gets a
    leading apostrophe (the OWASP recommendation); numbers and None pass unchanged (None -> empty)."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_text(value: str | None) -> str:
    """:func:`csv_cell` for a text (or None) value, without the type checks: the per-cell cost of a
    100,000-row report."""
    if not value:
        return ""
    return "'" + value if value[0] in _FORMULA_FIRST else value


def shorten(value: str, width: int) -> str:
    """``value`` if it fits in ``width`` characters, else its first ``width - 1`` and an ellipsis: an id is
    never cut in the middle or split across lines, and the start (what people type) is kept."""
    if width < 1:
        return ""
    if len(value) <= width:
        return value
    return value[: width - 1] + ELLIPSIS
