"""The pure parts of reconcile (``orchestrator.steps.reconcile``): reading the cloud's timestamps, the
window a lost answer's workflow is looked for in (``search_window``, on the cloud's clock), and picking
our workflow among the project's recent jobs (``match_recent``). No network, no database.

Since the new core the lower bound of the search is no longer "our send time minus a fixed two minutes"
(``CLOCK_SKEW``, gone): it is the send time moved onto the cloud's clock by the measured offset, minus the
measurement's uncertainty; only when no offset was ever measured is it still two minutes wide.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from orchestrator.outcomes import RecentJob
from orchestrator.steps.reconcile import (
    CREATED_RESOLUTION,
    UNMEASURED_SKEW,
    Match,
    Window,
    match_recent,
    parse_cloud_time,
    search_window,
)
from orchestrator.store import AttemptRow

TARGET = "2.24.03.000"


# ------------------------------------------------------------------------------------ parse_cloud_time
class TestParseCloudTime:
    @pytest.mark.parametrize(
        "text",
        [
            "2024-03-01T10:00:00+0000",  # the job API's shape
            "2024-03-01T10:00:00Z",  # the immediate-jobs query shape
            "2024-03-01T10:00:00+00:00",
            "2024-03-01T18:00:00+0800",
            "2024-03-01T05:00:00-0500",
            " 2024-03-01T10:00:00+0000 ",
            "2024-03-01 10:00:00+0000",
            "2024-03-01T10:00:00",  # no zone: the cloud's times are UTC
        ],
    )
    def test_same_instant(self, text: str) -> None:
        t = parse_cloud_time(text)
        assert t == datetime(2024, 3, 1, 10, 0, tzinfo=UTC)
        assert t is not None and t.utcoffset() == timedelta(0)

    def test_fraction_of_a_second(self) -> None:
        assert parse_cloud_time("2024-03-01T10:00:00.250Z") == datetime(
            2024, 3, 1, 10, 0, 0, 250000, tzinfo=UTC
        )

    @pytest.mark.parametrize("text", [None, "", "   ", "yesterday", "2024-13-01T10:00:00Z", "1709287200"])
    def test_unreadable_is_none(self, text: str | None) -> None:
        assert parse_cloud_time(text) is None

    def test_is_comparable_with_our_clock(self) -> None:
        t = parse_cloud_time("2024-03-01T10:00:00+0000")
        assert t is not None and t < datetime.now(UTC)
        assert t == datetime(2024, 3, 1, 11, 0, tzinfo=timezone(timedelta(hours=1)))


# --------------------------------------------------------------------------------------- search_window
SENT = datetime(2024, 3, 1, 10, 0, 0, 600000, tzinfo=UTC)  # on the job table's clock
_attempt_ids = iter(range(1, 10_000))


def attempt(
    sent_at: datetime = SENT, *, offset: float | None = None, outcome: str = "lost", number: int = 1
) -> AttemptRow:
    return AttemptRow(
        id=next(_attempt_ids),
        job_id=1,
        number=number,
        worker="w",
        sent_at=sent_at,
        answered_at=None,
        http_status=None,
        error_code=None,
        error_msg=None,
        request_id=None,
        outcome=outcome,
        rule=None,
        transport=None,
        cloud_offset_s=offset,
    )


def window(
    attempts: list[AttemptRow],
    *,
    current: float | None = None,
    uncertainty: float | None = 0.5,
    timeout: float = 30.0,
    grace: float = 20.0,
    deadline: datetime | None = None,
) -> Window:
    return search_window(
        attempts,
        current_offset_s=current,
        uncertainty_s=uncertainty,
        timeout_s=timeout,
        grace_s=grace,
        intent_deadline=deadline,
    )


S = timedelta(seconds=1)


class TestSearchWindow:
    def test_measured_offset_moves_the_window_onto_the_cloud_clock(self) -> None:
        # the cloud's clock runs 90 s ahead of ours: the job it created shows 90 s "later"
        w = window([attempt(offset=90.0)], uncertainty=0.5, timeout=30)
        slack = 0.5 * S + 2 * S + CREATED_RESOLUTION
        assert w.start == SENT + 90 * S - slack
        assert w.end == SENT + 90 * S + 30 * S + slack
        # the settle time is on the job table's clock: the offset does not apply to it
        assert w.settle_at == SENT + 30 * S + 20 * S

    @pytest.mark.parametrize(
        ("stored", "current", "used"),
        [
            (5.0, None, 5.0),  # the attempt's own measurement
            (5.0, -40.0, 5.0),  # ... wins over today's
            (None, -40.0, -40.0),  # no measurement when it was sent: today's
            (0.0, 12.0, 0.0),  # a measured zero is a measurement, not "unknown"
        ],
    )
    def test_which_offset_places_an_attempt(
        self, stored: float | None, current: float | None, used: float
    ) -> None:
        w = window([attempt(offset=stored)], current=current, uncertainty=1.0)
        assert w.start == SENT + used * S - (3 * S + CREATED_RESOLUTION)

    def test_never_measured_is_two_minutes_wide(self) -> None:
        w = window([attempt(offset=None)], current=None, timeout=30)
        assert timedelta(minutes=2) == UNMEASURED_SKEW
        assert w.start == SENT - UNMEASURED_SKEW
        assert w.end == SENT + 30 * S + UNMEASURED_SKEW

    def test_unknown_uncertainty_of_a_measured_offset_counts_as_a_second(self) -> None:
        w = window([attempt(offset=0.0)], uncertainty=None)
        assert w.start == SENT - (1 * S + 2 * S + CREATED_RESOLUTION)

    def test_spans_every_attempt_on_its_own_offset(self) -> None:
        first = attempt(SENT, offset=10.0, number=1)
        second = attempt(SENT + 300 * S, offset=-20.0, number=2)
        w = window([first, second], uncertainty=0.5, timeout=30, grace=5)
        slack = 0.5 * S + 2 * S + CREATED_RESOLUTION
        assert w.start == SENT + 10 * S - slack
        assert w.end == SENT + 300 * S - 20 * S + 30 * S + slack
        assert w.settle_at == SENT + 300 * S + 30 * S + 5 * S

    def test_attempts_that_never_left_do_not_widen_it(self) -> None:
        never = attempt(SENT - 3600 * S, offset=0.0, outcome="not_sent")
        lost = attempt(SENT, offset=0.0)
        slack = 0.5 * S + 2 * S + CREATED_RESOLUTION
        w = window([never, lost], uncertainty=0.5)
        assert w.start == SENT - slack
        # only unsent attempts: they still bound the search (nothing better is known)
        alone = window([never], uncertainty=0.5)
        assert alone.start == SENT - 3600 * S - slack

    def test_a_later_send_deadline_delays_the_conclusion(self) -> None:
        # the sender's claim outlived the call's timeout: it could still have sent until its deadline
        deadline = SENT + 90 * S
        w = window([attempt(offset=0.0)], timeout=30, grace=20, deadline=deadline)
        assert w.settle_at == deadline + 20 * S
        early = window([attempt(offset=0.0)], timeout=30, grace=20, deadline=SENT + 5 * S)
        assert early.settle_at == SENT + 30 * S + 20 * S


# ---------------------------------------------------------------------------------------- match_recent
INST = "517ea793ab91438cbfcd9c4b1c958b1ein07"
OTHER_INST = "617ea793ab91438cbfcd9c4b1c958b1ein07"
PROXY = "0f46fc46396e4fb19a0cb52f578e9511po01"
OTHER_PROXY = "1f46fc46396e4fb19a0cb52f578e9511po01"


def job(
    job_id: str,
    *,
    instance: str | None = INST,
    proxy: str | None = PROXY,
    created: str | None = "2024-03-01T10:00:01+0000",
    name: str | None = "Upgrade proxy version",
    fields: str | None = "auto",
) -> RecentJob:
    if fields == "auto":
        fields = (
            None if proxy is None else f'{{"proxy_id": "{proxy}", "node": 0, "target_version": "{TARGET}"}}'
        )
    return RecentJob(
        job_id=job_id,
        instance_id=instance,
        job_name=name,
        status="Running",
        created_time=created,
        extend_fields=fields,
    )


def stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S+0000")


def match(jobs: list[RecentJob], known: set[str] | None = None, *, offset: float | None = None) -> Match:
    """As reconcile calls it: ``since`` is the start of the search window of one attempt sent at SENT."""
    since = window([attempt(offset=offset)], uncertainty=0.5).start
    return match_recent(jobs, instance_id=INST, proxy_id=PROXY, since=since, known=known or set())


class TestMatchRecent:
    def test_our_proxy_id_in_the_fields(self) -> None:
        ours = job("ours")
        m = match([job("other-inst", instance=OTHER_INST), ours, job("other-proxy", proxy=OTHER_PROXY)])
        assert m == Match((ours,))

    def test_nothing_new(self) -> None:
        assert match([]) == Match()
        assert match([job("x", instance=OTHER_INST), job("y", proxy=OTHER_PROXY)]) == Match()

    def test_known_workflows_are_not_candidates(self) -> None:
        # a workflow already recorded for some job (this one's earlier attempt, or a sibling) is not new
        assert match([job("old")], known={"old"}) == Match()
        fresh = job("fresh")
        assert match([job("old"), fresh], known={"old"}) == Match((fresh,))

    def test_jobs_from_before_the_send_are_ignored(self) -> None:
        # never measured: two minutes of slack, as the old fixed CLOCK_SKEW gave
        too_old = stamp(SENT - UNMEASURED_SKEW - timedelta(seconds=5))
        assert match([job("before", created=too_old)]) == Match()
        inside = job("inside", created=stamp(SENT - UNMEASURED_SKEW + timedelta(seconds=2)))
        assert match([inside]) == Match((inside,))

    def test_measured_offset_narrows_the_window(self) -> None:
        # new: with the cloud's clock measured (offset 0 +- 0.5 s), a job a minute older than the send
        # cannot be this upgrade's, where the fixed two minutes took it
        minute_old = job("minute-old", created=stamp(SENT - timedelta(minutes=1)))
        assert match([minute_old], offset=0.0) == Match()
        assert match([minute_old], offset=None) == Match((minute_old,))

    def test_measured_offset_follows_a_cloud_clock_that_runs_ahead(self) -> None:
        # the cloud runs 3 minutes ahead: its job carries its clock's time, far "after" our send time,
        # and one stamped at our send time is from before the call (on the cloud's clock)
        ahead = job("ahead", created=stamp(SENT + timedelta(minutes=3)))
        assert match([ahead], offset=180.0) == Match((ahead,))
        at_our_time = job("ours-clock", created=stamp(SENT))
        assert match([at_our_time], offset=180.0) == Match()

    def test_whole_second_timestamps_before_the_send_still_match(self) -> None:
        # the cloud truncates to the second: a job created at 10:00:00.9, after the send at 10:00:00.6,
        # shows as 10:00:00, i.e. before the send (also with a measured, exact offset)
        same_second = job("same", created="2024-03-01T10:00:00+0000")
        assert match([same_second]) == Match((same_second,))
        assert match([same_second], offset=0.0) == Match((same_second,))

    def test_unreadable_creation_time_is_not_a_match(self) -> None:
        assert match([job("x", created=None)]) == Match()
        assert match([job("y", created="soon")]) == Match()

    def test_by_name_when_no_fields(self) -> None:
        named = job("named", proxy=None)
        assert match([named]) == Match((named,))

    def test_by_name_ignores_unrelated_jobs_on_the_instance(self) -> None:
        named = job("named", proxy=None)
        unrelated = job("restart", proxy=None, name="Restart instance")
        m = match([unrelated, named])
        assert m.jobs == (named,)

    def test_every_node_workflow_naming_our_proxy_is_ours(self) -> None:
        # a 2-node proxy answers one workflow per node, both naming the proxy: record both
        a, b = job("a"), job("b")
        m = match([a, b])
        assert set(m.jobs) == {a, b} and m.ambiguous == ()

    def test_two_by_name_is_ambiguous(self) -> None:
        a, b = job("a", proxy=None), job("b", proxy=None)
        m = match([a, b])
        assert m.jobs == () and set(m.ambiguous) == {a, b}

    def test_an_unnamed_job_on_the_instance_is_ambiguous_not_ignored(self) -> None:
        # we cannot tell it is not our upgrade: flag rather than resend
        odd = job("odd", proxy=None, name="Some operation")
        m = match([odd])
        assert m.jobs == () and m.ambiguous == (odd,)

    def test_our_id_wins_over_name_only_candidates(self) -> None:
        ours = job("ours")
        m = match([job("named", proxy=None), ours])
        assert m.jobs == (ours,)

    def test_another_proxys_job_is_never_ours(self) -> None:
        m = match([job("theirs", proxy=OTHER_PROXY, name="Upgrade proxy version")])
        assert m == Match()
