"""Durations as operators type them: ``30m``, ``10s``, ``1h30m``, ``2h``, ``90s``, ``1d`` and ISO 8601
``PT30M``.

ISO 8601 durations are parsed by isodate (its ``parse_duration``), wrapped to reject what has no fixed
length (years, months) and what isodate lets through silently (an empty ``PT``, a negative sign). The
compact form (``1h30m``) is our own ten-line grammar: the libraries that read it (pytimeparse, humanfriendly)
are unmaintained or accept far more (``1.5 hours``, ``3 weeks ago``) than an option should, and one regular
expression with an error message that names the accepted units is simpler to keep exact.
"""

from __future__ import annotations

import re
from datetime import timedelta

import isodate  # type: ignore[import-untyped]  # isodate ships no type information

_EXAMPLES = "e.g. 30m, 10s, 1h30m, 2h, 1d or ISO 8601 PT30M"
# Units in descending order, each at most once; whitespace between the parts is allowed ("1h 30m").
_COMPACT = re.compile(
    r"^(?:(?P<d>\d+)\s*d)?\s*(?:(?P<h>\d+)\s*h)?\s*(?:(?P<m>\d+)\s*m)?\s*(?:(?P<s>\d+)\s*s)?$",
    re.IGNORECASE | re.ASCII,
)
_ISO_HAS_NUMBER = re.compile(r"\d")


def parse_duration(text: str) -> timedelta:
    """Parse a non-negative duration.

    Accepts the compact form (integers with units ``d``, ``h``, ``m``, ``s`` in that order, each at most
    once: ``1h30m``, ``90s``; case-insensitive) and ISO 8601 durations (``PT30M``, ``P1DT2H``, ``PT1.5H``,
    ``P1W``). Zero (``0s``, ``PT0S``) is accepted; the caller rejects it where it makes no sense.

    Returns a ``timedelta``. Raises ``ValueError`` with a one-line message naming the input and the
    accepted forms for anything else: a bare number (``30``: which unit?), a negative duration, calendar
    years or months (``P1M``: no fixed length), or an empty string.
    """
    raw = text.strip()
    if not raw:
        raise ValueError(f"empty duration; expected {_EXAMPLES}")
    if raw[0] in "Pp":
        return _parse_iso(raw)
    if raw.isascii() and raw.isdigit():
        raise ValueError(f"duration {text!r} has no unit; write {raw}s or {raw}m ({_EXAMPLES})")
    if raw.startswith("-"):
        raise ValueError(f"duration {text!r} is negative; expected {_EXAMPLES}")
    match = _COMPACT.match(raw)
    if match is None or not any(match.groupdict().values()):
        raise ValueError(f"cannot read duration {text!r}; expected {_EXAMPLES}")
    parts = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    return timedelta(
        days=parts.get("d", 0), hours=parts.get("h", 0), minutes=parts.get("m", 0), seconds=parts.get("s", 0)
    )


def _parse_iso(raw: str) -> timedelta:
    upper = raw.upper()
    # isodate reads "PT" as zero and answers "P" with a message about datetimes: refuse both here.
    if not _ISO_HAS_NUMBER.search(upper):
        raise ValueError(f"ISO 8601 duration {raw!r} has no value; expected e.g. PT30M or P1DT2H")
    try:
        value = isodate.parse_duration(upper)
    except (isodate.ISO8601Error, ValueError, ArithmeticError) as exc:
        raise ValueError(f"cannot read ISO 8601 duration {raw!r}; expected e.g. PT30M or P1DT2H") from exc
    if not isinstance(value, timedelta):
        raise ValueError(
            f"duration {raw!r} has years or months, which have no fixed length; use days (P30D) or hours"
        )
    if value < timedelta(0):
        raise ValueError(f"duration {raw!r} is negative; expected e.g. PT30M")
    return value


def format_duration(value: timedelta) -> str:
    """The compact form of a non-negative duration, the inverse of ``parse_duration`` for whole seconds:
    ``timedelta(hours=1, minutes=30)`` -> ``"1h30m"``, zero -> ``"0s"``. Fractions of a second are
    dropped. Raises ``ValueError`` for a negative duration."""
    if value < timedelta(0):
        raise ValueError(f"negative duration {value}")
    total = int(value.total_seconds())
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    text = "".join(
        f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")) if n
    )
    return text or "0s"
