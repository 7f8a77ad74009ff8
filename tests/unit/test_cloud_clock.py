"""The cloud clock: offsets measured from Date headers, with their uncertainty, robust to an odd answer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import formatdate

import pytest

from orchestrator.cloud.clock import CloudClock, parse_http_date

T0 = 1_700_000_000.0


def date(t: float) -> str:
    return formatdate(t, usegmt=True)  # truncated to the second, as a server writes it


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Tue, 14 Nov 2023 22:13:20 GMT", T0),
        ("Tuesday, 14-Nov-23 22:13:20 GMT", T0),  # RFC 850, obsolete but legal
        ("Tue, 14 Nov 2023 22:13:20", T0),  # no zone: taken as UTC
        (None, None),
        ("", None),
        ("yesterday", None),
    ],
)
def test_parse_http_date(value: str | None, expected: float | None) -> None:
    assert parse_http_date(value) == expected


def test_nothing_measured_means_no_offset_and_no_verdict() -> None:
    clock = CloudClock(local=lambda: T0)
    assert (clock.offset_s, clock.uncertainty_s, clock.large, clock.samples) == (None, None, False, 0)
    assert clock.record(None, sent_at=T0, received_at=T0) is None
    assert clock.record("garbage", sent_at=T0, received_at=T0) is None
    assert clock.samples == 0
    now = datetime(2024, 1, 1, tzinfo=UTC)
    assert clock.to_cloud(now) == now and clock.to_local(now) == now
    assert "not measured" in clock.describe()


@pytest.mark.parametrize("true_offset", [-180.0, -0.4, 0.0, 0.7, 3600.25])
@pytest.mark.parametrize("rtt", [0.0, 0.05, 2.0])
def test_the_true_offset_lies_within_the_uncertainty(true_offset: float, rtt: float) -> None:
    clock = CloudClock(local=lambda: T0)
    for k in range(9):
        sent = T0 + 10 * k + 0.13 * k  # the server answers somewhere within the round trip
        served_local = sent + rtt * (k / 8)
        clock.record(date(served_local + true_offset), sent_at=sent, received_at=sent + rtt)
    offset, unc = clock.offset_s, clock.uncertainty_s
    assert offset is not None and unc is not None
    assert abs(offset - true_offset) <= unc + 1e-9
    assert unc == pytest.approx((1.0 + rtt) / 2)


def test_one_odd_answer_does_not_move_the_median() -> None:
    clock = CloudClock(local=lambda: T0, window=5)
    for k in range(4):
        clock.record(date(T0 + k + 120), sent_at=T0 + k, received_at=T0 + k + 0.01)
    clock.record(date(T0 + 10 + 9000), sent_at=T0 + 10, received_at=T0 + 10.01)  # a gateway's odd clock
    assert clock.offset_s is not None and 119.5 <= clock.offset_s <= 121.0


def test_window_keeps_only_recent_samples_so_a_clock_step_is_followed() -> None:
    clock = CloudClock(local=lambda: T0, window=3)
    for k in range(3):
        clock.record(date(T0 + k), sent_at=T0 + k, received_at=T0 + k)
    for k in range(3, 6):
        clock.record(date(T0 + k + 300), sent_at=T0 + k, received_at=T0 + k)
    assert clock.samples == 3 and clock.offset_s == pytest.approx(300.5)


def test_large_offsets_are_flagged_both_ways_and_times_convert() -> None:
    fast = CloudClock(local=lambda: T0, large_s=30)
    fast.record(date(T0 + 181), sent_at=T0, received_at=T0)
    assert fast.large and fast.offset_s == pytest.approx(181.5)
    local = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert fast.to_cloud(local) == local + timedelta(seconds=181.5)
    assert fast.to_local(fast.to_cloud(local)) == local
    assert "+181.5 s" in fast.describe()
    slow = CloudClock(local=lambda: T0, large_s=30)
    slow.record(date(T0 - 40), sent_at=T0, received_at=T0)
    assert slow.large
    near = CloudClock(local=lambda: T0, large_s=30)
    near.record(date(T0 + 29), sent_at=T0, received_at=T0)
    assert not near.large


def test_window_must_hold_a_sample() -> None:
    with pytest.raises(ValueError):
        CloudClock(window=0)
