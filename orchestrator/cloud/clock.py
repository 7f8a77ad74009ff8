"""The cloud's clock as we measure it: the offset of our wall clock to the cloud's, from HTTP ``Date``.

Why: reconcile looks for the workflow an upgrade created by the cloud's own ``created_time`` (issue 11
kind 3). A host whose clock is minutes off would look in the wrong window if it compared the cloud's
times with its own, so it measures the offset instead of assuming it is small.

How: every answer carries a ``Date`` header (RFC 9110 section 6.6.1: the time the origin generated the
answer, one-second resolution, truncated). The server produced it somewhere between the moment our
request left (``sent_at``) and the moment its answer arrived (``received_at``), both on our wall clock.
So for one answer, with ``D`` the Date in epoch seconds, the offset ``cloud - local`` lies in
``[D - received_at, D + 1 - sent_at]``: its midpoint is the sample, half its width (``(1 + rtt) / 2``)
the sample's uncertainty. The estimate is the median of the recent samples' midpoints (robust to one
slow answer or one odd gateway), its uncertainty that of the median sample. ``cloud = local + offset``.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

LocalClock = Callable[[], float]
"""Our wall clock in epoch seconds (``time.time``; a virtual clock in tests)."""

DEFAULT_WINDOW = 15
DEFAULT_LARGE_S = 30.0


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One answer's evidence: the offset interval's midpoint and half-width, in seconds."""

    offset_s: float
    uncertainty_s: float
    received_at: float


_LAST_DATE: list[tuple[str, float | None]] = [("", None)]


def parse_http_date(value: str | None) -> float | None:
    """An HTTP ``Date`` header (RFC 9110 section 5.6.7) as epoch seconds, UTC; None when absent or
    unreadable. IMF-fixdate and the obsolete forms ``email.utils`` reads; no zone means UTC."""
    # answers within one second share their Date header: parse each distinct value once
    if value is not None and value == _LAST_DATE[0][0]:
        return _LAST_DATE[0][1]
    parsed = _parse_http_date(value)
    if value is not None:
        _LAST_DATE[0] = (value, parsed)
    return parsed


def _parse_http_date(value: str | None) -> float | None:
    """An HTTP ``Date`` header as epoch seconds (UTC), or None when absent or unreadable.

    Accepts the IMF-fixdate form (``Sun, 06 Nov 1994 08:49:37 GMT``) and the obsolete forms that
    ``email.utils.parsedate_to_datetime`` reads; a date without a zone is taken as UTC."""
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


class CloudClock:
    """The measured offset of the local wall clock to the cloud's (``cloud = local + offset_s``).

    ``record`` is called by the cloud client for every answer that has a ``Date`` header. Until the
    first sample ``offset_s`` and ``uncertainty_s`` are None: callers then fall back to their own clock
    and a wide window, and say so. Single-threaded (one event loop); nothing here blocks.
    """

    def __init__(
        self,
        *,
        local: LocalClock = time.time,
        window: int = DEFAULT_WINDOW,
        large_s: float = DEFAULT_LARGE_S,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1 sample")
        self.local = local
        self.large_s = large_s
        self._samples: deque[ClockSample] = deque(maxlen=window)

    def now(self) -> float:
        """Our wall clock (the one the samples' ``sent_at``/``received_at`` are read on)."""
        return self.local()

    def record(self, date_header: str | None, *, sent_at: float, received_at: float) -> ClockSample | None:
        """Add one answer's ``Date`` (``sent_at`` <= ``received_at``, local epoch seconds). Returns the
        sample, or None when the header is missing or unreadable (nothing is recorded then)."""
        cloud = parse_http_date(date_header)
        if cloud is None:
            return None
        sent_at = min(sent_at, received_at)
        low = cloud - received_at
        high = cloud + 1.0 - sent_at
        sample = ClockSample((low + high) / 2.0, (high - low) / 2.0, received_at)
        self._samples.append(sample)
        return sample

    @property
    def samples(self) -> int:
        """How many samples the estimate rests on (at most ``window``)."""
        return len(self._samples)

    def _median_sample(self) -> ClockSample | None:
        if not self._samples:
            return None
        ordered = sorted(self._samples, key=lambda s: s.offset_s)
        return ordered[(len(ordered) - 1) // 2]

    @property
    def offset_s(self) -> float | None:
        """``cloud - local`` in seconds (median of the recent samples), or None before any answer."""
        if not self._samples:
            return None
        return statistics.median(s.offset_s for s in self._samples)

    @property
    def uncertainty_s(self) -> float | None:
        """Half-width in seconds of the median sample's interval (0.5 s of Date resolution plus half the
        round trip), or None before any answer."""
        sample = self._median_sample()
        return None if sample is None else sample.uncertainty_s

    @property
    def large(self) -> bool:
        """True when the measured offset is larger than ``large_s`` in either direction (warn the user)."""
        offset = self.offset_s
        return offset is not None and abs(offset) > self.large_s

    def to_cloud(self, local: datetime) -> datetime:
        """A local wall-clock time as the cloud's clock read it (unchanged before any sample)."""
        return local + timedelta(seconds=self.offset_s or 0.0)

    def to_local(self, cloud: datetime) -> datetime:
        """A cloud time (e.g. a job's ``created_time``) on our wall clock (unchanged before any sample)."""
        return cloud - timedelta(seconds=self.offset_s or 0.0)

    def describe(self) -> str:
        """One line for logs: ``cloud clock +183.4 s (+/- 0.6 s, 12 answers)`` or ``not measured yet``."""
        offset, unc = self.offset_s, self.uncertainty_s
        if offset is None or unc is None:
            return "cloud clock offset not measured yet"
        return f"cloud clock {offset:+.1f} s (+/- {unc:.1f} s, {self.samples} answers)"
